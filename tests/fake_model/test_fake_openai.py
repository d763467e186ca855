"""Tests of the fake OpenAI-compatible server, run as a real subprocess.

    /usr/bin/python3 -m pytest tests/fake_model
"""

import concurrent.futures
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).resolve().with_name("fake_openai.py")
START_TIMEOUT_S = 15.0
POLL_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
# Long enough that a held request cannot complete while a test looks at it.
HOLD_MS = 60000
AUTH = {"Authorization": "Bearer test-key"}


class FakeServer:
    """The server as a subprocess on a free port, found through --port-file."""

    def __init__(self, workdir, *extra_args):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        self.host = "127.0.0.1"
        self.port = None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PYTHON, str(SERVER_SCRIPT), "--host", self.host, "--port", "0",
                 "--port-file", str(self.port_file), *extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.port_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no port file after {START_TIMEOUT_S} s: {self.log()}")
                time.sleep(0.02)
            self.port_text = self.port_file.read_text(encoding="ascii")
            self.port = int(self.port_text)
        except BaseException:
            self.stop()
            raise

    def log(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT_S)

    def raw_socket(self):
        sock = socket.create_connection((self.host, self.port), timeout=HTTP_TIMEOUT_S)
        return sock

    def request(self, method, path, body=None, headers=None, conn=None):
        """Returns (status, headers dict with lower-case names, raw body bytes)."""
        own = conn is None
        conn = conn or self.connect()
        try:
            data = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=dict(headers or {}))
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            if own:
                conn.close()

    def json(self, method, path, body=None, headers=None, conn=None):
        status, _, payload = self.request(method, path, body, headers, conn)
        return status, json.loads(payload)

    def chat(self, content, messages=None, headers=AUTH, conn=None, path="/v1/chat/completions"):
        messages = list(messages or []) + [{"role": "user", "content": content}]
        return self.json("POST", path, {"model": "fake-chat", "messages": messages}, headers, conn)

    def stats(self, conn=None):
        status, doc = self.json("GET", "/_fake/stats", conn=conn)
        assert status == 200
        return doc


