"""The small clients the harness and the tests speak with: RESP (Redis),
FastCGI (a readiness probe straight to the pool's socket) and HTTP (JSON
calls and chat requests). Standard library only."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from harness.processes import DEFAULT_HTTP_TIMEOUT_S, LOOPBACK


class RedisError(RuntimeError):
    """Redis answered a command with an error reply."""


def _resp_encode(args: Iterable[Any]) -> bytes:
    parts = []
    items = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    parts.append(b"*%d\r\n" % len(items))
    for item in items:
        parts.append(b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(parts)


class _RespReader:
    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def _line(self) -> bytes:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        return line[:-2]

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            if len(data) != length + 2:
                raise ConnectionError("Redis closed the connection")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read() for _ in range(count)]
        raise ConnectionError(f"unexpected RESP reply {line[:40]!r}")


def resp_command(port: int, *args: Any, host: str = LOOPBACK, timeout: float = 5.0,
                 auth: Optional[Sequence[str]] = None) -> Any:
    """Sends one command over a new connection and returns the parsed reply:
    str (status), int, bytes (bulk), None (nil) or a list. Error replies raise
    RedisError; nested error replies inside arrays are returned as RedisError.
    `auth`: the arguments of an AUTH sent first ([password] or [user, password])."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = _RespReader(sock)
        if auth:
            sock.sendall(_resp_encode(["AUTH", *auth]))
            refused = reader.read()
            if isinstance(refused, RedisError):
                raise refused
        sock.sendall(_resp_encode(args))
        reply = reader.read()
    if isinstance(reply, RedisError):
        raise reply
    return reply


def redis_now_ms(redis: Any) -> int:
    """Redis's clock in ms, from anything with a `command` method (a Redis, a
    cluster node): the clock chatd's timestamps and windows come from."""
    seconds, micros = redis.command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


# Error replies of a Redis that cannot serve yet but will (chatd treats the same
# ones as transient: src/redis.cc).


def http_json(url: str, method: str = "GET", payload: Any = None, timeout: float = 5.0) -> "tuple[int, Any]":
    """A small JSON-over-HTTP call for the services' admin endpoints."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data) if data else None
    except ValueError:
        return resp.status, data.decode(errors="replace")


# FastCGI record types and the responder role (FastCGI 1.0 specification).
_FCGI_BEGIN_REQUEST, _FCGI_END_REQUEST, _FCGI_PARAMS, _FCGI_STDIN, _FCGI_STDOUT = 1, 3, 4, 5, 6
_FCGI_RESPONDER = 1
PROBE_REQUEST_ID = "harness-readiness-probe"
PROBE_TIMEOUT_S = 3.0


def _fcgi_record(kind: int, content: bytes, request_id: int = 1) -> bytes:
    return bytes([1, kind, request_id >> 8, request_id & 0xFF, len(content) >> 8, len(content) & 0xFF, 0, 0]) + content


def _fcgi_pair(name: str, value: str) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else (n | 0x80000000).to_bytes(4, "big")
    nb, vb = name.encode(), value.encode()
    return length(len(nb)) + length(len(vb)) + nb + vb


def fastcgi_get(socket_path: Path | str, path: str, timeout: float = PROBE_TIMEOUT_S) -> bytes:
    """A GET straight to the FastCGI socket, bypassing nginx; returns the
    worker's raw STDOUT (CGI headers and body). Raises OSError when no worker
    answers in time."""
    params = b"".join(_fcgi_pair(k, v) for k, v in {
        "REQUEST_METHOD": "GET", "DOCUMENT_URI": path, "REQUEST_URI": path, "SCRIPT_NAME": path,
        "QUERY_STRING": "", "CONTENT_LENGTH": "0", "CONTENT_TYPE": "", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": LOOPBACK, "REQUEST_ID": PROBE_REQUEST_ID,
    }.items())
    message = (_fcgi_record(_FCGI_BEGIN_REQUEST, bytes([0, _FCGI_RESPONDER, 0, 0, 0, 0, 0, 0]))
               + _fcgi_record(_FCGI_PARAMS, params) + _fcgi_record(_FCGI_PARAMS, b"")
               + _fcgi_record(_FCGI_STDIN, b""))
    out = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(message)
        reader = sock.makefile("rb")
        while True:
            header = reader.read(8)
            if len(header) < 8:
                raise ConnectionError("FastCGI connection closed before END_REQUEST")
            kind = header[1]
            content_length = (header[4] << 8) | header[5]
            body = reader.read(content_length + header[6])[:content_length]
            if kind == _FCGI_STDOUT:
                out += body
            elif kind == _FCGI_END_REQUEST:
                return bytes(out)


# --------------------------------------------------------------------------
# HTTP helpers for tests

_OMIT = object()


def http_request(url: str, method: str = "GET", path: Optional[str] = None, body: Optional[bytes] = None,
                 headers: Optional[Mapping[str, str]] = None, timeout: float = DEFAULT_HTTP_TIMEOUT_S
                 ) -> "tuple[int, dict[str, str], Any]":
    """One request on a new connection. Returns (status, headers with lower-case
    names, the body parsed as JSON when it is JSON, else the raw text)."""
    parts = urllib.parse.urlsplit(url)
    if path is None:
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        # skip_accept_encoding etc. are not needed: http.client adds only Host
        # and Accept-Encoding: identity, and Content-Length for bodies.
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    text = data.decode("utf-8", errors="replace")
    try:
        parsed: Any = json.loads(text) if text else text
    except ValueError:
        parsed = text
    return resp.status, resp_headers, parsed


def scrape_metrics(url: str) -> "dict[str, float]":
    """A pool's /metrics (through `url`) as {sample, labels included: value}."""
    status, _, text = http_request(url, "GET", "/metrics")
    assert status == 200, text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def post_chat(url: str, user_id: Any = _OMIT, message: Any = _OMIT, headers: Optional[Mapping[str, str]] = None,
              raw_body: Optional[bytes | str] = None, content_type: Optional[str] = "application/json",
              method: str = "POST", timeout: float = DEFAULT_HTTP_TIMEOUT_S, path: str = "/api/chat"
              ) -> "tuple[int, dict[str, str], Any]":
    """A chat call. `url` is the base (http://127.0.0.1:P). The body is
    {"userId", "message"} (an argument left out is left out of the body), or
    `raw_body` verbatim. content_type=None sends no Content-Type."""
    if raw_body is not None:
        body = raw_body.encode() if isinstance(raw_body, str) else raw_body
    else:
        doc = {}
        if user_id is not _OMIT:
            doc["userId"] = user_id
        if message is not _OMIT:
            doc["message"] = message
        body = json.dumps(doc).encode()
    all_headers = {}
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    all_headers.update(headers or {})
    if method in ("GET", "HEAD", "DELETE") and raw_body is None:
        body = None
    return http_request(url, method, path, body, all_headers, timeout)


def concurrently(fn: Callable[..., Any], args_list: Iterable[Any], max_workers: int = 16) -> "list[Any]":
    """Calls fn(*args) for each args (a tuple, or one value) on a thread pool;
    returns the results in the order of `args_list`. An exception of a call
    is re-raised."""
    calls = [a if isinstance(a, tuple) else (a,) for a in args_list]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        return [f.result() for f in futures]
