"""A restart on a large AOF (issue 13, item 6): Redis answers LOADING for
seconds while it reads its data. The harness waits through it, chatd answers
503 redis_loading with Retry-After meanwhile (chats and health), and chats work
again once Redis has loaded, without restarting anything else."""

import os
import socket
import threading
from pathlib import Path

from harness import keys as rkeys
from harness.stack import LOOPBACK, Redis, Stack, http_request, poll_until, post_chat

AOF_MIN_BYTES = 50 * 1024 * 1024
FILL_KEYS = 60_000
FILL_VALUE = os.urandom(500).hex().encode()  # 1,000 bytes a key: 60 MB of AOF
FILL_BATCH = 1000
# Redis's test-only knob: microseconds of pause per key loaded, so that the
# LOADING window lasts seconds (60,000 keys) however fast the machine is.
KEY_LOAD_DELAY_US = "100"
LOADING_TIMEOUT_S = 60
RECOVERY_TIMEOUT_S = 60


def fill(port: int) -> None:
    """FILL_KEYS SETs, pipelined a batch at a time: seconds, not minutes."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        for start in range(0, FILL_KEYS, FILL_BATCH):
            keys = [b"fill:%d" % i for i in range(start, min(FILL_KEYS, start + FILL_BATCH))]
            sock.sendall(b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(FILL_VALUE),
                                                                                 FILL_VALUE) for k in keys))
            replies = b""
            while replies.count(b"\r\n") < len(keys):
                chunk = sock.recv(65536)
                assert chunk, "redis closed the connection while being filled"
                replies += chunk
            assert replies.count(b"+OK\r\n") == len(keys), replies[:200]


def aof_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "aof" in f.name)


def test_the_stack_comes_up_on_a_large_aof_and_answers_503_while_redis_loads(build_dir, tmp_path, unique):
    # A throwaway Redis writes the AOF into the folder the stack's Redis uses.
    writer = Redis(tmp_path).start()
    try:
        fill(writer.port)
    finally:
        writer.stop()  # SIGTERM: the AOF is flushed
    assert aof_bytes(tmp_path / "redis") >= AOF_MIN_BYTES

    # The stack starts on it: its Redis start waits through LOADING. Chroma
    # is not needed here (chats then answer from short-term memory).
    with Stack.start(build_dir, tmpdir=tmp_path, with_chroma=False) as stack:
        assert stack.redis.command("DBSIZE") >= FILL_KEYS
        user = unique("restart")
        status, _, body = post_chat(stack.url, user, "before the restart")
        assert status == 200, body

        # Restart it, loading slowly, and chat while it loads.
        stack.redis.stop()
        stack.redis.extra_args = ["--key-load-delay", KEY_LOAD_DELAY_US]
        restarted = threading.Thread(target=stack.redis.start)
        restarted.start()
        try:
            def refused_while_loading():
                status, headers, body = post_chat(stack.url, user, "during the restart")
                if status == 503 and isinstance(body, dict) and body.get("code") == "redis_loading":
                    return headers, body
                assert status in (200, 503), (status, body)  # 503 rate_limiter_unavailable before it listens
                return None

            seen = poll_until(refused_while_loading, LOADING_TIMEOUT_S)
            assert seen, "no chat met Redis while it was loading"
            headers, body = seen
            assert int(headers["retry-after"]) >= 1
            assert body["retryAfter"] == int(headers["retry-after"])

            def health_says_loading():
                status, headers, body = http_request(stack.url, path="/api/health")
                if status == 503 and body.get("dependencies", {}).get("redis") == "loading":
                    return headers, body
                return None

            health = poll_until(health_says_loading, LOADING_TIMEOUT_S)
            assert health, "health never said Redis was loading"
            assert health[1]["code"] == "redis_loading" and int(health[0]["retry-after"]) >= 1
        finally:
            restarted.join()
        assert stack.redis.command("DBSIZE") >= FILL_KEYS

        # Back: chats work again, with the memory of before the restart.
        def answered():
            status, _, body = post_chat(stack.url, user, "after the restart")
            return body if status == 200 else None

        body = poll_until(answered, RECOVERY_TIMEOUT_S)
        assert body, "chats did not come back after Redis loaded"
        assert "before the restart" in str(stack.redis.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1))
