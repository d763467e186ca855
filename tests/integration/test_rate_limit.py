"""The per-user rate limit through the real stack: nginx -> chatd pool ->
Redis (Lua script, Redis time). Exactness under concurrency for both
algorithms, window reset, the sliding log's rolling-window guarantee, TTLs,
the response headers, and Redis outages under both failure modes."""

import bisect
import re
import threading
import time
from collections import Counter

import pytest

from harness import keys as rkeys
from harness.stack import UNCAPPED, Redis, concurrently, poll_until, post_chat
from harness.windows import in_one_fixed_window

DEFAULT_LIMIT = 30  # include/chatd/config.h
DEFAULT_WINDOW_S = 60
ALGORITHMS = ("fixed", "sliding")

RATELIMIT_RE = re.compile(r'^"default";r=(\d+);t=(\d+)$')
RECOVERY_TIMEOUT_S = 20.0


def rl_key(user: str, algorithm: str) -> str:
    return rkeys.user_key(user, f"rl:{algorithm}")


def statuses(results) -> Counter:
    return Counter(status for status, _, _ in results)


def chat(url, user, message="hello"):
    return post_chat(url, user, message)


def check_rate_headers(headers, limit, window_s):
    assert headers.get("ratelimit-policy") == f'"default";q={limit};w={window_s}', headers
    match = RATELIMIT_RE.match(headers.get("ratelimit", ""))
    assert match, headers
    remaining, reset_s = int(match.group(1)), int(match.group(2))
    assert 0 <= remaining < limit
    assert 0 <= reset_s <= window_s
    return remaining, reset_s


def check_429(status, headers, body):
    assert status == 429
    retry_after = int(headers["retry-after"])
    assert retry_after >= 1
    assert body == {"error": "Too many requests", "code": "rate_limited", "retryAfter": retry_after}
    return retry_after


