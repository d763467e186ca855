"""A fault-injecting HTTP proxy in front of Chroma, for tests of what chatd
does when Chroma misbehaves without being down:

- `strip_where`: removes the "where" filter from /query and /get bodies, as a
  store that ignored it would (isolation must still hold);
- `rewrite_get_ids` (a function of the ids list): replaces the ids of a /get
  that asks for embeddings, as a store answering with records it was not
  asked for would (recall by id must drop them);
- `fail_marker`: answers 500 to any /upsert whose body contains the marker,
  and passes every other call (one poisoned turn among good ones);
- `fail_upserts`: answers 500 to every /upsert (an indexer that can never
  finish its batch);
- `hold` (a predicate of method and path, or `arm` later): holds the first
  matching request until `released` is set, a deterministic point inside a
  cleanup run or an indexer batch (`reached` tells the test it is there,
  `passed` that its answer went back).

It counts the calls by endpoint suffix ("query", "upsert", ...)."""

import http.client
import http.server
import json
import threading
import urllib.parse
from collections import Counter
from typing import Callable, Optional

from harness.stack import LOOPBACK

UPSTREAM_TIMEOUT_S = 30
HOLD_TIMEOUT_S = 60  # a held request goes on by itself after this, so no test hangs


class ChromaProxy:
    def __init__(self, upstream: str, hold: Optional[Callable[[str, str], bool]] = None) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.hold = hold
        self.reached = threading.Event()   # the held request arrived
        self.released = threading.Event()  # the test lets it through
        self.passed = threading.Event()    # its answer went back to the client
        self.strip_where = False
        self.rewrite_get_ids: Optional[Callable[[list], list]] = None
        self.fail_marker: Optional[str] = None
        self.fail_upserts = False
        self.calls: Counter = Counter()
        self.failed: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                endpoint = self.path.rstrip("/").rsplit("/", 1)[-1]
                with proxy.lock:
                    proxy.calls[endpoint] += 1
                    strip, marker, fail_all = proxy.strip_where, proxy.fail_marker, proxy.fail_upserts
                    rewrite = proxy.rewrite_get_ids
                if endpoint == "upsert" and (fail_all or (marker is not None and body and marker.encode() in body)):
                    with proxy.lock:
                        proxy.failed[endpoint] += 1
                    self.reply(500, b'{"error":"InjectedError","message":"injected by the test proxy"}')
                    return
                held = False
                with proxy.lock:
                    if proxy.hold is not None and not proxy.reached.is_set() and proxy.hold(self.command, self.path):
                        proxy.reached.set()
                        held = True
                if held:
                    proxy.released.wait(HOLD_TIMEOUT_S)
                if strip and endpoint in ("query", "get") and body:
                    doc = json.loads(body)
                    doc.pop("where", None)
                    body = json.dumps(doc).encode()
                if rewrite is not None and endpoint == "get" and body:
                    doc = json.loads(body)
                    if "ids" in doc and "embeddings" in doc.get("include", []):
                        doc["ids"] = rewrite(doc["ids"])
                        body = json.dumps(doc).encode()
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=UPSTREAM_TIMEOUT_S)
                try:
                    headers = {"Content-Type": "application/json"} if body is not None else {}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.reply(resp.status, data)
                if held:
                    proxy.passed.set()

            do_GET = do_POST = do_PUT = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def arm(self, hold: Callable[[str, str], bool]) -> None:
        with self.lock:
            self.hold = hold

    def count(self, endpoint: str) -> int:
        with self.lock:
            return self.calls[endpoint]

    def __enter__(self) -> "ChromaProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
