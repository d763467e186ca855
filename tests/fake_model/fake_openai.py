#!/usr/bin/python3
"""A local, deterministic OpenAI-compatible HTTP/1.1 server for tests and benchmarks.

Standard library only (uvloop is used when importable). See README.md next to
this file for the API, the fault-injection directives and measured throughput.

    /usr/bin/python3 tests/fake_model/fake_openai.py --host 127.0.0.1 --port 0 \
        --port-file /tmp/fake.port [--delay-ms N] [--quiet]
"""

import argparse
import asyncio
import collections
import email.utils
import http
import itertools
import json
import math
import os
import re
import resource
import signal
import socket
import sys
import time
import urllib.parse

# ---------------------------------------------------------------------------
# Limits. Generous for a test tool, but bounded so a broken client cannot make
# the server eat the shared machine's memory.
LISTEN_BACKLOG = 4096
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
# While a delayed reply is pending, a pipelining client may keep sending; stop
# reading once this much is buffered so memory stays bounded.
MAX_BLOCKED_BUFFER_BYTES = 1024 * 1024
# After a protocol error, how long to keep discarding what the client still
# sends: closing with unread input sends a RST that can destroy the error reply
# before the client reads it.
LINGER_SECONDS = 2.0
RECORD_RING_SIZE = 20000
# Also bounded by request-body bytes: 20,000 benchmark prompts of 24 KiB would
# otherwise keep about a gigabyte of parsed JSON alive.
RECORD_MAX_BODY_BYTES = 64 * 1024 * 1024
FAIL_COUNTER_LIMIT = 100000
MAX_DELAY_MS = 10 * 60 * 1000
DEFAULT_EMBEDDING_DIMENSIONS = 1536
MAX_EMBEDDING_DIMENSIONS = 16384
# Streams remembered for /_fake/streams, oldest dropped first.
STREAM_RING_SIZE = 20000
# Default pause between two chunks of a streamed reply, unless --chunk-delay-ms
# or the chunk_delay_ms directive says otherwise.
CHUNK_DELAY_ENV = "FAKE_OPENAI_CHUNK_DELAY_MS"

FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211
MASK64 = (1 << 64) - 1

CHAT_ROLES = frozenset(("system", "user", "assistant"))
MODELS = ("fake-chat", "fake-embedding")


# ---------------------------------------------------------------------------
# Embeddings: signed feature hashing, the same algorithm as chatd::LocalEmbed so
# that texts embedded by either side recall each other.

_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
# Applied after lower-casing, so A-Z cannot occur any more.
_TOKEN_RE = re.compile(rb"[a-z0-9\x80-\xff]+")


def _fnv_continue(h, data):
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def fnv1a64(data):
    return _fnv_continue(FNV_OFFSET, data)


# Every feature starts with one of two prefixes: hash them once.
_FNV_WORD = fnv1a64(b"w:")
_FNV_TRIGRAM = fnv1a64(b"c:")


def embed(text, dimensions):
    """L2-normalised signed feature-hash vector of `text` (see README.md)."""
    vec = [0.0] * dimensions
    # surrogatepass: JSON may carry lone surrogates; never crash on them.
    data = text.encode("utf-8", "surrogatepass").translate(_ASCII_LOWER)
    for token in _TOKEN_RE.findall(data):
        h = _fnv_continue(_FNV_WORD, token)
        vec[h % dimensions] += -1.0 if h >> 63 else 1.0
        framed = b"^" + token + b"$"
        for i in range(len(framed) - 2):
            h = _fnv_continue(_FNV_TRIGRAM, framed[i:i + 3])
            vec[h % dimensions] += -0.5 if h >> 63 else 0.5
    norm = math.sqrt(math.fsum(x * x for x in vec))
    if norm == 0.0:
        vec[0] = 1.0
        return vec
    return [x / norm for x in vec]


# ---------------------------------------------------------------------------
# Fault-injection directives ("#fake:name" or "#fake:name=value").

