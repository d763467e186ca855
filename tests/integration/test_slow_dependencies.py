"""Dependencies that hang instead of failing: a frozen process (SIGSTOP) keeps
its sockets open and never answers, which only timeouts can handle. Each test
freezes its own copy, so the session's stack is never touched."""

import os
import signal

from harness.stack import UNCAPPED, Chroma, Redis, concurrently, http_json, poll_until, post_chat

RECOVERY_TIMEOUT_S = 30.0


def chroma_count(chroma_url: str, user: str) -> int:
    base = f"{chroma_url}/api/v2/tenants/default_tenant/databases/default_database/collections"
    status, collection = http_json(f"{base}/chatd-u-{user.encode().hex()}")
    if status != 200:
        return 0
    status, count = http_json(f"{base}/{collection['id']}/count")
    return count if status == 200 else 0


def frozen(service):
    """Context manager: SIGSTOP the service's process, SIGCONT on exit."""
    class Freeze:
        def __enter__(self):
            os.kill(service.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(service.proc.pid, signal.SIGCONT)
    return Freeze()


def test_a_frozen_chroma_degrades_to_short_term_memory_within_the_timeout(new_pool, unique, tmp_path):
    # Its own Redis too: pools sharing a Redis share the indexer group, and the
    # session's indexers would move these turns into the session's Chroma.
    chroma = Chroma(tmp_path / "chroma").start()
    redis = Redis(tmp_path / "redis").start()
    try:
        # Concurrent chats of one user during the freeze: cap raised on purpose.
        front = new_pool({"CHATD_CHROMA_URL": chroma.url, "CHATD_CHROMA_TIMEOUT_MS": "300",
                          "CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port),
                          "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED})
        user = unique("frozen-chroma")
        assert post_chat(front.url, user, "before the freeze")[0] == 200
        pids = sorted(front.pool.worker_pids())
        with frozen(chroma):
            results = concurrently(lambda i: post_chat(front.url, user, f"during the freeze {i}"), range(4))
            for status, _, body in results:
                assert status == 200, body
                assert "last_user=during the freeze" in body["response"]
            # The recent messages still reached the model: short-term memory works.
            status, _, body = post_chat(front.url, user, "still remembered?")
            assert status == 200 and "roles=system,user,assistant" in body["response"]
            # The log line follows the reply: poll for it.
            assert poll_until(lambda: sum(1 for r in front.pool.log_records()
                                          if r.get("event") == "request" and r.get("recall_degraded")) == 5,
                              timeout=RECOVERY_TIMEOUT_S)
        assert sorted(front.pool.worker_pids()) == pids
        # Thawed: every turn, those of the freeze included, reaches Chroma once.
        assert poll_until(lambda: chroma_count(chroma.url, user) == 2 * 6, timeout=RECOVERY_TIMEOUT_S), \
            chroma_count(chroma.url, user)
    finally:
        chroma.stop()
        redis.stop()


def test_a_frozen_redis_is_a_clean_503_and_the_pool_recovers(new_pool, unique, tmp_path):
    redis = Redis(tmp_path).start()
    try:
        # Concurrent chats of one user during the freeze: cap raised on purpose.
        front = new_pool({"CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port),
                          "CHATD_REDIS_TIMEOUT_MS": "200", "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED})
        user = unique("frozen-redis")
        assert post_chat(front.url, user, "before")[0] == 200
        pids = sorted(front.pool.worker_pids())
        with frozen(redis):
            # Answered at all (the command timeout held), and cleanly.
            results = concurrently(lambda i: post_chat(front.url, user, f"during {i}"), range(6))
            for status, _, body in results:
                assert status == 503, body
                assert body["code"] == "rate_limiter_unavailable"
        assert sorted(front.pool.worker_pids()) == pids
        assert poll_until(lambda: post_chat(front.url, user, "after")[0] == 200, timeout=RECOVERY_TIMEOUT_S)
    finally:
        redis.stop()
