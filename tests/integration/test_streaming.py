"""Streamed replies (server-sent events) end to end: curl-like clients through
nginx and the chatd pool to the fake model, which streams in the OpenAI chunk
format (docs/api.md, "Streaming").

Ordering, not time: where a test needs "before the model finished", it asks
the fake (/_fake/streams) whether its last chunk has been sent yet.
"""

import http.client
import json
import urllib.parse

from harness.stack import http_json, poll_until, post_chat, scrape_metrics

# Bound of every poll below; far above what it takes on an idle machine.
POLL_TIMEOUT_S = 15
STREAM_HTTP_TIMEOUT_S = 60
# A pause between the model's chunks long enough that the whole reply cannot
# be out while a test looks at its first piece.
SLOW_CHUNK_MS = 400
# Words that make a reply long: the fake streams one chunk per word.
LONG_TAIL = " ".join(f"w{i}" for i in range(40))


class SseStream:
    """One streamed chat, read event by event as it arrives."""

    def __init__(self, url, user, message, stream_field=True, headers=None):
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=STREAM_HTTP_TIMEOUT_S)
        doc = {"userId": user, "message": message}
        if stream_field is not None:
            doc["stream"] = stream_field
        self.conn.request("POST", "/api/chat", json.dumps(doc).encode(),
                          {"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def next_event(self):
        """(type, parsed data) of the next event, or None at the end of the stream."""
        event_type, data = "message", []
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.rstrip(b"\r\n").decode()
            if not line:
                if data:
                    return event_type, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event_type = value
            elif field == "data":
                data.append(value)

    def rest(self):
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def close(self):
        self.conn.close()


def stream_all(url, user, message, **kwargs):
    s = SseStream(url, user, message, **kwargs)
    try:
        assert s.status == 200, s.resp.read()
        return s, s.rest()
    finally:
        s.close()


def text_of(events):
    return "".join(data["delta"] for kind, data in events if kind == "message" and "delta" in data)


def fake_streams(stack, marker):
    query = urllib.parse.urlencode({"contains": marker})
    status, doc = http_json(f"{stack.fake.base}/_fake/streams?{query}")
    assert status == 200, doc
    return doc["streams"]


# --------------------------------------------------------------------------


def test_streamed_text_equals_the_non_streamed_text(stack, unique):
    message = f"Tell me about streams {unique('m')}"
    status, _, plain = post_chat(stack.url, unique("plain"), message)
    assert status == 200, plain
    s, events = stream_all(stack.url, unique("streamed"), message)
    assert s.headers["content-type"].startswith("text/event-stream")
    deltas = [data for kind, data in events[:-1]]
    assert len(deltas) > 3 and all(set(d) == {"delta"} for d in deltas)  # word by word, not in one piece
    assert text_of(events) == plain["response"]
    kind, done = events[-1]
    assert kind == "message" and done["done"] is True
    assert done["usage"] == plain["usage"]
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0
    assert isinstance(done["turnId"], str) and len(done["turnId"]) == 32


def test_accept_event_stream_asks_for_a_stream_and_rate_headers_come_with_the_200(stack, unique):
    s, events = stream_all(stack.url, unique("u"), f"hi {unique('m')}", stream_field=None,
                           headers={"Accept": "text/event-stream"})
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")
    assert "ratelimit-policy" in s.headers and "ratelimit" in s.headers, s.headers
    assert "content-length" not in s.headers
    assert events[-1][1]["done"] is True


def test_stream_false_in_the_body_wins_over_accept_event_stream(stack, unique):
    body = json.dumps({"userId": unique("u"), "message": f"hi {unique('m')}", "stream": False})
    status, headers, reply = post_chat(stack.url, raw_body=body, headers={"Accept": "text/event-stream"})
    assert status == 200, reply
    assert headers["content-type"].startswith("application/json")
    assert isinstance(reply["response"], str) and reply["response"]


def test_the_first_delta_arrives_before_the_model_has_finished(stack, unique):
    marker = unique("first")
    s = SseStream(stack.url, unique("u"), f"{marker} {LONG_TAIL} #fake:chunk_delay_ms={SLOW_CHUNK_MS}")
    try:
        assert s.status == 200
        kind, first = s.next_event()
        assert kind == "message" and "delta" in first
        # The model is still writing: nginx and chatd passed the piece on at once.
        [record] = fake_streams(stack, marker)
        assert record["state"] == "streaming", record
        assert record["events_sent"] < record["events_total"], record
        events = s.rest()
    finally:
        s.close()
    assert events[-1][1]["done"] is True
    assert fake_streams(stack, marker)[0]["state"] == "completed"


def request_log(stack, user):
    found = []

    def logged():
        found[:] = stack.pool.request_lines(user)
        return bool(found)

    assert poll_until(logged, POLL_TIMEOUT_S), f"no request line for {user}"
    return found


def test_a_streamed_chat_logs_how_its_time_to_the_first_delta_splits_between_chatd_and_the_model(stack, unique):
    user = unique("u")
    _, events = stream_all(stack.url, user, f"{unique('timed')} one two #fake:chunk_delay_ms={SLOW_CHUNK_MS}")
    assert events[-1][1]["done"] is True
    [line] = request_log(stack, user)
    # The fake holds its first text back for a chunk delay, so the model's
    # share is at least that; the time to the first byte holds the model's
    # share and all of the whole reply's time holds both.
    assert line["model_first_delta_ms"] >= SLOW_CHUNK_MS, line
    assert line["latency_ms"] >= line["first_byte_ms"] >= line["model_first_delta_ms"], line
    # An answer in one piece has no first delta to time.
    plain = unique("u")
    status, _, body = post_chat(stack.url, plain, "hello")
    assert status == 200, body
    [line] = request_log(stack, plain)
    assert "first_byte_ms" not in line and "model_first_delta_ms" not in line, line


def test_a_mid_stream_model_failure_ends_with_an_error_event_and_records_nothing(stack, unique):
    user, marker = unique("u"), unique("midfail")
    s, events = stream_all(stack.url, user, f"{marker} one two three #fake:stream_error_after=2")
    assert [kind for kind, _ in events] == ["message", "message", "error"]
    kind, error = events[-1]
    assert error["code"] == "model_error" and isinstance(error["error"], str) and error["error"]
    # Never retried once the client had a piece of the reply.
    assert len(stack.fake.requests(marker)) == 1
    # Nothing of the failed turn is remembered.
    follow = unique("after")
    status, _, body = post_chat(stack.url, user, follow)
    assert status == 200, body
    [prompt] = stack.fake.requests(follow)
    assert all(marker not in m["content"] for m in prompt["messages"])


def test_a_failure_before_the_first_delta_is_retried_then_an_ordinary_json_error(stack, unique):
    marker = unique("retried")
    # One 503, then a good stream: retried, since nothing had reached the client.
    s, events = stream_all(stack.url, unique("u"), f"{marker} #fake:status=503 #fake:fail_times=1")
    assert events[-1][1]["done"] is True
    assert len(stack.fake.requests(marker)) == 2
    # A 400 from the model is not retried and is an ordinary JSON error.
    status, headers, body = post_chat(stack.url, unique("u"), f"{unique('m')} #fake:status=400",
                                      headers={"Accept": "text/event-stream"})
    assert status == 502, body
    assert headers["content-type"].startswith("application/json")
    assert body["code"] == "model_error"


def test_a_client_that_disconnects_aborts_the_model_and_nothing_is_kept(stack, unique):
    user, marker = unique("u"), unique("leaver")
    s = SseStream(stack.url, user, f"{marker} {LONG_TAIL} #fake:chunk_delay_ms={SLOW_CHUNK_MS}")
    try:
        assert s.status == 200
        assert "delta" in s.next_event()[1]
    finally:
        s.close()
    # chatd cut the model off: the fake saw its client leave mid-stream.
    record = poll_until(lambda: next((r for r in fake_streams(stack, marker) if r["state"] != "streaming"), None),
                        POLL_TIMEOUT_S)
    assert record is not None, fake_streams(stack, marker)
    assert record["state"] == "aborted"
    assert record["events_sent"] < record["events_total"]
    follow = unique("after")
    status, _, body = post_chat(stack.url, user, follow)
    assert status == 200, body
    [prompt] = stack.fake.requests(follow)
    assert all(marker not in m["content"] for m in prompt["messages"])


def test_a_stream_that_hits_the_request_deadline_ends_with_model_timeout(new_pool, stack, unique):
    front = new_pool({"CHATD_REQUEST_DEADLINE_MS": "1500"})
    marker = unique("deadline")
    s, events = stream_all(front.url, unique("u"), f"{marker} {LONG_TAIL} #fake:chunk_delay_ms={SLOW_CHUNK_MS}")
    assert events[0][0] == "message" and "delta" in events[0][1]
    kind, error = events[-1]
    assert kind == "error" and error["code"] == "model_timeout", events[-3:]
    assert all("done" not in data for _, data in events)


def test_a_stalled_model_is_retried_before_the_first_delta_then_504(new_pool, stack, unique):
    # The inter-chunk deadline: the model sends its role chunk, then nothing.
    front = new_pool({"CHATD_LLM_STREAM_IDLE_MS": "300", "CHATD_LLM_BACKOFF_BASE_MS": "50",
                      "CHATD_LLM_BACKOFF_MAX_MS": "100"})
    marker = unique("stall")
    status, headers, body = post_chat(front.url, unique("u"), f"{marker} #fake:chunk_delay_ms=60000",
                                      headers={"Accept": "text/event-stream"})
    assert status == 504, body
    assert body["code"] == "model_stalled"
    assert len(stack.fake.requests(marker)) == 3  # the first attempt and CHATD_LLM_MAX_RETRIES (2) retries


def test_a_streamed_turn_is_recalled_by_the_next_request(stack, unique):
    user, first = unique("u"), unique("first")
    _, events = stream_all(stack.url, user, f"My favourite colour is teal {first}")
    streamed_reply = text_of(events)
    assert events[-1][1]["done"] is True
    second = unique("second")
    status, _, body = post_chat(stack.url, user, f"What is my favourite colour? {second}")
    assert status == 200, body
    [prompt] = stack.fake.requests(second)
    contents = [(m["role"], m["content"]) for m in prompt["messages"]]
    assert ("user", f"My favourite colour is teal {first}") in contents
    assert ("assistant", streamed_reply) in contents


def test_tokens_are_counted_in_metrics_for_both_kinds_of_reply(stack, unique):
    before = scrape_metrics(stack.url)
    status, _, plain = post_chat(stack.url, unique("u"), f"count me {unique('m')}")
    assert status == 200, plain
    _, events = stream_all(stack.url, unique("u"), f"count me too {unique('m')}")
    usage = events[-1][1]["usage"]
    want_prompt = plain["usage"]["prompt_tokens"] + usage["prompt_tokens"]
    want_completion = plain["usage"]["completion_tokens"] + usage["completion_tokens"]
    # Other tests may run chats at the same time on the session's pool: at least ours.
    after = poll_until(lambda: (lambda m: m if m["chatd_chat_streams_total"] > before["chatd_chat_streams_total"]
                                else None)(scrape_metrics(stack.url)), POLL_TIMEOUT_S)
    assert after is not None
    assert after["chatd_model_prompt_tokens_total"] - before["chatd_model_prompt_tokens_total"] >= want_prompt
    assert after["chatd_model_completion_tokens_total"] - before["chatd_model_completion_tokens_total"] >= want_completion