def wait_for(predicate, what):
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def raw_chat_request(content, extra_headers=b""):
    body = json.dumps({"model": "fake-chat", "messages": [{"role": "user", "content": content}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra_headers)
            + body)


def read_response(reader):
    """Reads one response from a socket file; returns (status, headers, body)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = reader.readline()
        assert line, "connection closed inside headers"
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return status, headers, body


def unique(tag):
    return f"{tag}-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = FakeServer(tmp_path_factory.mktemp("fake"), "--quiet")
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------
# Start-up and lifecycle

def test_port_file_is_complete_and_alone(server):
    assert server.port_text == f"{server.port}\n"
    assert sorted(p.name for p in server.workdir.iterdir()) == ["port", "server.log"]


def test_health_and_models(server):
    assert server.json("GET", "/_fake/health") == (200, {"ok": True})
    status, doc = server.json("GET", "/v1/models", headers=AUTH)
    assert status == 200
    assert doc["object"] == "list"
    assert doc["data"] and all(m["object"] == "model" and isinstance(m["id"], str) for m in doc["data"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero_with_pending_request(tmp_path, sig):
    srv = FakeServer(tmp_path, "--quiet")
    sock = None
    try:
        sock = srv.raw_socket()
        sock.sendall(raw_chat_request(f"held #fake:delay_ms={HOLD_MS}"))
        wait_for(lambda: srv.stats()["in_flight"] == 1, "the held request")
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=10) == 0
    finally:
        if sock:
            sock.close()
        srv.stop()


def test_cli_delay_and_logs_without_contents(tmp_path):
    srv = FakeServer(tmp_path, "--delay-ms", "50")
    secret = unique("secret-content")
    try:
        assert srv.json("GET", "/_fake/config") == (200, {"delay_ms": 50, "chunk_delay_ms": 0})
        status, doc = srv.chat(secret)
        assert status == 200
        assert doc["choices"][0]["message"]["content"].endswith(f"last_user={secret}")
        status, _ = srv.chat(f"{secret} #fake:status=500")
        assert status == 500
        srv.stop()
        assert srv.proc.returncode == 0
        log = srv.log()
        assert "listening on" in log and "/v1/chat/completions" in log
        assert secret not in log
    finally:
        srv.stop()


# ---------------------------------------------------------------------------
# Chat completions

def test_chat_reply_shape_and_content(server):
    text = unique("What   is the\tweather")
    history = [{"role": "system", "content": "be brief"},
               {"role": "user", "content": "earlier question"},
               {"role": "assistant", "content": "earlier answer here"}]
    before = time.time()
    status, doc = server.chat(text, history)
    assert status == 200
    assert set(doc) == {"id", "object", "created", "model", "choices", "usage"}
    assert doc["id"].startswith("chatcmpl-fake-")
    assert doc["object"] == "chat.completion"
    assert doc["model"] == "fake-chat"
    assert isinstance(doc["created"], int) and doc["created"] >= int(before) - 1
    content = f"[fake] messages=4 roles=system,user,assistant,user last_user={text}"
    assert doc["choices"] == [{"index": 0, "message": {"role": "assistant", "content": content},
                               "finish_reason": "stop"}]
    prompt = 2 + 2 + 3 + 4
    completion = len(content.split())
    assert doc["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}


def test_chat_ids_differ_and_path_without_v1(server):
    status1, doc1 = server.chat("one")
    status2, doc2 = server.chat("two", path="/chat/completions")
    assert (status1, status2) == (200, 200)
    assert doc1["id"] != doc2["id"]
    assert doc2["choices"][0]["message"]["content"] == "[fake] messages=1 roles=user last_user=two"


def test_chat_accepts_token_limits(server):
    for name in ("max_completion_tokens", "max_tokens"):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: 16}
        status, doc = server.json("POST", "/v1/chat/completions", body, AUTH)
        assert status == 200, doc


def user(content):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": user("hi")}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": user("hi"), "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "m", "messages": user("hi"), "max_tokens": "9"}, "max_tokens"),
    ({"model": "m", "messages": user("hi"), "stream": "yes"}, "stream"),
    ({"model": "m", "messages": user("hi #fake:nonsense")}, "messages"),
    ({"model": "m", "messages": user("hi #fake:status=abc")}, "messages"),
    ({"model": "m", "messages": user("hi #fake:drop=1")}, "messages"),
])
def test_chat_invalid_requests(server, body, param):
    status, doc = server.json("POST", "/v1/chat/completions", body, AUTH)
    assert status == 400
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] is None
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert doc["error"]["param"] == param


# ---------------------------------------------------------------------------
# Streaming

def stream_chat(server, content, include_usage=True, conn=None):
    """A streamed chat; returns (status, headers, [event data strings])."""
    body = {"model": "fake-chat", "messages": user(content), "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    status, headers, payload = server.request("POST", "/v1/chat/completions", body, AUTH, conn)
    events = [block[len("data: "):] for block in payload.decode().split("\n\n") if block]
    return status, headers, events


def test_stream_has_the_openai_chunk_shape_and_the_same_text(server):
    content = unique("streamed") + " three more words"
    status, headers, events = stream_chat(server, content)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    # One chunk per word, and together exactly the reply the non-streamed call gives.
    assert len(chunks) - 3 == len(text.split())
    status, doc = server.chat(content)
    assert status == 200
    assert text == doc["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == doc["usage"]


def test_stream_without_include_usage_has_no_usage(server):
    status, _, events = stream_chat(server, unique("no-usage"), include_usage=False)
    assert status == 200
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_stream_chunk_delay_holds_the_rest_and_records_progress(server):
    content = unique("slow-stream") + f" #fake:chunk_delay_ms={HOLD_MS}"
    with server.raw_socket() as sock:
        body = json.dumps({"model": "m", "messages": user(content), "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        while reader.readline() != b"\r\n":
            pass
        size = int(reader.readline(), 16)
        first = reader.read(size + 2)
        assert b'"role":"assistant"' in first
        _, doc = server.json("GET", "/_fake/streams?" + urllib.parse.urlencode({"contains": content}))
        [record] = doc["streams"]
        assert record["state"] == "streaming"
        assert record["events_sent"] == 1 and record["events_total"] > 2
        reader.close()  # the socket's fd stays open while its file is
    # The client left: the fake records the abort, as a model would stop generating.
    def aborted():
        _, doc = server.json("GET", "/_fake/streams?" + urllib.parse.urlencode({"contains": content}))
        return doc["streams"][0]["state"] == "aborted"
    wait_for(aborted, "the stream to be recorded as aborted")
    assert server.stats()["streams"]["aborted"] >= 1


def test_stream_records_when_its_first_piece_of_text_left(server):
    # The bench subtracts this from a chatd client's wait; the delay before
    # the first text chunk (after the role chunk) must show in it.
    content = unique("first-piece") + " #fake:chunk_delay_ms=50"
    status, _, events = stream_chat(server, content)
    assert status == 200 and events[-1] == "[DONE]"
    _, doc = server.json("GET", "/_fake/streams?" + urllib.parse.urlencode({"contains": content}))
    [record] = doc["streams"]
    assert record["first_content_ms"] is not None
    assert record["first_content_ms"] - record["received_ms"] >= 50


def test_stream_error_after_sends_an_error_object_without_done(server):
    content = unique("stream-error") + " #fake:stream_error_after=1 #fake:error_code=boom"
    status, _, events = stream_chat(server, content)
    assert status == 200
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "boom" and last["error"]["type"] == "server_error"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert contents == ["", "[fake] "]  # the role chunk, then exactly one piece
    _, doc = server.json("GET", "/_fake/streams?" + urllib.parse.urlencode({"contains": content}))
    assert doc["streams"][0]["state"] == "failed"


def test_stream_drop_after_closes_mid_stream(server):
    content = unique("stream-drop") + " #fake:stream_drop_after=2"
    conn = server.connect()
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "m", "messages": user(content), "stream": True}), headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    _, doc = server.json("GET", "/_fake/streams?" + urllib.parse.urlencode({"contains": content}))
    assert doc["streams"][0]["state"] == "dropped"
    assert doc["streams"][0]["events_sent"] == 2


def test_stream_faults_obey_fail_times(server):
    content = unique("stream-fail-once") + " #fake:stream_error_after=0 #fake:fail_times=1"
    _, _, first = stream_chat(server, content)
    _, _, second = stream_chat(server, content)
    assert "error" in json.loads(first[-1])
    assert second[-1] == "[DONE]"


def test_keep_alive_serves_a_request_after_a_stream(server):
    conn = server.connect()
    try:
        status, _, events = stream_chat(server, unique("ka-stream"), conn=conn)
        assert status == 200 and events[-1] == "[DONE]"
        status, doc = server.chat("after the stream", conn=conn)
        assert status == 200 and doc["choices"][0]["message"]["content"].endswith("after the stream")
    finally:
        conn.close()


def test_global_chunk_delay_config_and_cli(tmp_path):
    srv = FakeServer(tmp_path / "chunky", "--quiet", "--chunk-delay-ms", "7")
    try:
        assert srv.json("GET", "/_fake/config") == (200, {"delay_ms": 0, "chunk_delay_ms": 7})
        assert srv.json("POST", "/_fake/config", {"chunk_delay_ms": 0}) == (200, {"delay_ms": 0, "chunk_delay_ms": 0})
        status, doc = srv.json("POST", "/_fake/config", {"chunk_delay_ms": -1})
        assert status == 400
    finally:
        srv.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                                     {"Authorization": "bearer abc"}])
def test_chat_needs_bearer_key(server, headers):
    status, doc = server.chat("hi", headers=headers)
    assert status == 401
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------
# Fault injection

def test_status_429_with_retry_after_and_code(server):
    text = unique("quota") + " #fake:status=429 #fake:retry_after=7 #fake:error_code=insufficient_quota"
    status, headers, payload = server.request(
        "POST", "/v1/chat/completions", {"model": "m", "messages": user(text)}, AUTH)
    assert status == 429
    assert headers["retry-after"] == "7"
    error = json.loads(payload)["error"]
    assert error["code"] == "insufficient_quota"
    assert error["type"] == "insufficient_quota"
    assert error["message"]


def test_status_without_retry_after(server):
    status, headers, payload = server.request(
        "POST", "/v1/chat/completions", {"model": "m", "messages": user("x #fake:status=429")}, AUTH)
    assert status == 429
    assert "retry-after" not in headers
    assert json.loads(payload)["error"]["code"] is None


def test_fail_times_counts_per_message(server):
    text = unique("flaky") + " #fake:status=503 #fake:fail_times=2"
    other = unique("flaky") + " #fake:status=503 #fake:fail_times=1"
    statuses = [server.chat(text)[0] for _ in range(2)]
    assert server.chat(other)[0] == 503  # an independent counter
    statuses += [server.chat(text)[0] for _ in range(2)]
    assert statuses == [503, 503, 200, 200]
    assert server.chat(other)[0] == 200
    status, doc = server.chat(text)
    assert doc["choices"][0]["message"]["content"].endswith(f"last_user={text}")


def test_drop_closes_without_response(server):
    before = server.stats()["dropped"]
    conn = server.connect()
    try:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            server.chat("bye #fake:drop", conn=conn)
    finally:
        conn.close()
    assert server.stats()["dropped"] == before + 1


def test_drop_with_fail_times_then_success(server):
    text = unique("drop-once") + " #fake:drop #fake:fail_times=1"
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        server.chat(text)
    assert server.chat(text)[0] == 200


def test_garbage_body(server):
    status, _, payload = server.request(
        "POST", "/v1/chat/completions", {"model": "m", "messages": user("x #fake:garbage")}, AUTH)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(payload)


def test_empty_choices(server):
    status, doc = server.chat("x #fake:empty_choices")
    assert status == 200
    assert doc["choices"] == []
    assert doc["object"] == "chat.completion"


def test_only_last_user_message_carries_directives(server):
    history = [{"role": "user", "content": "old #fake:status=500"},
               {"role": "assistant", "content": "#fake:drop"}]
    status, doc = server.chat("fine", history)
    assert status == 200
    assert doc["choices"][0]["message"]["content"].endswith("last_user=fine")


def test_delayed_request_is_held_and_client_can_leave(server):
    before = server.stats()
    with server.raw_socket() as sock:
        sock.sendall(raw_chat_request(unique("held") + f" #fake:delay_ms={HOLD_MS}"))
        wait_for(lambda: server.stats()["in_flight"] == before["in_flight"] + 1, "the held request")
    after = wait_for(lambda: (lambda s: s if s["in_flight"] == before["in_flight"] else None)(server.stats()),
                     "the abandoned request to be released")
    assert after["abandoned"] == before["abandoned"] + 1


def test_global_delay_config(server):
    assert server.json("GET", "/_fake/config") == (200, {"delay_ms": 0, "chunk_delay_ms": 0})
    assert server.json("POST", "/_fake/config", {"delay_ms": HOLD_MS}) == (200, {"delay_ms": HOLD_MS,
                                                                               "chunk_delay_ms": 0})
    try:
        assert server.json("GET", "/_fake/config") == (200, {"delay_ms": HOLD_MS, "chunk_delay_ms": 0})
        base = server.stats()["in_flight"]
        with server.raw_socket() as sock:
            sock.sendall(raw_chat_request(unique("globally-delayed")))
            wait_for(lambda: server.stats()["in_flight"] == base + 1, "the globally delayed request")
            # Its own directive overrides the global delay, or this would wait a minute.
            status, doc = server.chat(unique("own") + " #fake:delay_ms=0")
            assert status == 200
            # Embeddings are not chat requests: no global delay.
            status, _ = server.json("POST", "/v1/embeddings", {"model": "e", "input": "x"}, AUTH)
            assert status == 200
    finally:
        assert server.json("POST", "/_fake/config", {"delay_ms": 0}) == (200, {"delay_ms": 0, "chunk_delay_ms": 0})


@pytest.mark.parametrize("body", [{"delay_ms": -1}, {"delay_ms": "5"}, {"delay": 5}, [1]])
def test_config_rejects_bad_values(server, body):
    status, doc = server.json("POST", "/_fake/config", body)
    assert status == 400
    assert doc["error"]["type"] == "invalid_request_error"
    assert server.json("GET", "/_fake/config") == (200, {"delay_ms": 0, "chunk_delay_ms": 0})


def test_300_concurrent_delayed_requests(server):
    count = 300

    def one(i):
        status, doc = server.chat(f"concurrent-{i} #fake:delay_ms=1000")
        return status, doc["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(one, range(count)))
    for i, (status, content) in enumerate(results):
        assert status == 200
        assert content.endswith(f"last_user=concurrent-{i} #fake:delay_ms=1000")
    stats = server.stats()
    assert stats["in_flight"] == 0
    # Serialised handling would never hold two at once; all 300 at once is the
    # usual case but depends on how fast this machine starts 300 threads.
    assert stats["max_in_flight"] >= 2


# ---------------------------------------------------------------------------
# Recording and stats

def test_recording_filter_and_clear(server):
    token = unique("ünï cödé+&=")
    other = unique("unrelated")
    before_ms = int(time.time() * 1000)
    server.chat(f"first {token}")
    server.chat(other)
    server.chat(f"second {token}", headers={})
    after_ms = int(time.time() * 1000)
    query = urllib.parse.urlencode({"contains": token})
    status, doc = server.json("GET", f"/_fake/requests?{query}")
    assert status == 200
    # When each arrived, in the same order: wall clock, ms.
    assert len(doc["received_ms"]) == 2
    assert before_ms <= doc["received_ms"][0] <= doc["received_ms"][1] <= after_ms
    assert doc["requests"] == [
        {"model": "fake-chat", "messages": user(f"first {token}"), "authorization_present": True},
        {"model": "fake-chat", "messages": user(f"second {token}"), "authorization_present": False},
    ]
    status, doc = server.json("GET", f"/_fake/requests?contains={urllib.parse.quote(token)}")
    assert len(doc["requests"]) == 2
    status, doc = server.json("GET", "/_fake/requests")
    assert len(doc["requests"]) >= 3
    assert doc["requests"][-2]["messages"] == user(other)
    status, _ = server.json("DELETE", "/_fake/requests")
    assert status == 200
    assert server.json("GET", "/_fake/requests") == (200, {"requests": [], "received_ms": []})


def test_recording_keeps_the_last_20000(server):
    tag = unique("ring")
    total = 20001
    server.json("DELETE", "/_fake/requests")
    requests = b"".join(raw_chat_request(f"{tag}-{i:05d}") for i in range(total))
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        # Sent from a thread: the server stops reading while we are not reading.
        sender = threading.Thread(target=sock.sendall, args=(requests,))
        sender.start()
        try:
            statuses = {read_response(reader)[0] for _ in range(total)}
        finally:
            sender.join()
    assert statuses == {200}
    status, doc = server.json("GET", "/_fake/requests")
    assert len(doc["requests"]) == 20000
    assert doc["requests"][0]["messages"] == user(f"{tag}-00001")
    assert doc["requests"][-1]["messages"] == user(f"{tag}-{total - 1:05d}")
    assert server.json("GET", f"/_fake/requests?contains={tag}-00000") == (200, {"requests": [], "received_ms": []})
    server.json("DELETE", "/_fake/requests")


def test_recording_filters_on_last_user_message_only(server):
    token = unique("history-only")
    server.chat("now", [{"role": "user", "content": token}, {"role": "assistant", "content": token}])
    assert server.json("GET", f"/_fake/requests?contains={token}") == (200, {"requests": [], "received_ms": []})


def test_stats_count_requests_and_statuses(server):
    before = server.stats()
    server.chat("ok")
    server.chat("limited #fake:status=429")
    server.json("POST", "/v1/embeddings", {"model": "e", "input": ["a", "b"]}, AUTH)
    server.json("GET", "/_fake/health")
    after = server.stats()
    assert after["chat_requests"] == before["chat_requests"] + 2
    assert after["embedding_requests"] == before["embedding_requests"] + 1
    counts_before, counts_after = before["status_counts"], after["status_counts"]
    assert counts_after["200"] == counts_before.get("200", 0) + 2
    assert counts_after["429"] == counts_before.get("429", 0) + 1
    assert after["in_flight"] == 0
    assert after["max_in_flight"] >= 1


# ---------------------------------------------------------------------------
# HTTP layer

def test_keep_alive_reuses_one_connection(server):
    conn = server.connect()
    try:
        first = server.stats(conn)
        sock = conn.sock
        for i in range(20):
            status, doc = server.chat(f"keep {i}", conn=conn)
            assert status == 200
            assert conn.sock is sock
        last = server.stats(conn)
        assert conn.sock is sock
        assert last["connections_total"] == first["connections_total"]
    finally:
        conn.close()


def test_connection_close_is_honoured(server):
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.sendall(raw_chat_request("closing", b"Connection: close\r\n"))
        status, headers, _ = read_response(reader)
        assert status == 200
        assert headers["connection"] == "close"
        assert reader.read() == b""


def test_http10_closes_by_default(server):
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.sendall(b"GET /_fake/health HTTP/1.0\r\n\r\n")
        status, _, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"ok": True})
        assert reader.read() == b""


def test_pipelined_requests_answer_in_order(server):
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.sendall(raw_chat_request("slow #fake:delay_ms=200") + raw_chat_request("fast")
                     + b"GET /_fake/health HTTP/1.1\r\n\r\n")
        contents = []
        for _ in range(2):
            status, _, body = read_response(reader)
            assert status == 200
            contents.append(json.loads(body)["choices"][0]["message"]["content"])
        assert contents == ["[fake] messages=1 roles=user last_user=slow #fake:delay_ms=200",
                            "[fake] messages=1 roles=user last_user=fast"]
        assert read_response(reader)[0] == 200


def test_expect_100_continue(server):
    body = json.dumps({"model": "m", "messages": user("x" * 5000)}).encode()
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer k\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        sock.sendall(body)
        status, _, payload = read_response(reader)
        assert status == 200
        assert json.loads(payload)["choices"][0]["message"]["content"].endswith("x" * 5000)


def test_body_split_across_packets(server):
    request = raw_chat_request("split body")
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(request), 7):
            sock.sendall(request[i:i + 7])
        status, _, payload = read_response(reader)
        assert status == 200
        assert json.loads(payload)["choices"][0]["message"]["content"].endswith("last_user=split body")


@pytest.mark.parametrize("raw, expected", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /_fake/health HTTP/2.0\r\n\r\n", 505),
    (b"GET /_fake/health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413),
    (b"GET /_fake/health HTTP/1.1\r\nX-Big: " + b"a" * 300000 + b"\r\n\r\n", 431),
])
def test_malformed_http_gets_error_and_close(server, raw, expected):
    with server.raw_socket() as sock, sock.makefile("rb") as reader:
        sock.sendall(raw)
        status, headers, body = read_response(reader)
        assert status == expected
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["message"]
        assert reader.read() == b""
    assert server.json("GET", "/_fake/health") == (200, {"ok": True})


def test_unknown_path_and_wrong_method(server):
    status, doc = server.json("GET", "/v2/nothing")
    assert status == 404
    assert doc["error"]["type"] == "invalid_request_error"
    status, headers, payload = server.request("GET", "/v1/chat/completions", headers=AUTH)
    assert status == 405
    assert headers["allow"] == "POST"
    assert json.loads(payload)["error"]["message"]


# ---------------------------------------------------------------------------
# Embeddings, against an independent straightforward implementation.

def ref_fnv1a64(data):
    h = 14695981039346656037
    for byte in data:
        h ^= byte
        h = (h * 1099511628211) % (2 ** 64)
    return h


def ref_tokens(data):
    tokens, current = [], []
    for byte in data:
        if 65 <= byte <= 90:
            byte += 32
        if 48 <= byte <= 57 or 97 <= byte <= 122 or byte >= 0x80:
            current.append(byte)
        elif current:
            tokens.append(bytes(current))
            current = []
    if current:
        tokens.append(bytes(current))
    return tokens


def ref_embed(text, dims):
    vec = [0.0] * dims

    def add(feature, weight):
        h = ref_fnv1a64(feature)
        vec[h % dims] += -weight if h >= 2 ** 63 else weight

    for token in ref_tokens(text.encode("utf-8")):
        add(b"w:" + token, 1.0)
        framed = b"^" + token + b"$"
        for start in range(len(framed) - 2):
            add(b"c:" + framed[start:start + 3], 0.5)
    norm = math.sqrt(sum(x * x for x in vec))
    if norm == 0:
        return [1.0] + [0.0] * (dims - 1)
    return [x / norm for x in vec]


def test_reference_fnv_matches_published_vectors():
    # From the FNV reference test suite (isthe.com/chongo/tech/comp/fnv).
    assert ref_fnv1a64(b"") == 0xcbf29ce484222325
    assert ref_fnv1a64(b"a") == 0xaf63dc4c8601ec8c
    assert ref_fnv1a64(b"foobar") == 0x85944171f73967e8


def test_reference_tokens():
    assert ref_tokens("Hi, THERE x2-y_z é!".encode()) == [b"hi", b"there", b"x2", b"y", b"z", "é".encode()]


def embed_via_server(server, inputs, dimensions=None):
    body = {"model": "fake-embedding", "input": inputs}
    if dimensions is not None:
        body["dimensions"] = dimensions
    status, doc = server.json("POST", "/v1/embeddings", body, AUTH)
    assert status == 200, doc
    return doc


EMBED_TEXTS = ["Hello, World!", "a", "", "  ...  ", "ÀB ÇD café naïve 42 x2", "日本語のテキスト",
               "MiXeD-CaSe_words and digits 12345", "🙂 ok", "the cat sat on the mat"]


@pytest.mark.parametrize("dims", [None, 7, 256])
def test_embeddings_match_reference(server, dims):
    doc = embed_via_server(server, EMBED_TEXTS, dims)
    expected_dims = 1536 if dims is None else dims
    assert doc["object"] == "list"
    assert doc["model"] == "fake-embedding"
    assert [d["index"] for d in doc["data"]] == list(range(len(EMBED_TEXTS)))
    for text, item in zip(EMBED_TEXTS, doc["data"]):
        assert item["object"] == "embedding"
        vec = item["embedding"]
        assert len(vec) == expected_dims
        assert vec == pytest.approx(ref_embed(text, expected_dims), abs=1e-12), text
        assert math.sqrt(sum(x * x for x in vec)) == pytest.approx(1.0, abs=1e-9)


def test_embedding_fixed_vector(server):
    # Pinned so the C++ LocalEmbed can share the expectation: "hello" has the
    # word feature and 5 trigrams (^he hel ell llo lo$) landing in 4 buckets.
    vec = embed_via_server(server, "Hello", 4)["data"][0]["embedding"]
    assert vec == pytest.approx([-2 / 3, -1 / 3, 0.0, 2 / 3], abs=1e-12)
    assert embed_via_server(server, "", 3)["data"][0]["embedding"] == [1.0, 0.0, 0.0]


def test_embedding_single_string_and_usage(server):
    doc = embed_via_server(server, "three little words")
    assert len(doc["data"]) == 1
    assert doc["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_recall_similar_text(server):
    vecs = [d["embedding"] for d in embed_via_server(
        server, ["the cat sat on the mat", "a cat on a mat", "quarterly revenue report"], 256)["data"]]

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cosine(vecs[0], vecs[1]) > cosine(vecs[0], vecs[2])


@pytest.mark.parametrize("body", [
    {"model": "e"},
    {"model": "e", "input": []},
    {"model": "e", "input": [1, 2]},
    {"model": "e", "input": ["ok", None]},
    {"model": "e", "input": "x", "dimensions": 0},
    {"model": "e", "input": "x", "dimensions": "8"},
    {"model": "e", "input": "x", "encoding_format": "base64"},
    {"input": "x"},
])
def test_embeddings_invalid_requests(server, body):
    status, doc = server.json("POST", "/v1/embeddings", body, AUTH)
    assert status == 400
    assert doc["error"]["type"] == "invalid_request_error"


def test_embeddings_need_bearer_key(server):
    status, doc = server.json("POST", "/v1/embeddings", {"model": "e", "input": "x"})
    assert status == 401
    assert doc["error"]["code"] == "invalid_api_key"


def test_embeddings_directives(server):
    text = unique("embed-flaky") + " #fake:status=503 #fake:fail_times=1 #fake:retry_after=2"
    status, headers, payload = server.request(
        "POST", "/embeddings", {"model": "e", "input": ["plain", text]}, AUTH)
    assert status == 503
    assert headers["retry-after"] == "2"
    assert json.loads(payload)["error"]["type"] == "server_error"
    doc = embed_via_server(server, ["plain", text], 8)
    assert len(doc["data"]) == 2


def test_embeddings_delay_directive_holds(server):
    base = server.stats()["in_flight"]
    with server.raw_socket() as sock:
        body = json.dumps({"model": "e", "input": f"x #fake:delay_ms={HOLD_MS}"}).encode()
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer k\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: server.stats()["in_flight"] == base + 1, "the held embedding request")
    wait_for(lambda: server.stats()["in_flight"] == base, "the held embedding request to go")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
