"""End-to-end tests of POST /api/chat through nginx, the chatd pool, Redis,
Chroma and the fake model (docs/api.md is the contract tested here).

Every test uses its own user ids and message markers (fixture `unique`), so
tests neither share rate-limit budgets nor see each other's fake-model records.
"""

import json
import os
import signal
import threading

import pytest

from harness.stack import concurrently, poll_until, post_chat

MAX_MESSAGE_BYTES = 8192  # CHATD_MAX_MESSAGE_BYTES default
MAX_BODY_BYTES = 65536    # CHATD_MAX_BODY_BYTES default, nginx's client_max_body_size too
MAX_USER_ID_CHARS = 64
# Bounds of the polls below; far above what any of it takes on an idle machine.
RESPAWN_TIMEOUT_S = 15
LOG_TIMEOUT_S = 10
IN_FLIGHT_TIMEOUT_S = 15
GRACEFUL_STOP_LIMIT_S = 10
BURST_SIZE = 320
BURST_CONCURRENCY = 32
# Attempts of the model client: the first one and CHATD_LLM_MAX_RETRIES (2) retries.
ATTEMPTS_WHEN_RETRIED = 3
LOG_FIELDS = ("request_id", "status", "latency_ms", "upstream_ms", "user")


def assert_json_error(result, status, code=None):
    got_status, headers, body = result
    assert got_status == status, f"expected {status}, got {got_status}: {body!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(body, dict), f"not a JSON object: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("code"), str) and body["code"], body
    if code is not None:
        assert body["code"] == code, body


def assert_chat_ok(result, message):
    status, headers, body = result
    assert status == 200, f"expected 200, got {status}: {body!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and isinstance(body.get("response"), str), body
    # The fake echoes the last user message of the prompt it received.
    assert f"last_user={message}" in body["response"], body


# --------------------------------------------------------------------------
# The happy path


def test_three_users_at_once_all_get_200(stack, unique):
    calls = [(stack.url, unique(f"user{i}"), f"hello from {i} {unique('m')}") for i in range(3)]
    results = concurrently(post_chat, calls, max_workers=3)
    for (_, _, message), result in zip(calls, results):
        assert_chat_ok(result, message)


def test_reply_comes_from_the_model_with_the_message_as_last_user_turn(stack, unique):
    user, message = unique("u"), f"What is the capital of France? {unique('m')}"
    assert_chat_ok(post_chat(stack.url, user, message), message)
    recorded = stack.fake.requests(message)
    assert len(recorded) == 1
    messages = recorded[0]["messages"]
    assert messages[-1] == {"role": "user", "content": message}