_DIRECTIVE_RE = re.compile(r"#fake:([A-Za-z_]+)(?:=([^\s#]*))?")
_ERROR_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_INT_RE = re.compile(r"[0-9]{1,9}")
_VALUE_DIRECTIVES = {
    "delay_ms": (0, MAX_DELAY_MS),
    "status": (400, 599),
    "retry_after": (0, 86400),
    "retry_after_ms": (0, 86400 * 1000),
    "fail_times": (0, 10 ** 9),
    "chunk_delay_ms": (0, MAX_DELAY_MS),
    "stream_error_after": (0, 10 ** 6),
    "stream_drop_after": (0, 10 ** 6),
}
_FLAG_DIRECTIVES = frozenset(("drop", "garbage", "empty_choices"))


class DirectiveError(ValueError):
    pass


def parse_directives(texts):
    """Returns a dict of the directives found in `texts`, or {} when none."""
    found = {}
    for text in texts:
        if "#fake:" not in text:
            continue
        for match in _DIRECTIVE_RE.finditer(text):
            name, value = match.group(1), match.group(2)
            if name in _FLAG_DIRECTIVES:
                if value is not None:
                    raise DirectiveError(f"fake directive {name} takes no value")
                found[name] = True
            elif name in _VALUE_DIRECTIVES:
                low, high = _VALUE_DIRECTIVES[name]
                if value is None or not _INT_RE.fullmatch(value) or not low <= int(value) <= high:
                    raise DirectiveError(f"fake directive {name} needs an integer in [{low}, {high}]")
                found[name] = int(value)
            elif name == "error_code":
                if value is None or not _ERROR_CODE_RE.fullmatch(value):
                    raise DirectiveError("fake directive error_code needs a value of [A-Za-z0-9_.-]")
                found[name] = value
            else:
                raise DirectiveError(f"unknown fake directive {name}")
    return found


# ---------------------------------------------------------------------------
# HTTP plumbing.

_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, _REASONS.get(code, b"Status")) for code in range(100, 600)
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CONN_KEEP = b"Connection: keep-alive\r\n"
_CONN_CLOSE = b"Connection: close\r\n"
_SERVER = b"Server: fake-openai\r\n"
_JSON_TYPE = b"Content-Type: application/json\r\n"
_METHOD_RE = re.compile(rb"[A-Z]{1,16}")
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode

_date_second = -1
_date_header = b""


def _date():
    global _date_second, _date_header
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_header = b"Date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode("ascii")
    return _date_header


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    __slots__ = ("method", "path", "query", "keep_alive", "headers", "content_length", "expect_continue")


