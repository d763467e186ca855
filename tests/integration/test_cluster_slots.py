"""Every Redis script and command of chatd stays within one slot (issue 17,
item 1). A single redis-server with cluster mode on, owning all 16384 slots,
answers CROSSSLOT to any script or command whose keys span slots, exactly as a
real cluster does, so chats, idempotent replays, the indexer, recall, and the
cleanup's archive, restore and forget run against it here: one CROSSSLOT
anywhere fails a chat, an indexing pass or a cleanup command."""

import os
import subprocess
from pathlib import Path

import pytest

from harness import keys as rkeys
from harness.chroma_layout import user_records
from harness.stack import Redis, RedisError, free_port, json_log_records, poll_until, post_chat

ALL_SLOTS = (0, 16383)
CLUSTER_READY_S = 10
INDEX_TIMEOUT_S = 45
CLEANUP_TIMEOUT_S = 120


@pytest.fixture
def cluster_redis(tmp_path):
    redis = Redis(tmp_path / "cluster-redis")
    # The cluster bus defaults to port + 10000, which is past 65535 for a free
    # port above 55535: pin it to a free port of its own.
    redis.extra_args = ["--cluster-enabled", "yes",
                        "--cluster-config-file", str(tmp_path / "cluster-redis" / "nodes.conf"),
                        "--cluster-port", str(free_port())]
    redis.start()
    try:
        redis.command("CLUSTER", "ADDSLOTSRANGE", *ALL_SLOTS)
        assert poll_until(lambda: b"cluster_state:ok" in redis.command("CLUSTER", "INFO"), CLUSTER_READY_S)
        yield redis
    finally:
        redis.stop()


def run_cleanup(build_dir: Path, env: "dict[str, str]", *args: str) -> "list[dict]":
    proc = subprocess.run([str(build_dir / "bin" / "chatd-cleanup"), *args], env=env, capture_output=True,
                          text=True, timeout=CLEANUP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CROSSSLOT" not in proc.stderr
    return json_log_records(proc.stderr)


def test_chats_indexing_and_cleanup_run_on_a_cluster_node_that_refuses_crossslot(
        cluster_redis, stack, new_pool, unique, tmp_path, build_dir):
    # The node does refuse a script over two slots: the run below could fail.
    with pytest.raises(RedisError, match="CROSSSLOT"):
        cluster_redis.command("EVAL", "return 1", 2, rkeys.index_stream(0), rkeys.index_stream(1))

    env = {"CHATD_REDIS_PORT": str(cluster_redis.port), "CHATD_CHROMA_URL": stack.chroma_url}
    front = new_pool(env, workers=1, threads=2)
    users = [unique("slot") for _ in range(3)]
    for user in users:
        status, _, body = post_chat(front.url, user, f"first words of {user}")
        assert status == 200, body
        key = unique("key")
        first = post_chat(front.url, user, f"second words of {user}", headers={"Idempotency-Key": key})
        replay = post_chat(front.url, user, f"second words of {user}", headers={"Idempotency-Key": key})
        assert first[0] == replay[0] == 200, (first, replay)
        assert replay[2]["turnId"] == first[2]["turnId"]

    def indexed(user: str, records: int) -> bool:
        return (len(user_records(stack.chroma_url, user)) == records
                and rkeys.total_len(cluster_redis, rkeys.all_index_streams()) == 0)

    assert poll_until(lambda: all(indexed(u, 4) for u in users), INDEX_TIMEOUT_S), front.pool.log_text()[-3000:]
    # Recall reads the hot set the indexer filled: a chat after indexing works.
    status, _, body = post_chat(front.url, users[0], "what did I say first?")
    assert status == 200, body
    assert poll_until(lambda: indexed(users[0], 6), INDEX_TIMEOUT_S), front.pool.log_text()[-3000:]
    log = front.pool.log_text()
    assert "CROSSSLOT" not in log
    assert not any(r.get("event") == "index_retry" for r in front.pool.log_records())

    cleanup_env = {k: v for k, v in stack.pool_env(1, env).items() if v is not None}
    cleanup_env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), CHATD_CLEANUP_INACTIVE_S="0",
                       CHATD_ARCHIVE_DIR=str(tmp_path / "archive"))
    summary = run_cleanup(build_dir, cleanup_env, "run")[-1]
    assert summary["archived"] == len(users) and summary["failed"] == 0, summary
    assert all(user_records(stack.chroma_url, u) == [] for u in users)
    run_cleanup(build_dir, cleanup_env, "restore", users[0])
    assert len(user_records(stack.chroma_url, users[0])) == 6
    run_cleanup(build_dir, cleanup_env, "forget", users[0])
    assert user_records(stack.chroma_url, users[0]) == []
    assert cluster_redis.command("EXISTS", rkeys.user_key(users[0], "erased")) == 1
