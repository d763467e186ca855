"""Idempotency-Key on POST /api/chat, and a record that never lies, against
the real stack: a retry with the same key and body gets the first answer
again, with the model called once and the turn recorded once, whatever was
lost on the way (a reply, a worker, Redis's answer to the record script)."""

import hashlib
import json
import os
import signal
import threading

from harness.redis_proxy import RedisProxy, pid_of_client
from harness import keys as rkeys
from harness.stack import poll_until, post_chat

KEY_HEADER = "Idempotency-Key"
POLL_TIMEOUT_S = 30.0
# A worker held inside the record script answers only when the test lets it:
# this is longer than any test step, so only the test's kill ends the wait.
PATIENT_REDIS_TIMEOUT_MS = "60000"
# The first request is still running when the duplicate arrives: the fake
# model holds it this long (the test waits for it to reach the model first).
HOLD_FIRST_MS = 4000


def chat(url, user, message, key=None, **kwargs):
    headers = {KEY_HEADER: key} if key is not None else {}
    return post_chat(url, user, message, headers=headers, **kwargs)


def recent_messages(redis, user):
    return [json.loads(raw) for raw in redis.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1)]


def times_recorded(redis, user, message):
    return sum(1 for m in recent_messages(redis, user) if m["role"] == "user" and m["content"] == message)


def model_calls(stack, marker):
    return len(stack.fake.requests(contains=marker))


def idem_redis_key(user, key):
    return rkeys.user_key(user, f"idem:{hashlib.sha256(key.encode()).hexdigest()}")


def turn_id_of(redis, user, message):
    """The turn id of `message` in the user's recent list."""
    return next(m["id"][:-2] for m in recent_messages(redis, user) if m["content"] == message)


def warm_up(url, user):
    """One chat through a new pool first: Redis then knows the record script
    (EVALSHA), so a held answer is the script's, not a NOSCRIPT."""
    status, _, body = chat(url, user, "warm-up")
    assert status == 200, body


def record_script_of(user):
    """Bytes only the record script of this user's turns sends (the key of
    the user's recorded turns), to hold Redis's answer to exactly that script."""
    return rkeys.user_key(user, "recorded").encode()


def test_a_repeat_gets_the_first_answer_and_the_model_is_called_once(stack, unique):
    user, key, marker = unique("idem"), unique("key"), unique("m")
    message = f"remember me once {marker}"
    status, headers, first = chat(stack.url, user, message, key)
    assert status == 200, first
    assert "idempotent-replayed" not in headers
    for _ in range(2):
        status, headers, again = chat(stack.url, user, message, key)
        assert status == 200, again
        assert headers.get("idempotent-replayed") == "true"
        assert again["response"] == first["response"] and again["turnId"] == first["turnId"]
        assert again["requestId"] != first["requestId"]  # a new request, the first answer
    assert model_calls(stack, marker) == 1
    assert times_recorded(stack.redis, user, message) == 1
    ids = [m["id"] for m in recent_messages(stack.redis, user)]
    assert ids == [f"{first['turnId']}:u", f"{first['turnId']}:a"]
    # Kept for the configured time (24 h by default), under the user's hash tag.
    ttl_ms = stack.redis.command("PTTL", idem_redis_key(user, key))
    assert 0 < ttl_ms <= 24 * 3600 * 1000


def test_the_same_key_of_another_user_is_another_request(stack, unique):
    key, marker = unique("key"), unique("m")
    message = f"shared key {marker}"
    alice, bob = unique("alice"), unique("bob")
    a = chat(stack.url, alice, message, key)
    b = chat(stack.url, bob, message, key)
    assert a[0] == 200 and b[0] == 200, (a, b)
    assert "idempotent-replayed" not in b[1]
    assert a[2]["turnId"] != b[2]["turnId"]
    assert model_calls(stack, marker) == 2