def parse_head(head):
    """Parses the request line and headers (bytes, without the final CRLFCRLF)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    elif version.startswith(b"HTTP/"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    else:
        raise HttpError(400, "malformed request line")
    if not _METHOD_RE.fullmatch(method):
        raise HttpError(400, "malformed method")
    if target.startswith((b"http://", b"https://")):
        slash = target.find(b"/", target.find(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        raise HttpError(400, "malformed request target")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1] in b" \t" or name[0] in b" \t":
            raise HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip(b" \t")
        old = headers.get(name)
        if old is None:
            headers[name] = value
        elif name == b"content-length":
            if old != value:
                raise HttpError(400, "conflicting Content-Length headers")
        else:
            headers[name] = old + b", " + value
    if b"transfer-encoding" in headers:
        raise HttpError(411, "Transfer-Encoding is not supported; send Content-Length")
    length = headers.get(b"content-length")
    if length is None:
        content_length = 0
    elif length.isdigit() and len(length) <= 12:
        content_length = int(length)
    else:
        raise HttpError(400, "malformed Content-Length")
    if content_length > MAX_BODY_BYTES:
        raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    connection = headers.get(b"connection")
    if connection is not None:
        tokens = connection.lower()
        if b"close" in tokens:
            keep_alive = False
        elif b"keep-alive" in tokens:
            keep_alive = True
    req = Request()
    req.method = method.decode("ascii")
    path, _, query = target.partition(b"?")
    req.path = path.decode("latin-1")
    req.query = query
    req.keep_alive = keep_alive
    req.headers = headers
    req.content_length = content_length
    expect = headers.get(b"expect")
    req.expect_continue = (version == b"HTTP/1.1" and expect is not None
                           and expect.lower() == b"100-continue")
    return req


class Reply:
    """One response, or a dropped connection, possibly after a delay."""
    __slots__ = ("status", "body", "headers", "delay", "drop", "api", "stream")

    def __init__(self, status, body, headers=(), delay=0.0, drop=False, api=False, stream=None):
        self.status = status
        self.body = body
        self.headers = headers
        self.delay = delay
        self.drop = drop
        self.api = api
        self.stream = stream  # a Stream: the body is sent as server-sent events instead


class Stream:
    """A streamed chat reply: SSE events sent one HTTP chunk each, `chunk_delay`
    seconds apart. `record` is what /_fake/streams shows about it."""
    __slots__ = ("events", "chunk_delay", "drop_after", "record")

    def __init__(self, events, chunk_delay, drop_after, record):
        self.events = events
        self.chunk_delay = chunk_delay
        self.drop_after = drop_after  # close the connection after this many events (None: never)
        self.record = record


def sse_event(obj):
    return b"data: " + (obj if isinstance(obj, bytes) else _dumps(obj).encode("ascii")) + b"\n\n"


def split_words(text):
    """The pieces a reply is streamed in: each word with the spaces after it."""
    return re.findall(r"\S+\s*|\s+", text)


def json_reply(status, obj, headers=()):
    return Reply(status, _dumps(obj).encode("ascii"), headers)


def openai_error(status, message, err_type=None, code=None, param=None, headers=()):
    if err_type is None:
        err_type = _default_error_type(status, code)
    return json_reply(status, {"error": {"message": message, "type": err_type, "param": param,
                                         "code": code}}, headers)


def _default_error_type(status, code):
    if status == 429:
        return "insufficient_quota" if code == "insufficient_quota" else "requests"
    if status >= 500:
        return "server_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error"


def invalid(message, param=None):
    return openai_error(400, message, "invalid_request_error", None, param)


def _contains_query(req):
    """The ?contains= filter of the recording endpoints: (text, None) or (None, error reply)."""
    try:
        query = urllib.parse.parse_qs(req.query.decode("latin-1"), keep_blank_values=True,
                                      encoding="utf-8", errors="strict")
    except (ValueError, UnicodeDecodeError):
        return None, invalid("malformed query string")
    return query.get("contains", [""])[-1], None


def _word_count(text):
    return len(text.split())


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# The fake API.

class FakeOpenAI:
    def __init__(self, delay_ms, quiet, chunk_delay_ms=0):
        self.delay_ms = delay_ms
        self.chunk_delay_ms = chunk_delay_ms
        self.streams = collections.deque(maxlen=STREAM_RING_SIZE)
        self.stream_counts = {"completed": 0, "aborted": 0, "failed": 0, "dropped": 0}
        self.quiet = quiet
        self.connections = set()
        self.records = collections.deque()  # (last user message, body, body bytes, received at, ms since epoch)
        self.record_bytes = 0
        self.fail_counts = collections.OrderedDict()
        self.ids = itertools.count(1)
        self.chat_requests = 0
        self.embedding_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.status_counts = {}
        self.dropped = 0
        self.abandoned = 0
        self.connections_total = 0
        self.routes = {
            "/v1/chat/completions": {"POST": self.chat},
            "/chat/completions": {"POST": self.chat},
            "/v1/embeddings": {"POST": self.embeddings},
            "/embeddings": {"POST": self.embeddings},
            "/v1/models": {"GET": self.models},
            "/models": {"GET": self.models},
            "/_fake/config": {"GET": self.get_config, "POST": self.set_config},
            "/_fake/requests": {"GET": self.get_requests, "DELETE": self.clear_requests},
            "/_fake/stats": {"GET": self.stats},
            "/_fake/streams": {"GET": self.get_streams},
            "/_fake/health": {"GET": self.health},
        }

    # -- dispatch and accounting ------------------------------------------

    def handle(self, req, body):
        methods = self.routes.get(req.path)
        if methods is None:
            return openai_error(404, f"unknown path {req.path}", "invalid_request_error", "unknown_url")
        handler = methods.get(req.method)
        if handler is None:
            allow = ", ".join(sorted(methods)).encode("ascii")
            return openai_error(405, f"method {req.method} not allowed on {req.path}",
                                headers=(b"Allow: " + allow + b"\r\n",))
        try:
            return handler(req, body)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the server
            # Only the type: the message could quote a request's content.
            self.log(f"internal error in {req.path}: {type(exc).__name__}")
            return openai_error(500, "internal error in fake server")

    def begin_api(self, reply):
        reply.api = True
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        return reply

    def end_api(self, reply, outcome):
        """outcome: 'sent', 'dropped' or 'abandoned' (the client left first)."""
        if not reply.api:
            return
        reply.api = False
        self.in_flight -= 1
        if outcome == "sent":
            key = str(reply.status)
            self.status_counts[key] = self.status_counts.get(key, 0) + 1
        elif outcome == "dropped":
            self.dropped += 1
        else:
            self.abandoned += 1

    def end_stream(self, stream, state):
        """state: 'completed', 'failed' (an error event), 'dropped' or 'aborted' (the client left)."""
        if stream.record["state"] == "streaming":
            stream.record["state"] = state
            self.stream_counts[state] += 1

    def log(self, line):
        if not self.quiet:
            sys.stderr.write(f"fake_openai: {line}\n")

    def _record(self, last_user, doc, size):
        records = self.records
        records.append((last_user, doc, size, int(time.time() * 1000)))
        self.record_bytes += size
        while len(records) > RECORD_RING_SIZE or (self.record_bytes > RECORD_MAX_BODY_BYTES
                                                  and len(records) > 1):
            self.record_bytes -= records.popleft()[2]

    def _auth_ok(self, req):
        auth = req.headers.get(b"authorization")
        return auth is not None and auth[:7] == b"Bearer " and auth[7:].strip() != b""

    def _fails_now(self, kind, key, directives):
        """Whether this request gets the injected fault (fail_times gates it)."""
        limit = directives.get("fail_times")
        if limit is None:
            return True
        counter_key = (kind, key)
        count = self.fail_counts.pop(counter_key, 0) + 1
        self.fail_counts[counter_key] = count  # re-inserted: most recently used last
        if len(self.fail_counts) > FAIL_COUNTER_LIMIT:
            self.fail_counts.popitem(last=False)
        return count <= limit

    def _fault(self, directives, success):
        """Applies the fault directives (drop > status > garbage > empty) or succeeds."""
        if directives.get("drop"):
            return Reply(0, b"", drop=True)
        status = directives.get("status")
        if status is not None:
            headers = []
            if "retry_after" in directives:
                headers.append(b"Retry-After: %d\r\n" % directives["retry_after"])
            if "retry_after_ms" in directives:
                headers.append(b"retry-after-ms: %d\r\n" % directives["retry_after_ms"])
            return openai_error(status, f"fake injected status {status}",
                                code=directives.get("error_code"), headers=tuple(headers))
        if directives.get("garbage"):
            return Reply(200, b"<html>this is not JSON {")
        return success(bool(directives.get("empty_choices")))

    @staticmethod
    def _parse_json(body):
        try:
            doc = _loads(body.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None, invalid("request body is not valid JSON")
        if not isinstance(doc, dict):
            return None, invalid("request body must be a JSON object")
        return doc, None

    # -- /v1/chat/completions ----------------------------------------------

    def chat(self, req, body):
        self.chat_requests += 1
        return self.begin_api(self._chat(req, body))

    def _chat(self, req, body):
        doc, error = self._parse_json(body)
        if error is not None:
            return error
        messages = doc.get("messages")
        last_user = None
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    content = message.get("content")
                    last_user = content if isinstance(content, str) else None
                    break
        auth_ok = self._auth_ok(req)
        doc["authorization_present"] = b"authorization" in req.headers
        self._record(last_user or "", doc, len(body))
        if not auth_ok:
            return openai_error(401, "missing or malformed Authorization: Bearer <key>",
                                "invalid_request_error", "invalid_api_key")

        model = doc.get("model")
        if not isinstance(model, str) or not model:
            return invalid("model must be a non-empty string", "model")
        if not isinstance(messages, list) or not messages:
            return invalid("messages must be a non-empty array", "messages")
        roles = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return invalid(f"messages[{i}] must be an object", f"messages[{i}]")
            role = message.get("role")
            if role not in CHAT_ROLES:
                return invalid(f"messages[{i}].role must be one of system, user, assistant",
                               f"messages[{i}].role")
            if not isinstance(message.get("content"), str):
                return invalid(f"messages[{i}].content must be a string", f"messages[{i}].content")
            roles.append(role)
        stream = doc.get("stream", False)
        if not isinstance(stream, bool):
            return invalid("stream must be a boolean", "stream")
        stream_options = doc.get("stream_options")
        if stream_options is not None and not (
                isinstance(stream_options, dict) and isinstance(stream_options.get("include_usage", False), bool)):
            return invalid("stream_options must be an object with a boolean include_usage", "stream_options")
        include_usage = bool(stream and stream_options and stream_options.get("include_usage"))
        for name in ("max_completion_tokens", "max_tokens"):
            if name in doc and doc[name] is not None:
                value = doc[name]
                if not _is_int(value) or value < 1:
                    return invalid(f"{name} must be a positive integer", name)

        try:
            directives = parse_directives((last_user,)) if last_user else {}
        except DirectiveError as exc:
            return invalid(str(exc), "messages")

        def success(empty):
            content = (f"[fake] messages={len(messages)} roles={','.join(roles)} "
                       f"last_user={last_user if last_user is not None else ''}")
            prompt_tokens = sum(_word_count(m["content"]) for m in messages)
            completion_tokens = _word_count(content)
            if stream:
                # fail_times gates the stream's faults too; its pace always applies.
                faults = directives if gate["faulty"] else {
                    k: v for k, v in directives.items() if k == "chunk_delay_ms"}
                return self._stream(model, content, empty, prompt_tokens, completion_tokens, include_usage,
                                    faults, last_user)
            choices = [] if empty else [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }]
            return json_reply(200, {
                "id": f"chatcmpl-fake-{next(self.ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })

        gate = {"faulty": False}
        if not directives:
            reply = success(False)
            reply.delay = self.delay_ms / 1000.0
            return reply
        gate["faulty"] = self._fails_now("chat", last_user, directives)
        if gate["faulty"]:
            reply = self._fault(directives, success)
        else:
            reply = success(False)
        delay_ms = directives.get("delay_ms", self.delay_ms)
        reply.delay = delay_ms / 1000.0
        return reply

    def _stream(self, model, content, empty, prompt_tokens, completion_tokens, include_usage, directives,
                last_user):
        chunk_id = f"chatcmpl-fake-{next(self.ids)}"
        created = int(time.time())

        def chunk(choices, usage=None):
            obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices}
            if include_usage:
                obj["usage"] = usage
            return sse_event(obj)

        pieces = [] if empty else split_words(content)
        events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        error_after = directives.get("stream_error_after")
        for i, piece in enumerate(pieces):
            if error_after is not None and i == error_after:
                break
            events.append(chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        if error_after is not None and error_after <= len(pieces):
            # What OpenAI sends when a stream fails after its 200.
            events.append(sse_event({"error": {"message": "fake injected stream error", "type": "server_error",
                                               "param": None, "code": directives.get("error_code")}}))
        else:
            events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            if include_usage:
                events.append(chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                         "total_tokens": prompt_tokens + completion_tokens}))
            events.append(sse_event(b"[DONE]"))
        # received_ms and first_content_ms (wall clock, ms) give the model's own
        # time to its first piece of text, which a client of chatd subtracts
        # from what it waited to learn chatd's share of the same request.
        record = {"last_user": last_user or "", "state": "streaming", "events_sent": 0,
                  "events_total": len(events), "received_ms": time.time() * 1000, "first_content_ms": None,
                  "first_content_event": 1 if pieces and (error_after is None or error_after > 0) else None}
        self.streams.append(record)
        chunk_delay = directives.get("chunk_delay_ms", self.chunk_delay_ms) / 1000.0
        drop_after = directives.get("stream_drop_after")
        return Reply(200, b"", stream=Stream(events, chunk_delay, drop_after, record))

    def get_streams(self, req, body):
        contains, error = _contains_query(req)
        if error is not None:
            return error
        return json_reply(200, {"streams": [r for r in self.streams if contains in r["last_user"]]})

    # -- /v1/embeddings -----------------------------------------------------

    def embeddings(self, req, body):
        self.embedding_requests += 1
        return self.begin_api(self._embeddings(req, body))

    def _embeddings(self, req, body):
        if not self._auth_ok(req):
            return openai_error(401, "missing or malformed Authorization: Bearer <key>",
                                "invalid_request_error", "invalid_api_key")
        doc, error = self._parse_json(body)
        if error is not None:
            return error
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            return invalid("model must be a non-empty string", "model")
        inputs = doc.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        elif not (isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs)):
            return invalid("input must be a string or a non-empty array of strings", "input")
        dimensions = doc.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
        if not _is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            return invalid(f"dimensions must be an integer in [1, {MAX_EMBEDDING_DIMENSIONS}]",
                           "dimensions")
        encoding = doc.get("encoding_format", "float")
        if encoding != "float":
            return invalid("only encoding_format float is supported by fake", "encoding_format")
        try:
            directives = parse_directives(inputs)
        except DirectiveError as exc:
            return invalid(str(exc), "input")

        def success(empty):
            data = [] if empty else [
                {"object": "embedding", "index": i, "embedding": embed(text, dimensions)}
                for i, text in enumerate(inputs)]
            tokens = sum(_word_count(text) for text in inputs)
            return json_reply(200, {"object": "list", "data": data, "model": model,
                                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        if not directives:
            return success(False)
        if self._fails_now("embeddings", "\x00".join(inputs), directives):
            reply = self._fault(directives, success)
        else:
            reply = success(False)
        reply.delay = directives.get("delay_ms", 0) / 1000.0
        return reply

    # -- the rest -------------------------------------------------------------

    def models(self, req, body):
        return json_reply(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in MODELS]})

    def get_config(self, req, body):
        return json_reply(200, {"delay_ms": self.delay_ms, "chunk_delay_ms": self.chunk_delay_ms})

    def set_config(self, req, body):
        doc, error = self._parse_json(body)
        if error is not None:
            return error
        unknown = set(doc) - {"delay_ms", "chunk_delay_ms"}
        if unknown:
            return invalid(f"unknown config keys: {', '.join(sorted(unknown))}")
        for key in ("delay_ms", "chunk_delay_ms"):
            if key in doc:
                value = doc[key]
                if not _is_int(value) or not 0 <= value <= MAX_DELAY_MS:
                    return invalid(f"{key} must be an integer in [0, {MAX_DELAY_MS}]", key)
        for key in ("delay_ms", "chunk_delay_ms"):
            if key in doc:
                setattr(self, key, doc[key])
        return self.get_config(req, body)

    def get_requests(self, req, body):
        contains, error = _contains_query(req)
        if error is not None:
            return error
        found = [r for r in self.records if not contains or contains in r[0]]
        # received_ms[i] is when requests[i] arrived (wall clock, ms).
        return json_reply(200, {"requests": [r[1] for r in found], "received_ms": [r[3] for r in found]})

    def clear_requests(self, req, body):
        self.records.clear()
        self.record_bytes = 0
        return json_reply(200, {"cleared": True})

    def stats(self, req, body):
        return json_reply(200, {
            "chat_requests": self.chat_requests,
            "embedding_requests": self.embedding_requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "status_counts": self.status_counts,
            "dropped": self.dropped,
            "abandoned": self.abandoned,
            "connections_total": self.connections_total,
            "streams": dict(self.stream_counts),
        })

    def health(self, req, body):
        return json_reply(200, {"ok": True})


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: keep-alive, pipelining, replies in order."""

    def __init__(self, app):
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buf = bytearray()
        self.head = None            # parsed head of the request whose body is awaited
        self.pending = None         # TimerHandle of a delayed reply
        self.pending_reply = None   # (reply, request) waiting for the timer
        self.write_paused = False
        self.read_paused = False
        self.eof = False
        self.closed = False
        self.linger = None          # TimerHandle closing a connection after a protocol error
        self.streaming = None       # (reply, request, next event index) of a stream being sent

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.app.connections.add(self)
        self.app.connections_total += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc):
        self.closed = True
        self.app.connections.discard(self)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.pending_reply is not None:
            reply, _ = self.pending_reply
            self.pending_reply = None
            self.app.end_api(reply, "abandoned")
        if self.streaming is not None:
            reply = self.streaming[0]
            self.streaming = None
            self.app.end_stream(reply.stream, "aborted")
            self.app.end_api(reply, "abandoned")
        self.buf = bytearray()

    def data_received(self, data):
        if self.closed:
            return  # lingering after an error, or closing: nothing more to answer
        self.buf += data
        if self.pending is None and not self.write_paused:
            self._process()
        elif not self.read_paused and len(self.buf) > MAX_BLOCKED_BUFFER_BYTES:
            self.transport.pause_reading()
            self.read_paused = True

    def eof_received(self):
        # Requests already received get their immediate replies; a delayed reply
        # is abandoned, since a client that hangs up while waiting (a timeout)
        # must show up in the stats rather than hold the slot for the delay.
        self.eof = True
        if self.closed:
            return False
        if self.pending is None and not self.write_paused:
            self._process()
        return self.pending is None and not self.closed

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if self.pending is None and not self.closed:
            self._process()

    # -- request processing ---------------------------------------------------

    def _process(self):
        if self.read_paused and not self.closed:
            self.transport.resume_reading()
            self.read_paused = False
        buf = self.buf
        while not self.closed:
            req = self.head
            if req is None:
                while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore CRLFs between requests
                    del buf[:2]
                end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        self._fail(431, "request headers too large")
                    elif self.eof:
                        self._close()
                    return
                try:
                    req = parse_head(bytes(buf[:end]))
                except HttpError as exc:
                    self._fail(exc.status, exc.message)
                    return
                del buf[:end + 4]
                self.head = req
                if req.expect_continue and len(buf) < req.content_length:
                    self.transport.write(_CONTINUE)
            length = req.content_length
            if len(buf) < length:
                if self.eof:
                    self._close()
                return
            body = bytes(buf[:length])
            del buf[:length]
            self.head = None
            reply = self.app.handle(req, body)
            if reply.delay > 0:
                self.pending_reply = (reply, req)
                self.pending = self.loop.call_later(reply.delay, self._deliver_pending)
                return
            self._deliver(reply, req)
            if self.write_paused or self.pending is not None:
                return  # a stream being sent holds back what follows

    def _deliver_pending(self):
        reply, req = self.pending_reply
        self.pending = None
        self.pending_reply = None
        self._deliver(reply, req)
        if not self.closed and not self.write_paused and self.pending is None:
            self._process()

    def _deliver(self, reply, req):
        app = self.app
        if reply.drop:
            app.end_api(reply, "dropped")
            app.log(f"{req.method} {req.path} dropped")
            self._close()
            return
        if reply.stream is not None:
            self._start_stream(reply, req)
            return
        app.end_api(reply, "sent")
        body = reply.body
        keep_alive = req.keep_alive
        parts = [_STATUS_LINES[reply.status], _date(), _SERVER, _JSON_TYPE,
                 b"Content-Length: %d\r\n" % len(body), _CONN_KEEP if keep_alive else _CONN_CLOSE]
        parts.extend(reply.headers)
        parts.append(b"\r\n")
        parts.append(body)
        self.transport.write(b"".join(parts))
        if not app.quiet:
            app.log(f"{req.method} {req.path} {reply.status}")
        if not keep_alive:
            self._close()

    def _start_stream(self, reply, req):
        self.transport.write(b"".join((_STATUS_LINES[200], _date(), _SERVER,
                                       b"Content-Type: text/event-stream\r\n", b"Cache-Control: no-cache\r\n",
                                       b"Transfer-Encoding: chunked\r\n",
                                       _CONN_KEEP if req.keep_alive else _CONN_CLOSE, b"\r\n")))
        if not self.app.quiet:
            self.app.log(f"{req.method} {req.path} 200 (stream)")
        self.streaming = (reply, req, 0)
        # Like a delayed reply, a stream holds back the pipelined requests behind it.
        self.pending = self.loop.call_soon(self._stream_next)

    def _stream_next(self):
        self.pending = None
        if self.streaming is None or self.closed:
            return
        reply, req, i = self.streaming
        stream = reply.stream
        events = stream.events
        while True:
            if stream.drop_after is not None and i >= stream.drop_after:
                self.streaming = None
                self.app.end_stream(stream, "dropped")
                self.app.end_api(reply, "dropped")
                self.abort()
                return
            if i == len(events):
                break
            event = events[i]
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            if i == stream.record["first_content_event"]:
                stream.record["first_content_ms"] = time.time() * 1000
            i += 1
            stream.record["events_sent"] = i
            if stream.chunk_delay > 0 and i < len(events):
                self.streaming = (reply, req, i)
                self.pending = self.loop.call_later(stream.chunk_delay, self._stream_next)
                return
        self.transport.write(b"0\r\n\r\n")
        self.streaming = None
        self.app.end_stream(stream, "failed" if events[-1].startswith(b'data: {"error"') else "completed")
        self.app.end_api(reply, "sent")
        if not req.keep_alive:
            self._close()
        elif not self.write_paused:
            self._process()

    def _fail(self, status, message):
        """Protocol error: answer it and close, since framing can no longer be trusted."""
        self.app.log(f"bad request: {status} {message}")
        body = _dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": None}}).encode("ascii")
        self.transport.write(b"".join((_STATUS_LINES.get(status, _STATUS_LINES[400]), _date(), _SERVER,
                                       _JSON_TYPE, b"Content-Length: %d\r\n" % len(body),
                                       _CONN_CLOSE, b"\r\n", body)))
        self.closed = True
        self.buf = bytearray()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _close(self):
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self):
        self.closed = True
        self.transport.abort()