def test_message_of_exactly_the_byte_limit_is_accepted(stack, unique):
    marker = unique("m")
    # Two-byte characters, so a character count would differ from the byte count.
    message = marker + " " + "é" * ((MAX_MESSAGE_BYTES - len(marker) - 1) // 2)
    message += "x" * (MAX_MESSAGE_BYTES - len(message.encode()))
    assert len(message.encode()) == MAX_MESSAGE_BYTES
    assert_chat_ok(post_chat(stack.url, unique("u"), message), message)


def test_body_of_exactly_the_body_limit_is_accepted(stack, unique):
    # nginx and chatd agree on the limit: a body of exactly the limit passes both.
    message = unique("m")
    body = json.dumps({"userId": unique("u"), "message": message})
    body += " " * (MAX_BODY_BYTES - len(body))
    assert len(body) == MAX_BODY_BYTES
    assert_chat_ok(post_chat(stack.url, raw_body=body), message)


def test_a_configured_body_limit_is_enforced_by_nginx_and_chatd_alike(new_pool, unique):
    limit = 16384
    frontend = new_pool({"CHATD_MAX_BODY_BYTES": str(limit)})
    message = unique("m")
    body = json.dumps({"userId": unique("u"), "message": message})
    assert_chat_ok(post_chat(frontend.url, raw_body=body + " " * (limit - len(body))), message)
    assert_json_error(post_chat(frontend.url, raw_body=body + " " * (limit + 1 - len(body))), 413,
                      "body_too_large")


@pytest.mark.parametrize("user_id", [
    "a" * MAX_USER_ID_CHARS, "A", "alice.smith_99@example-domain.com", "0-_.@"])
def test_user_ids_within_the_rule_are_accepted(stack, unique, user_id):
    # Fixed ids, each used once per session, so their rate-limit budgets are fresh.
    message = unique("m")
    assert_chat_ok(post_chat(stack.url, user_id, message), message)


def test_content_type_with_charset_parameter_is_json(stack, unique):
    message = unique("m")
    result = post_chat(stack.url, unique("u"), message, content_type="application/json; charset=utf-8")
    assert_chat_ok(result, message)


# --------------------------------------------------------------------------
# The client's errors: JSON {"error", "code"} with the documented status


def _raw(body):
    return {"raw_body": body}


# (id, post_chat keyword arguments, status, code)
CLIENT_ERRORS = [
    ("malformed_json", _raw('{"userId": "u1", "message": '), 400, "invalid_json"),
    ("trailing_garbage", _raw('{"userId": "u1", "message": "hi"} x'), 400, "invalid_json"),
    ("empty_body", _raw(b""), 400, "invalid_json"),
    ("array", _raw('["u1", "hi"]'), 400, "not_an_object"),
    ("string", _raw('"hello"'), 400, "not_an_object"),
    ("number", _raw("42"), 400, "not_an_object"),
    ("null", _raw("null"), 400, "not_an_object"),
    ("missing_user", _raw('{"message": "hi"}'), 400, "missing_field"),
    ("missing_message", _raw('{"userId": "u1"}'), 400, "missing_field"),
    ("empty_object", _raw("{}"), 400, "missing_field"),
    ("user_is_number", _raw('{"userId": 42, "message": "hi"}'), 400, "wrong_type"),
    ("user_is_bool", _raw('{"userId": true, "message": "hi"}'), 400, "wrong_type"),
    ("message_is_number", _raw('{"userId": "u1", "message": 42}'), 400, "wrong_type"),
    ("message_is_array", _raw('{"userId": "u1", "message": ["hi"]}'), 400, "wrong_type"),
    ("message_is_object", _raw('{"userId": "u1", "message": {"text": "hi"}}'), 400, "wrong_type"),
    ("empty_message", {"user_id": "u1", "message": ""}, 400, "empty_message"),
    ("message_too_long_ascii", {"user_id": "u1", "message": "a" * (MAX_MESSAGE_BYTES + 1)}, 400,
     "message_too_long"),
    # 4097 characters but 8194 bytes: the limit is on UTF-8 bytes.
    ("message_too_long_utf8", {"user_id": "u1", "message": "é" * (MAX_MESSAGE_BYTES // 2 + 1)}, 400,
     "message_too_long"),
    ("invalid_utf8_in_message", _raw(b'{"userId": "u1", "message": "caf\xe9 \xff\xfe"}'), 400, "invalid_utf8"),
    ("invalid_utf8_truncated_sequence", _raw(b'{"userId": "u1", "message": "ab\xe2\x82"}'), 400,
     "invalid_utf8"),
    # Escapes that decode to a UTF-16 surrogate alone: not UTF-8 once decoded.
    ("lone_surrogate_escape_is_invalid_utf8", _raw(r'{"userId":"a","message":"x \udc00"}'), 400,
     "invalid_utf8"),
    ("lone_high_surrogate_escape_is_invalid_utf8", _raw(r'{"userId":"a","message":"x \ud800 y"}'), 400,
     "invalid_utf8"),
    ("lone_surrogate_escape_in_a_key_is_invalid_utf8",
     _raw(r'{"userId":"a","message":"x","\udc00":1}'), 400, "invalid_utf8"),
    ("empty_user", {"user_id": "", "message": "hi"}, 400, "invalid_user_id"),
    ("user_too_long", {"user_id": "a" * (MAX_USER_ID_CHARS + 1), "message": "hi"}, 400, "invalid_user_id"),
    ("user_with_space", {"user_id": "alice smith", "message": "hi"}, 400, "invalid_user_id"),
    ("user_with_slash", {"user_id": "a/b", "message": "hi"}, 400, "invalid_user_id"),
    ("user_with_brace", {"user_id": "a{b}", "message": "hi"}, 400, "invalid_user_id"),
    ("user_non_ascii", {"user_id": "zoë", "message": "hi"}, 400, "invalid_user_id"),
    ("user_with_colon", {"user_id": "a:b", "message": "hi"}, 400, "invalid_user_id"),
    ("get", {"method": "GET"}, 405, "method_not_allowed"),
    ("put", {"user_id": "u1", "message": "hi", "method": "PUT"}, 405, "method_not_allowed"),
    ("delete", {"method": "DELETE"}, 405, "method_not_allowed"),
    ("body_over_limit", _raw('{"userId": "u1", "message": "' + "a" * MAX_BODY_BYTES + '"}'), 413,
     "body_too_large"),
    ("text_plain", {"user_id": "u1", "message": "hi", "content_type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("form", {"user_id": "u1", "message": "hi", "content_type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ("no_content_type", {"user_id": "u1", "message": "hi", "content_type": None}, 415,
     "unsupported_media_type"),
    ("unknown_path", {"user_id": "u1", "message": "hi", "path": "/api/chats"}, 404, "not_found"),
    ("root_path", {"method": "GET", "path": "/"}, 404, "not_found"),
    ("sub_path", {"user_id": "u1", "message": "hi", "path": "/api/chat/extra"}, 404, "not_found"),
    ("html_path", {"method": "GET", "path": "/index.html"}, 404, "not_found"),
]


@pytest.mark.parametrize("kwargs,status,code", [c[1:] for c in CLIENT_ERRORS], ids=[c[0] for c in CLIENT_ERRORS])
def test_client_errors_are_json_with_documented_status_and_code(stack, kwargs, status, code):
    result = post_chat(stack.url, **kwargs)
    assert_json_error(result, status, code)
    if status == 405:
        allow = result[1].get("allow", "")
        assert [m.strip() for m in allow.split(",")] == ["POST"], result[1]


def test_client_errors_never_reach_the_model(stack, unique):
    marker = unique("m")
    for user_id in ("", "bad user", "a" * (MAX_USER_ID_CHARS + 1)):
        assert_json_error(post_chat(stack.url, user_id, f"{marker} hi"), 400, "invalid_user_id")
    assert_json_error(post_chat(stack.url, unique("u"), f"{marker} hi", content_type="text/plain"), 415,
                      "unsupported_media_type")
    assert stack.fake.requests(marker) == []


def test_burst_of_bad_requests_gets_documented_statuses_and_crashes_no_worker(stack, unique):
    workers_before = sorted(stack.pool.worker_pids())
    assert len(workers_before) == 2
    # A few valid requests in the mix: the bad ones must not disturb them.
    valid = [({"user_id": unique("burst"), "message": unique("m")}, 200, None) for _ in range(8)]
    cases = [(c[1], c[2], c[3]) for c in CLIENT_ERRORS] + valid
    calls = [cases[i % len(cases)] for i in range(BURST_SIZE)]

    def one(kwargs, status, code):
        return post_chat(stack.url, **kwargs), status, code, kwargs

    results = concurrently(one, calls, max_workers=BURST_CONCURRENCY)
    mismatches = []
    for result, status, code, kwargs in results:
        got_status, headers, body = result
        got_code = body.get("code") if isinstance(body, dict) else None
        json_reply = headers.get("content-type", "").startswith("application/json")
        if got_status != status or (code is not None and got_code != code) or not json_reply:
            mismatches.append((status, code, got_status, got_code, str(kwargs)[:80]))
    assert mismatches == [], mismatches[:10]
    assert sorted(stack.pool.worker_pids()) == workers_before


# --------------------------------------------------------------------------
# The model failing


def _fake_error_texts():
    # What the fake puts in its error bodies: none of it may reach the client.
    return ("fake injected status", "insufficient_quota", "this is not JSON")


def test_model_500_is_502_model_error_without_the_upstream_text(stack, unique):
    message = f"{unique('m')} #fake:status=500"
    result = post_chat(stack.url, unique("u"), message)
    assert_json_error(result, 502, "model_error")
    body_text = json.dumps(result[2])
    for text in _fake_error_texts():
        assert text not in body_text


def test_model_500_is_retried_twice(stack, unique):
    message = f"{unique('m')} #fake:status=500"
    assert_json_error(post_chat(stack.url, unique("u"), message), 502)
    assert len(stack.fake.requests(message)) == ATTEMPTS_WHEN_RETRIED


def test_model_400_is_502_and_not_retried(stack, unique):
    message = f"{unique('m')} #fake:status=400"
    assert_json_error(post_chat(stack.url, unique("u"), message), 502)
    assert len(stack.fake.requests(message)) == 1


def test_model_429_insufficient_quota_is_502_and_not_retried(stack, unique):
    message = f"{unique('m')} #fake:status=429 #fake:error_code=insufficient_quota"
    result = post_chat(stack.url, unique("u"), message)
    assert_json_error(result, 502)
    assert "insufficient_quota" not in json.dumps(result[2])
    assert len(stack.fake.requests(message)) == 1


def test_model_503_twice_then_ok_is_200_after_three_attempts(stack, unique):
    message = f"{unique('m')} #fake:status=503 #fake:fail_times=2"
    assert_chat_ok(post_chat(stack.url, unique("u"), message), message)
    assert len(stack.fake.requests(message)) == ATTEMPTS_WHEN_RETRIED


def test_model_dropping_the_connection_is_502(stack, unique):
    message = f"{unique('m')} #fake:drop"
    assert_json_error(post_chat(stack.url, unique("u"), message), 502)


def test_model_answering_garbage_is_502(stack, unique):
    message = f"{unique('m')} #fake:garbage"
    result = post_chat(stack.url, unique("u"), message)
    assert_json_error(result, 502)
    assert "this is not JSON" not in json.dumps(result[2])


def test_malformed_model_reply_is_logged_by_shape_never_by_content(stack, unique):
    # Issue 12: 512 bytes of a malformed reply went into the log, and a reply
    # is conversation text. The fake answers "<html>this is not JSON {".
    message = f"{unique('m')} #fake:garbage"
    assert_json_error(post_chat(stack.url, unique("u"), message), 502)
    described = [r for r in stack.pool.log_records()
                 if r.get("event") == "model_error" and r.get("upstream_body_shape") == "not_json:markup"]
    assert described, "no model_error line describes the reply"
    assert described[-1]["upstream_body_bytes"] == len("<html>this is not JSON {")
    assert "this is not JSON" not in stack.pool.log_text()


def test_model_slower_than_the_request_deadline_is_504_model_timeout(new_pool, unique):
    frontend = new_pool({"CHATD_REQUEST_DEADLINE_MS": "1500"})
    message = f"{unique('m')} #fake:delay_ms=5000"
    assert_json_error(post_chat(frontend.url, unique("u"), message), 504, "model_timeout")


# --------------------------------------------------------------------------
# Worker processes


def test_killed_worker_is_replaced_and_the_endpoint_keeps_answering(new_pool, unique):
    frontend = new_pool()
    pool = frontend.pool
    before = pool.worker_pids()
    assert len(before) == 2
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    after = poll_until(lambda: (lambda pids: pids if len(pids) == 2 and victim not in pids else None)(
        pool.worker_pids()), RESPAWN_TIMEOUT_S)
    assert after, f"no replacement worker: {pool.worker_pids()}"
    assert set(after) - set(before), "no new worker pid"
    calls = [(frontend.url, unique("u"), unique("m")) for _ in range(8)]
    for (_, _, message), result in zip(calls, concurrently(post_chat, calls, max_workers=4)):
        assert_chat_ok(result, message)


def test_sigterm_lets_requests_in_flight_finish_and_the_pool_exits(stack, new_pool, unique):
    frontend = new_pool(workers=2, threads=4)
    marker = unique("m")
    in_flight = 8  # = workers x threads: every thread holds one
    calls = [(frontend.url, unique("u"), f"{marker} {i} #fake:delay_ms=1500") for i in range(in_flight)]
    results = {}

    def send_all():
        results["all"] = concurrently(post_chat, calls, max_workers=in_flight)

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        # The fake records a request as it arrives: 8 records means all 8 are
        # inside chatd, waiting for the model.
        reached = poll_until(lambda: len(stack.fake.requests(marker)) >= in_flight, IN_FLIGHT_TIMEOUT_S)
        assert reached, f"only {len(stack.fake.requests(marker))} requests reached the model"
        elapsed = frontend.pool.stop(timeout=GRACEFUL_STOP_LIMIT_S + 5)
    finally:
        sender.join()
    assert not frontend.pool.last_stop_forced, "the pool ignored SIGTERM and had to be killed"
    assert elapsed < GRACEFUL_STOP_LIMIT_S
    for (_, _, message), result in zip(calls, results["all"]):
        assert_chat_ok(result, message)
    # With the pool gone, nginx answers for it, still in JSON.
    assert_json_error(post_chat(frontend.url, unique("u"), unique("m")), 502, "upstream_unavailable")


# --------------------------------------------------------------------------
# Logs


def test_each_request_logs_one_json_line_without_the_message_text(stack, unique):
    user = unique("loguser")
    secret = f"my secret message {unique('m')}"
    ok_messages = [f"{secret} {i}" for i in range(2)]
    for message in ok_messages:
        assert_chat_ok(post_chat(stack.url, user, message), message)
    failing = f"{secret} #fake:status=400"
    assert_json_error(post_chat(stack.url, user, failing), 502)

    # Request lines only: other events (warnings about this user) may exist.
    lines = poll_until(lambda: (lambda found: found if len(found) >= 3 else None)(stack.pool.request_lines(user)),
                       LOG_TIMEOUT_S)
    assert lines, f"request lines of {user} missing; log tail:\n{stack.pool.log_text()[-2000:]}"
    assert len(lines) == 3, lines
    for line in lines:
        missing = [f for f in LOG_FIELDS if f not in line]
        assert missing == [], line
        assert isinstance(line["request_id"], str) and line["request_id"], line
        assert isinstance(line["latency_ms"], (int, float)) and line["latency_ms"] >= 0, line
    assert sorted(line["status"] for line in lines) == [200, 200, 502]
    assert len({line["request_id"] for line in lines}) == 3
    for line in lines:
        if line["status"] == 200:
            assert isinstance(line["upstream_ms"], (int, float)) and line["upstream_ms"] >= 0, line
        # Every line here called the model (the 502 too): the time before the
        # call fits in what the model did not take (upstream_ms is rounded down).
        assert 0 <= line["before_model_ms"] <= line["latency_ms"] - line["upstream_ms"], line
    # A replay answers without the model: no time before a call it never made.
    replayed = unique("loguser-replay")
    for _ in range(2):
        assert post_chat(stack.url, replayed, "once", headers={"Idempotency-Key": "k1"})[0] == 200
    pair = poll_until(lambda: (lambda found: found if len(found) >= 2 else None)(stack.pool.request_lines(replayed)),
                      LOG_TIMEOUT_S)
    assert pair and sorted(r["upstream_ms"] >= 0 for r in pair) == [False, True], pair
    for line in pair:
        assert ("before_model_ms" in line) == (line["upstream_ms"] >= 0), line
    assert secret not in stack.pool.log_text()
    assert "my secret message" not in stack.pool.log_text()