def test_a_repeat_while_the_first_runs_is_409_then_a_replay(stack, unique):
    user, key, marker = unique("idem"), unique("key"), unique("m")
    message = f"slow one {marker} #fake:delay_ms={HOLD_FIRST_MS}"
    first = {}
    runner = threading.Thread(target=lambda: first.setdefault("r", chat(stack.url, user, message, key)))
    runner.start()
    try:
        assert poll_until(lambda: model_calls(stack, marker) == 1, POLL_TIMEOUT_S), "the first never reached the model"
        status, _, body = chat(stack.url, user, message, key)
        assert status == 409, body
        assert body["code"] == "idempotency_in_progress" and body["error"], body
    finally:
        runner.join()
    status, _, original = first["r"]
    assert status == 200, original
    status, headers, again = chat(stack.url, user, message, key)
    assert status == 200 and headers.get("idempotent-replayed") == "true", again
    assert again["turnId"] == original["turnId"] and again["response"] == original["response"]
    assert model_calls(stack, marker) == 1
    assert times_recorded(stack.redis, user, message) == 1


def test_the_same_key_with_another_body_is_422(stack, unique):
    user, key, marker = unique("idem"), unique("key"), unique("m")
    assert chat(stack.url, user, f"first {marker}", key)[0] == 200
    status, _, body = chat(stack.url, user, f"second {marker}", key)
    assert status == 422, body
    assert body["code"] == "idempotency_key_reused" and body["error"], body
    assert model_calls(stack, marker) == 1
    assert times_recorded(stack.redis, user, f"second {marker}") == 0


def test_failures_that_stored_nothing_are_not_remembered(stack, unique):
    user, key, marker = unique("idem"), unique("key"), unique("m")
    # A 4xx: nothing ran, so the key is still free for a good request.
    status, _, body = chat(stack.url, user, "   ", key)
    assert status == 400 and body["code"] == "empty_message", body
    # The model fails on every try of the first request (one try and two
    # retries), then answers: the retry with the same key runs again.
    message = f"model down {marker} #fake:status=500 #fake:fail_times=3"
    status, _, body = chat(stack.url, user, message, key)
    assert status == 502 and body["code"] == "model_error", body
    assert model_calls(stack, marker) == 3
    status, headers, body = chat(stack.url, user, message, key)
    assert status == 200, body
    assert "idempotent-replayed" not in headers
    assert model_calls(stack, marker) == 4
    assert times_recorded(stack.redis, user, message) == 1


def test_invalid_keys_are_400(stack, unique):
    user, marker = unique("idem"), unique("m")
    for bad in ["", "k" * 256, "caf\u00e9"]:
        status, _, body = chat(stack.url, user, f"bad key {marker}", bad)
        assert status == 400, (bad, body)
        assert body["code"] == "invalid_idempotency_key", body
    assert model_calls(stack, marker) == 0
    # The longest valid key, and the draft's quoted form of a key.
    assert chat(stack.url, user, f"long key {marker}", "k" * 255)[0] == 200
    status, _, first = chat(stack.url, user, f"quoted {marker}", '"q-1"')
    status, headers, again = chat(stack.url, user, f"quoted {marker}", "q-1")
    assert status == 200 and headers.get("idempotent-replayed") == "true" and again["turnId"] == first["turnId"]


def test_replays_and_conflicts_cost_no_quota(new_pool, stack, unique):
    # The sliding log: a fixed window ending mid-test would give back the quota.
    front = new_pool({"CHATD_RATE_LIMIT": "2", "CHATD_RATE_ALGORITHM": "sliding"})
    user, marker = unique("idem-quota"), unique("m")
    assert chat(front.url, user, f"one {marker}", "k1")[0] == 200
    for _ in range(3):
        assert chat(front.url, user, f"one {marker}", "k1")[0] == 200  # replays
        assert chat(front.url, user, f"other {marker}", "k1")[0] == 422
    assert chat(front.url, user, f"two {marker}", "k2")[0] == 200  # the second of two
    status, _, body = chat(front.url, user, f"three {marker}", "k3")
    assert status == 429 and body["code"] == "rate_limited", body
    # A rejected request stored nothing: its key is free for the retry.
    assert stack.redis.command("EXISTS", idem_redis_key(user, "k3")) == 0
    assert model_calls(stack, marker) == 2