# ---------------------------------------------------------------------------
# Start-up.

def _raise_nofile_limit(app):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            app.log(f"cannot raise RLIMIT_NOFILE to {hard}: {exc}")


def _listening_socket(host, port):
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _write_port_file(path, port):
    # Readers poll for the file: rename makes it appear complete or not at all.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(args):
    app = FakeOpenAI(args.delay_ms, args.quiet, args.chunk_delay_ms)
    _raise_nofile_limit(app)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = _listening_socket(args.host, args.port)
    server = await loop.create_server(lambda: HttpProtocol(app), sock=sock, backlog=LISTEN_BACKLOG)
    port = sock.getsockname()[1]
    if args.port_file:
        _write_port_file(args.port_file, port)
    app.log(f"listening on {args.host}:{port} (loop {type(loop).__module__}, "
            f"default delay {app.delay_ms} ms)")
    await stop.wait()
    server.close()
    for conn in list(app.connections):
        conn.abort()
    app.log("stopped")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once accepting connections")
    parser.add_argument("--delay-ms", type=int, default=0,
                        help="default delay of chat replies without a delay directive")
    parser.add_argument("--chunk-delay-ms", type=int, default=int(os.environ.get(CHUNK_DELAY_ENV, "0") or 0),
                        help=f"default pause between the chunks of a streamed reply (env {CHUNK_DELAY_ENV})")
    parser.add_argument("--quiet", action="store_true", help="log nothing but errors at start-up")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= MAX_DELAY_MS:
        parser.error(f"--delay-ms must be in [0, {MAX_DELAY_MS}]")
    if not 0 <= args.chunk_delay_ms <= MAX_DELAY_MS:
        parser.error(f"--chunk-delay-ms must be in [0, {MAX_DELAY_MS}]")
    if not args.no_uvloop:
        try:
            import uvloop  # pylint: disable=import-outside-toplevel
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
