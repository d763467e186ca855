"""Dependencies that hang instead of failing: a frozen process (SIGSTOP) keeps
its sockets open and never answers, which only timeouts can handle. Each test
freezes its own copy, so the session's stack is never touched."""

import concurrent.futures
import os
import signal
import socket

import pytest

from harness.chroma_layout import user_records
from harness.stack import UNCAPPED, Chroma, Redis, concurrently, http_request, poll_until, post_chat

RECOVERY_TIMEOUT_S = 30.0


def chroma_count(chroma_url: str, user: str) -> int:
    return len(user_records(chroma_url, user))


def frozen(service):
    """Context manager: SIGSTOP the service's process, SIGCONT on exit."""
    class Freeze:
        def __enter__(self):
            os.kill(service.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(service.proc.pid, signal.SIGCONT)
    return Freeze()


# Both ways recall asks Chroma for older messages: by id (the default) and by
# a filtered search (CHATD_RECALL_BY_ID_MAX=0).
@pytest.mark.parametrize("by_id_max", ["128", "0"])
def test_a_frozen_chroma_degrades_to_short_term_memory_within_the_timeout(new_pool, unique, tmp_path, by_id_max):
    # Its own Redis too: pools sharing a Redis share the indexer group, and the
    # session's indexers would move these turns into the session's Chroma.
    chroma = Chroma(tmp_path / "chroma").start()
    redis = Redis(tmp_path / "redis").start()
    try:
        # A hot set of one message is full as soon as one turn is indexed, and
        # three turns put the first out of the four recent messages, so every
        # later chat asks Chroma for older memories: what freezes.
        # Concurrent chats of one user during the freeze: cap raised on purpose.
        front = new_pool({"CHATD_CHROMA_URL": chroma.url, "CHATD_CHROMA_TIMEOUT_MS": "300",
                          "CHATD_RECALL_HOT_MESSAGES": "1", "CHATD_RECALL_BY_ID_MAX": by_id_max,
                          "CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port),
                          "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED})
        user = unique("frozen-chroma")
        for i in range(3):
            assert post_chat(front.url, user, f"before the freeze {i}")[0] == 200
        assert poll_until(lambda: chroma_count(chroma.url, user) == 6, timeout=RECOVERY_TIMEOUT_S)
        pids = sorted(front.pool.worker_pids())
        with frozen(chroma):
            results = concurrently(lambda i: post_chat(front.url, user, f"during the freeze {i}"), range(4))
            for status, _, body in results:
                assert status == 200, body
                assert "last_user=during the freeze" in body["response"]
            # The recent messages still reached the model: short-term memory works.
            # (The hot set in Redis may add recalled excerpts before them.)
            status, _, body = post_chat(front.url, user, "still remembered?")
            assert status == 200 and "user,assistant,user last_user=still remembered?" in body["response"], body
            # The log line follows the reply: poll for it.
            assert poll_until(lambda: sum(1 for r in front.pool.log_records()
                                          if r.get("event") == "request" and r.get("recall_degraded")) == 5,
                              timeout=RECOVERY_TIMEOUT_S)
        assert sorted(front.pool.worker_pids()) == pids
        # Thawed: every turn, those of the freeze included, reaches Chroma once.
        assert poll_until(lambda: chroma_count(chroma.url, user) == 2 * 8, timeout=RECOVERY_TIMEOUT_S), \
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


# Far longer than the test: a health probe stuck on the frozen Chroma stays
# stuck until the thaw, so nothing below can be explained by a timeout ending.
STUCK_CHROMA_TIMEOUT_MS = "300000"
# Shorter than STUCK_CHROMA_TIMEOUT_MS: a call still waiting this long can only
# be waiting behind the stuck probe.
CLIENT_TIMEOUT_S = 30.0
# How long one look for "a probe is stuck" waits before calling it stuck.
STUCK_PROBE_LOOK_S = 1.0
HEALTH_BURST = 50


def health_probe_is_stuck(url: str) -> bool:
    """True when a health call does not answer at once: it became the one that
    refreshes, and waits on the frozen Chroma (its worker thread keeps waiting
    after we hang up). False when it was answered from the cache."""
    try:
        http_request(url, "GET", "/api/health", timeout=STUCK_PROBE_LOOK_S)
        return False
    except (socket.timeout, TimeoutError):
        return True


def test_health_calls_against_a_frozen_chroma_do_not_tie_up_the_pool(new_pool, unique, tmp_path):
    # Issue 12: Check() held its mutex across the Redis PING and the Chroma
    # heartbeat, and stamped the cache before the probes: with Chroma hung,
    # every health call queued behind the one probing, each thread of the pool
    # ended up waiting, and a chat could not get a thread.
    chroma = Chroma(tmp_path / "chroma").start()
    redis = Redis(tmp_path / "redis").start()
    try:
        # One process of four threads. Recall off: the chat itself never waits
        # on Chroma, only the health probe does.
        front = new_pool({"CHATD_CHROMA_URL": chroma.url, "CHATD_CHROMA_TIMEOUT_MS": STUCK_CHROMA_TIMEOUT_MS,
                          "CHATD_RECALL_K": "0",
                          "CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port)},
                         workers=1, threads=4)
        user = unique("health-burst")
        assert post_chat(front.url, user, "before the freeze")[0] == 200
        with frozen(chroma), concurrent.futures.ThreadPoolExecutor(max_workers=HEALTH_BURST) as clients:
            # Once the cached answer is a second old, a call refreshes and sticks.
            assert poll_until(lambda: health_probe_is_stuck(front.url), timeout=RECOVERY_TIMEOUT_S)
            health_calls = [clients.submit(http_request, front.url, "GET", "/api/health", timeout=CLIENT_TIMEOUT_S)
                            for _ in range(HEALTH_BURST)]
            # Sent while the health calls are in flight.
            status, _, body = post_chat(front.url, user, "during the health burst", timeout=CLIENT_TIMEOUT_S)
            assert status == 200, body
            assert "last_user=during the health burst" in body["response"]
            # Every health call got the previous answer instead of waiting for
            # the probe, which is still stuck: Chroma is frozen until this block ends.
            for call in health_calls:
                status, _, body = call.result()
                assert status == 200, body
                assert body["dependencies"]["chroma"] == "ok"
    finally:
        chroma.stop()
        redis.stop()