def test_the_keep_time_is_configurable(new_pool, stack, unique):
    front = new_pool({"CHATD_IDEMPOTENCY_TTL_S": "2"})
    user, key, marker = unique("idem-ttl"), unique("key"), unique("m")
    message = f"short memory {marker}"
    status, _, first = chat(front.url, user, message, key)
    assert status == 200, first
    ttl_ms = stack.redis.command("PTTL", idem_redis_key(user, key))
    assert 0 < ttl_ms <= 2000, ttl_ms
    # Replayed until the key expires, then a new request.
    fresh = poll_until(lambda: (lambda r: r if r[0] == 200 and "idempotent-replayed" not in r[1] else None)(
        chat(front.url, user, message, key)), POLL_TIMEOUT_S, interval=0.2)
    assert fresh, "the key never expired"
    assert fresh[2]["turnId"] != first["turnId"]
    assert model_calls(stack, marker) == 2


def test_a_redis_timeout_after_the_record_ran_is_answered_truthfully(new_pool, stack, unique):
    with RedisProxy(stack.redis.host, stack.redis.port) as proxy:
        front = new_pool({"CHATD_REDIS_PORT": str(proxy.port)})
        user, marker = unique("idem-timeout"), unique("m")
        message = f"answer lost {marker}"
        warm_up(front.url, user)
        # Redis runs the record script, its answer never comes: chatd times
        # out, asks again, and the script says the turn is already there.
        proxy.hold(record_script_of(user), count=1)
        status, _, body = chat(front.url, user, message)
        assert proxy.holds() == 1
        assert status == 200, body
        assert times_recorded(stack.redis, user, message) == 1
        assert turn_id_of(stack.redis, user, message) == body["turnId"]


def test_a_record_unconfirmed_twice_says_so_and_a_keyed_retry_learns_the_truth(new_pool, stack, unique):
    with RedisProxy(stack.redis.host, stack.redis.port) as proxy:
        front = new_pool({"CHATD_REDIS_PORT": str(proxy.port)})
        user, key, marker = unique("idem-unknown"), unique("key"), unique("m")
        message = f"answer lost twice {marker}"
        warm_up(front.url, user)
        proxy.hold(record_script_of(user), count=2)
        status, _, body = chat(front.url, user, message, key)
        assert proxy.holds() == 2
        assert status == 503, body
        assert body["code"] == "record_outcome_unknown" and "may or may not" in body["error"], body
        # It did land: "not recorded" would have been a lie.
        assert times_recorded(stack.redis, user, message) == 1
        assert turn_id_of(stack.redis, user, message) == body["turnId"]
        status, headers, again = chat(front.url, user, message, key)
        assert status == 200 and headers.get("idempotent-replayed") == "true", again
        assert again["turnId"] == body["turnId"]
        assert model_calls(stack, marker) == 1
        assert times_recorded(stack.redis, user, message) == 1


def test_a_worker_killed_after_the_record_leaves_nothing_for_a_retry_to_record(new_pool, stack, unique):
    with RedisProxy(stack.redis.host, stack.redis.port) as proxy:
        front = new_pool({"CHATD_REDIS_PORT": str(proxy.port), "CHATD_REDIS_TIMEOUT_MS": PATIENT_REDIS_TIMEOUT_MS})
        user, key, marker = unique("idem-kill"), unique("key"), unique("m")
        message = f"worker dies {marker}"
        warm_up(front.url, user)
        proxy.hold(record_script_of(user), count=1)
        first = {}
        runner = threading.Thread(target=lambda: first.setdefault("r", chat(front.url, user, message, key)))
        runner.start()
        try:
            assert proxy.reached.acquire(timeout=POLL_TIMEOUT_S), "the record script never ran"
            pid = pid_of_client(front.pool.worker_pids(), proxy.held_ports[0], proxy.port)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        finally:
            runner.join()
        status, _, body = first["r"]
        assert status == 502, body  # nginx: the worker died mid-request
        assert poll_until(lambda: times_recorded(stack.redis, user, message) == 1, POLL_TIMEOUT_S)
        turn_id = turn_id_of(stack.redis, user, message)
        status, headers, again = chat(front.url, user, message, key)
        assert status == 200 and headers.get("idempotent-replayed") == "true", again
        assert again["turnId"] == turn_id
        assert f"last_user={message}" in again["response"]
        assert model_calls(stack, marker) == 1
        assert times_recorded(stack.redis, user, message) == 1