def test_seed_31_concurrent_requests_for_one_user(stack, unique):
    def attempt():
        user = unique("seed")
        return concurrently(chat, [(stack.url, user) for _ in range(DEFAULT_LIMIT + 1)],
                            max_workers=DEFAULT_LIMIT + 1)

    results = in_one_fixed_window(stack.redis, DEFAULT_WINDOW_S, attempt)
    counts = statuses(results)
    assert counts == {200: DEFAULT_LIMIT, 429: 1}, counts
    for status, headers, body in results:
        check_rate_headers(headers, DEFAULT_LIMIT, DEFAULT_WINDOW_S)
        if status == 429:
            check_429(status, headers, body)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exactly_the_limit_is_admitted_under_concurrency(stack, new_pool, unique, algorithm):
    limit, window_s, burst, rounds, bystander_requests = 30, 600, 60, 3, 8
    # 60 chats of one user at once: the concurrency cap would refuse most of
    # them before the rate limiter is tested, so it is raised on purpose.
    frontend = new_pool({"CHATD_RATE_LIMIT": str(limit), "CHATD_RATE_WINDOW_S": str(window_s),
                         "CHATD_RATE_ALGORITHM": algorithm, "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED},
                        workers=3, threads=4)

    def one_round():
        user, bystander = unique("burst"), unique("bystander")
        calls = [(frontend.url, user) for _ in range(burst)]
        # Interleaved, so the bystander competes for the same workers and Redis.
        for i in range(bystander_requests):
            calls.insert(i * (burst // bystander_requests), (frontend.url, bystander))
        results = concurrently(chat, calls, max_workers=len(calls))
        mine = [r for call, r in zip(calls, results) if call[1] == user]
        theirs = [r for call, r in zip(calls, results) if call[1] == bystander]
        # Read in the round, so in the same fixed window as the burst.
        key = rl_key(user, algorithm)
        stored = int(stack.redis.command("HGET", key, "n")) if algorithm == "fixed" \
            else stack.redis.command("ZCARD", key)
        return mine, theirs, stored, stack.redis.command("PTTL", key)

    for _ in range(rounds):
        if algorithm == "fixed":
            mine, theirs, stored, ttl = in_one_fixed_window(stack.redis, window_s, one_round)
        else:
            mine, theirs, stored, ttl = one_round()
        assert statuses(mine) == {200: limit, 429: burst - limit}
        assert statuses(theirs) == {200: bystander_requests}
        # Rejections did not consume quota: Redis holds exactly the admissions.
        assert stored == limit
        assert ttl > 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_user_is_admitted_again_once_the_window_passed(stack, new_pool, unique, algorithm):
    limit, window_s = 3, 2
    frontend = new_pool({"CHATD_RATE_LIMIT": str(limit), "CHATD_RATE_WINDOW_S": str(window_s),
                         "CHATD_RATE_ALGORITHM": algorithm})

    def fill_until_rejected():
        user = unique("window")
        results = [chat(frontend.url, user) for _ in range(limit + 1)]
        return user, results

    if algorithm == "fixed":
        user, results = in_one_fixed_window(stack.redis, window_s, fill_until_rejected)
    else:
        user, results = fill_until_rejected()
    assert [s for s, _, _ in results] == [200] * limit + [429]
    retry_after = check_429(*results[-1])
    assert retry_after <= window_s

    # Retry-After is a promise: once it has elapsed the user must pass.
    deadline = time.monotonic() + retry_after
    time.sleep(max(0.0, deadline - time.monotonic()))
    admitted = poll_until(lambda: chat(frontend.url, user)[0] == 200, timeout=window_s + 5)
    assert admitted, "still rejected well after Retry-After"


def test_sliding_log_never_admits_more_than_the_limit_in_any_rolling_window(stack, new_pool, unique):
    limit, window_s, duration_s, clients = 5, 3, 7.0, 4
    # Every admission stays in the sorted set for at least one window, so a
    # snapshot this often sees each of them.
    sample_interval_s = 0.2
    # Several clients of one user at once test the rate only: cap raised on purpose.
    frontend = new_pool({"CHATD_RATE_LIMIT": str(limit), "CHATD_RATE_WINDOW_S": str(window_s),
                         "CHATD_RATE_ALGORITHM": "sliding", "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED})
    user = unique("rolling")
    key = rl_key(user, "sliding")
    stop = threading.Event()
    admitted = Counter()
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            status = chat(frontend.url, user)[0]
            with lock:
                admitted[status] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    seen = {}  # member -> score (Redis time in microseconds)
    ttls = []
    end = time.monotonic() + duration_s
    try:
        while time.monotonic() < end:
            entries = stack.redis.command("ZRANGE", key, 0, -1, "WITHSCORES")
            for member, score in zip(entries[::2], entries[1::2]):
                seen[member] = int(float(score))
            if entries:
                ttls.append(stack.redis.command("PTTL", key))
            time.sleep(sample_interval_s)
    finally:
        stop.set()
        for t in threads:
            t.join()
    entries = stack.redis.command("ZRANGE", key, 0, -1, "WITHSCORES")
    for member, score in zip(entries[::2], entries[1::2]):
        seen[member] = int(float(score))

    assert set(admitted) <= {200, 429}, admitted
    assert len(seen) == admitted[200], "every admission is in the log, and nothing else"
    times = sorted(seen.values())
    window_us = window_s * 1_000_000
    # The most admissions in any window (t - W, t], checked at each admission.
    busiest = max(i + 1 - bisect.bisect_right(times, t - window_us) for i, t in enumerate(times))
    assert busiest == limit
    # -2: the key expired between the two reads; -1 would be a key without TTL.
    assert ttls and all(0 < ttl <= window_s * 1000 or ttl == -2 for ttl in ttls), ttls


def test_every_rate_limit_key_has_a_ttl(stack, new_pool, unique):
    sliding = new_pool({"CHATD_RATE_LIMIT": "2", "CHATD_RATE_ALGORITHM": "sliding"})
    fixed = new_pool({"CHATD_RATE_LIMIT": "2", "CHATD_RATE_ALGORITHM": "fixed"})

    def rate_keys():
        keys, cursor = [], b"0"
        while True:
            cursor, batch = stack.redis.command("SCAN", cursor, "MATCH", "chatd:*:u:*:rl:*", "COUNT", 1000)
            keys.extend(batch)
            if cursor == b"0":
                return keys

    def exercise(algorithm, frontend):
        user = unique("ttl")
        # Admissions and rejections: neither may leave a key without a TTL.
        codes = [chat(frontend.url, user)[0] for _ in range(4)]
        return user, codes, rate_keys()

    # The fixed window's four chats and its key's look-up in one window: a
    # boundary between them resets the count and expires the key.
    runs = {"sliding": exercise("sliding", sliding),
            "fixed": in_one_fixed_window(stack.redis, DEFAULT_WINDOW_S, lambda: exercise("fixed", fixed))}
    keys = set()
    for algorithm, (user, codes, seen) in runs.items():
        assert 429 in codes and 200 in codes, (algorithm, codes)
        assert rl_key(user, algorithm).encode() in seen, algorithm
        keys.update(seen)
    for key in keys:
        ttl = stack.redis.command("PTTL", key)
        # -2: expired since the SCAN, which is fine; -1 would be immortal.
        assert ttl > 0 or ttl == -2, (key, ttl)


def test_headers_count_down_then_429_carries_retry_after(new_pool, unique):
    limit, window_s = 3, 60
    frontend = new_pool({"CHATD_RATE_LIMIT": str(limit), "CHATD_RATE_WINDOW_S": str(window_s),
                         "CHATD_RATE_ALGORITHM": "sliding"})
    user = unique("headers")
    remaining_seen = []
    for _ in range(limit):
        status, headers, body = chat(frontend.url, user)
        assert status == 200, body
        remaining, reset_s = check_rate_headers(headers, limit, window_s)
        remaining_seen.append(remaining)
        assert reset_s >= 1  # the log is not empty after an admission
    assert remaining_seen == [2, 1, 0]
    status, headers, body = chat(frontend.url, user)
    retry_after = check_429(status, headers, body)
    remaining, reset_s = check_rate_headers(headers, limit, window_s)
    assert remaining == 0
    assert 1 <= retry_after <= window_s
    assert reset_s <= retry_after


def test_counter_redis_outage_follows_the_failure_mode_and_recovers_without_restart(stack, new_pool, unique,
                                                                                     tmp_path):
    # The counters in a Redis of their own (CHATD_RATE_REDIS_*), so that its
    # outage is the limiter's alone and each mode shows exactly: closed refuses,
    # open admits while memory (the stack's Redis) keeps working.
    counters = Redis(tmp_path).start()
    try:
        # Bursts of one user test the failure mode only: cap raised on purpose.
        # The sliding log's key lasts a window from each admission, where a
        # fixed window's would expire at the next minute, before it is looked for.
        env = {"CHATD_RATE_REDIS_HOST": counters.host, "CHATD_RATE_REDIS_PORT": str(counters.port),
               "CHATD_RATE_LIMIT": "1000", "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED,
               "CHATD_RATE_ALGORITHM": "sliding"}
        closed = new_pool({**env, "CHATD_RATE_FAILURE_MODE": "closed"})
        opened = new_pool({**env, "CHATD_RATE_FAILURE_MODE": "open"})
        user = unique("outage")
        for frontend in (closed, opened):
            assert chat(frontend.url, user)[0] == 200
        assert counters.command("EXISTS", rl_key(user, "sliding")) == 1, "counters are not in the dedicated Redis"
        pids = {id(f): sorted(f.pool.worker_pids()) for f in (closed, opened)}

        counters.stop()
        # Enough calls that every worker meets the outage, some at once.
        during_closed = concurrently(chat, [(closed.url, user) for _ in range(12)], max_workers=6)
        for status, headers, body in during_closed:
            assert status == 503, body
            assert body["code"] == "rate_limiter_unavailable"
            assert isinstance(body["error"], str) and body["error"]
            assert headers.get("ratelimit-policy") == '"default";q=1000;w=60'
        during_open = concurrently(chat, [(opened.url, user) for _ in range(12)], max_workers=6)
        for status, _, body in during_open:
            assert status == 200, body
            assert isinstance(body["response"], str)
        assert any(r.get("event") == "rate_limiter_failed_open" for r in opened.pool.log_records())

        counters.start()
        for frontend in (closed, opened):
            recovered = poll_until(lambda: chat(frontend.url, user)[0] == 200, timeout=RECOVERY_TIMEOUT_S)
            assert recovered, "no 200 after Redis came back"
            assert sorted(frontend.pool.worker_pids()) == pids[id(frontend)], "a worker crashed or was restarted"
        # Counting resumed in the dedicated Redis.
        assert counters.command("EXISTS", rl_key(user, "sliding")) == 1
    finally:
        counters.stop()


def test_a_flood_from_a_limited_user_costs_redis_at_most_one_call_per_worker_thread(new_pool, unique, tmp_path):
    # Counters in a Redis of their own, so its command statistics are the
    # limiter's alone.
    counters = Redis(tmp_path).start()
    try:
        workers, threads, flood_size = 2, 4, 200
        # The flood counts rate-limit calls only: cap raised on purpose.
        front = new_pool({"CHATD_RATE_REDIS_HOST": counters.host, "CHATD_RATE_REDIS_PORT": str(counters.port),
                          "CHATD_RATE_LIMIT": "2", "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED,
                          # The flood must all fall in the rejection; the sliding
                          # log has no window boundary to reopen the quota mid-flood.
                          "CHATD_RATE_ALGORITHM": "sliding"},
                         workers=workers, threads=threads)
        user = unique("flood")
        assert [chat(front.url, user)[0] for _ in range(2)] == [200, 200]

        def scripts_run():
            stats = counters.command("INFO", "commandstats")
            text = stats.decode() if isinstance(stats, bytes) else stats
            return sum(int(re.search(r"calls=(\d+)", line).group(1)) for line in text.splitlines()
                       if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))

        before = scripts_run()
        flood = concurrently(lambda: chat(front.url, user), [() for _ in range(flood_size)], max_workers=8)
        for status, headers, body in flood:
            check_429(status, headers, body)
        # A worker remembers a rejection until Retry-After. Only requests that
        # began before their process stored it can ask Redis: at most one per
        # thread, far fewer than the flood.
        assert 1 <= scripts_run() - before <= workers * threads
        # Another user of the same pool is not affected.
        assert chat(front.url, unique("bystander"))[0] == 200
    finally:
        counters.stop()
