"""Starts and stops the real chatd stack for tests and for `make run`.

Every service runs as a child process on a free loopback port, with its files
in a temporary folder, in its own session so that its whole process group can
be killed. Readiness is always a bounded poll of a real condition, never a
fixed sleep. Standard library only: it runs under Debian's /usr/bin/python3.

    with Stack.start("build") as stack:
        status, headers, body = post_chat(stack.url, "alice", "Hi")
"""

from __future__ import annotations

import atexit
import concurrent.futures
import http.client
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
FAKE_MODEL_SCRIPT = REPO_ROOT / "tests" / "fake_model" / "fake_openai.py"
CHROMA_BIN = REPO_ROOT / ".venv" / "chroma" / "bin" / "chroma"
NGINX_DIR = REPO_ROOT / "nginx"
NGINX_SITE_TEMPLATE = NGINX_DIR / "chatd-site.conf.in"
NGINX_MAIN_TEMPLATE = NGINX_DIR / "nginx-local.conf.in"
LOOPBACK = "127.0.0.1"

# Start-up bounds. Chroma loads a Rust server through Python and is by far the
# slowest; the others are ready in well under a second on an idle machine, but
# the machine is shared, so the bounds are generous.
REDIS_START_TIMEOUT_S = 20.0
CHROMA_START_TIMEOUT_S = 90.0
FAKE_START_TIMEOUT_S = 20.0
POOL_START_TIMEOUT_S = 30.0
NGINX_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
# A free port found by binding port 0 can be taken by someone else before the
# service binds it; starting again on a new port fixes that rare race.
PORT_RACE_ATTEMPTS = 3

# The contract's defaults; they must match include/chatd/config.h.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_REQUEST_DEADLINE_MS = 30000
# nginx must wait longer than chatd's own deadline, so that a slow model
# becomes chatd's JSON 504 (model_timeout) rather than nginx's.
NGINX_READ_TIMEOUT_MARGIN_S = 10
# Variables a sanitizer build needs in the worker's environment.
PASSTHROUGH_ENV = ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "LANG", "LC_ALL", "TZ")
# Kept when set to 1: the temporary folder of a stack, for a post-mortem.
KEEP_TMP_ENV = "CHATD_KEEP_STACK_TMP"

DEFAULT_HTTP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 4000


# CHATD_MAX_CONCURRENT_PER_USER for pools whose tests send many chats of one
# user at once on purpose, to test something other than that cap.
UNCAPPED = "1000"


# Redis AOF fsync policies the harness offers: `everysec` (the deployed one;
# a crash of the machine may lose the last second) and `always`.
APPENDFSYNC_MODES = ("everysec", "always")


class StackError(RuntimeError):
    """A service could not be started or stopped as expected."""


class RedisError(RuntimeError):
    """Redis answered a command with an error reply."""


# --------------------------------------------------------------------------
# Process bookkeeping


_live_lock = threading.Lock()
_live_processes: "set[subprocess.Popen]" = set()
_live_tmpdirs: "set[Path]" = set()


def _register(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live_processes.add(proc)


def _unregister(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live_processes.discard(proc)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_leftovers() -> None:
    # Last resort when a test run dies without stopping its stack: no service
    # may outlive the interpreter that started it.
    with _live_lock:
        procs = list(_live_processes)
        _live_processes.clear()
    for proc in procs:
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    with _live_lock:
        tmpdirs = list(_live_tmpdirs)
        _live_tmpdirs.clear()
    if os.environ.get(KEEP_TMP_ENV) != "1":
        for tmpdir in tmpdirs:
            shutil.rmtree(tmpdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               proc: Optional[subprocess.Popen] = None,
               log_path: Optional[Path] = None) -> None:
    """Polls `predicate` until it is true; raises StackError after `timeout`
    seconds, or as soon as `proc` (the service being waited for) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or not speaking the protocol yet
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what}: process exited with status {proc.returncode}"
                             f"{_log_tail(log_path)}")
        if time.monotonic() >= deadline:
            raise StackError(f"{what}: not ready after {timeout:.0f} s{_log_tail(log_path)}")
        time.sleep(POLL_INTERVAL_S)


def poll_until(predicate: Callable[[], Any], timeout: float, interval: float = POLL_INTERVAL_S) -> Any:
    """Returns the first truthy value of `predicate()`, or None after `timeout` s.
    For tests that wait for a condition instead of sleeping."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def _log_tail(log_path: Optional[Path]) -> str:
    if log_path is None:
        return ""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return f"\n--- last lines of {log_path} ---\n{text[-LOG_TAIL_CHARS:]}"


def _proc_children(pid: int) -> "list[int]":
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: the
        # fields that follow start after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2 and fields[1] == str(pid) and fields[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def _raise_nofile_limit() -> None:
    # Runs in the child before exec: Chroma keeps several files open per
    # loaded collection (issue #1379), and a per-user collection layout loads many.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Service:
    """One child process in its own session, its output in a log file."""

    name = "service"

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None
        # Whether the last stop had to SIGKILL because the service ignored the signal.
        self.last_stop_forced = False

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: Sequence[str], log_path: Path, env: Optional[Mapping[str, str]] = None,
               preexec_fn: Optional[Callable[[], None]] = None, cwd: Optional[Path] = None) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                preexec_fn=preexec_fn)
        _register(self.proc)

    def _start_on_free_port(self, spawn: Callable[[], None], ready: Callable[[], None],
                            failure_text: Callable[[], str]) -> None:
        """spawn(), then ready() (which raises StackError on failure). A free port
        found by binding port 0 can be taken by someone else before the service
        binds it: when failure_text() says "in use" and the port is not pinned,
        tries again on a new one. Once started, the port is pinned, so that a
        restart comes back where clients look."""
        for attempt in range(PORT_RACE_ATTEMPTS):
            spawn()
            try:
                ready()
                self._fixed_port = True
                return
            except StackError:
                self.kill()
                if self._fixed_port or attempt == PORT_RACE_ATTEMPTS - 1 or "in use" not in failure_text():
                    raise
                self.port = free_port()

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> float:
        """Sends `sig` to the main process, waits for it, SIGKILLs the process
        group on timeout, and always reaps stragglers of the group. Returns the
        seconds until the main process was gone."""
        proc = self.proc
        if proc is None:
            return 0.0
        started = time.monotonic()
        self.last_stop_forced = False
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.last_stop_forced = True
                _kill_group(proc.pid)
                proc.wait()
        elapsed = time.monotonic() - started
        _kill_group(proc.pid)
        _unregister(proc)
        self.proc = None
        return elapsed

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        proc = self.proc
        if proc is None:
            return
        _kill_group(proc.pid)
        proc.wait()
        _unregister(proc)
        self.proc = None

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------
# Redis


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


# Error replies of a Redis that cannot serve yet but will (chatd treats the same
# ones as transient: src/redis.cc).
REDIS_TRANSIENT_ERRORS = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")


class Redis(_Service):
    """redis-server with an AOF in `<tmpdir>/redis`, so that a stop and a start
    on the same port keep the data (outage tests, `make run` restarts)."""

    name = "redis"

    def __init__(self, tmpdir: Path | str, port: Optional[int] = None, requirepass: Optional[str] = None,
                 acl_file: Optional[Path | str] = None, admin: Optional[Sequence[str]] = None,
                 appendfsync: str = "everysec") -> None:
        """requirepass: the default user's password. acl_file: users and their
        rules (Redis `aclfile`); `admin` is then the [user, password] the
        harness itself authenticates with. appendfsync: the AOF's fsync policy
        (`everysec`, as deployed, or `always`); a restart keeps it."""
        super().__init__()
        # More redis-server arguments for the next start (a test may slow the
        # loading of the AOF down with the test-only "--key-load-delay").
        self.extra_args: "list[str]" = []
        if appendfsync not in APPENDFSYNC_MODES:
            raise ValueError(f"appendfsync must be one of {APPENDFSYNC_MODES}, not {appendfsync!r}")
        self.appendfsync = appendfsync
        self.dir = Path(tmpdir) / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.host = LOOPBACK
        self._auth_args: "list[str]" = []
        self.auth: Optional[Sequence[str]] = None
        if requirepass is not None:
            self._auth_args += ["--requirepass", requirepass]
            self.auth = [requirepass]
        if acl_file is not None:
            self._auth_args += ["--aclfile", str(Path(acl_file).resolve())]
            self.auth = admin

    def start(self) -> "Redis":
        self._start_on_free_port(
            lambda: self._spawn(["redis-server", "--bind", LOOPBACK, "--port", str(self.port),
                                 "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
                                 "--save", "", "--daemonize", "no", "--protected-mode", "no",
                                 # What production must set (docs/deployment.md): no
                                 # policy may evict the turn stream.
                                 "--maxmemory-policy", "noeviction",
                                 *self._auth_args, *self.extra_args],
                                self.dir / "redis.log"),
            lambda: wait_until(self._ready, REDIS_START_TIMEOUT_S, "redis", self.proc, self.log_path),
            self.log_text)
        return self

    def _ready(self) -> bool:
        # While it reads its AOF, Redis answers -LOADING (and -BUSY while a
        # script runs too long): not ready yet, not broken (a large AOF takes
        # seconds to load). Any other error is a real fault.
        try:
            return self.redis_command("PING") == "PONG"
        except RedisError as e:
            if str(e).startswith(REDIS_TRANSIENT_ERRORS):
                return False
            raise

    def set_appendfsync(self, mode: str) -> None:
        """Switches the fsync policy of the running server (CONFIG SET) and of
        its later restarts."""
        if mode not in APPENDFSYNC_MODES:
            raise ValueError(f"appendfsync must be one of {APPENDFSYNC_MODES}, not {mode!r}")
        self.redis_command("CONFIG", "SET", "appendfsync", mode)
        self.appendfsync = mode

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        # SIGTERM makes Redis flush the AOF before exiting.
        return self._terminate(signal.SIGTERM, timeout)

    def redis_command(self, *args: Any) -> Any:
        return resp_command(self.port, *args, host=self.host, auth=self.auth)

    command = redis_command


# --------------------------------------------------------------------------
# Chroma


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


class Chroma(_Service):
    """The real Chroma server (`chroma run`) from the `.venv/chroma` virtualenv."""

    name = "chroma"

    def __init__(self, tmpdir: Path | str, port: Optional[int] = None) -> None:
        super().__init__()
        self.dir = Path(tmpdir) / "chroma"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _healthy(self) -> bool:
        status, _ = http_json(f"{self.url}/api/v2/heartbeat", timeout=2)
        return status == 200

    def start(self) -> "Chroma":
        if not CHROMA_BIN.exists():
            raise StackError(f"{CHROMA_BIN} is missing: run `make deps` first")
        env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
        self._start_on_free_port(
            lambda: self._spawn([CHROMA_BIN, "run", "--path", self.dir, "--host", LOOPBACK, "--port", str(self.port)],
                                self.dir.parent / "chroma.log", env=env, preexec_fn=_raise_nofile_limit),
            lambda: wait_until(self._healthy, CHROMA_START_TIMEOUT_S, "chroma", self.proc, self.log_path),
            self.log_text)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        return self._terminate(signal.SIGTERM, timeout)


# --------------------------------------------------------------------------
# The fake OpenAI-compatible model


class FakeModel(_Service):
    """tests/fake_model/fake_openai.py: answers chat completions offline and
    records every request for the tests to inspect."""

    name = "fake_model"

    def __init__(self, tmpdir: Path | str, delay_ms: int = 0, quiet: bool = True,
                 script: Optional[Path | str] = None, chunk_delay_ms: int = 0) -> None:
        super().__init__()
        self.dir = Path(tmpdir) / "fake_model"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.delay_ms = delay_ms
        self.chunk_delay_ms = chunk_delay_ms
        self.quiet = quiet
        self.script = Path(script) if script else FAKE_MODEL_SCRIPT
        self.port: Optional[int] = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """What OPENAI_BASE_URL must be."""
        return f"{self.base}/v1"

    def start(self) -> "FakeModel":
        if not self.script.exists():
            raise StackError(f"{self.script} is missing")
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        # The port is chosen by the server itself (port 0), then reported in
        # the port file, so there is no race for a free port; a restart reuses
        # the previous port so that pools configured with its URL keep working.
        argv = [SYSTEM_PYTHON, self.script, "--host", LOOPBACK, "--port", str(self.port or 0),
                "--port-file", port_file, "--delay-ms", str(self.delay_ms),
                "--chunk-delay-ms", str(self.chunk_delay_ms)]
        if self.quiet:
            argv.append("--quiet")
        self._spawn(argv, self.dir / "fake_model.log")

        def reported() -> bool:
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text.isdigit():
                self.port = int(text)
                return True
            return False

        wait_until(reported, FAKE_START_TIMEOUT_S, "fake model port file", self.proc, self.log_path)
        wait_until(lambda: http_json(f"{self.base}/_fake/health", timeout=2)[0] == 200,
                   FAKE_START_TIMEOUT_S, "fake model health", self.proc, self.log_path)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        return self._terminate(signal.SIGTERM, timeout)

    def requests(self, contains: str = "") -> "list[dict]":
        """Recorded chat request bodies whose last user message contains `contains`."""
        query = urllib.parse.urlencode({"contains": contains})
        status, body = http_json(f"{self.base}/_fake/requests?{query}")
        if status != 200 or not isinstance(body, dict):
            raise StackError(f"fake model /_fake/requests answered {status}: {body!r}")
        return body["requests"]

    def stats(self) -> Any:
        status, body = http_json(f"{self.base}/_fake/stats")
        if status != 200:
            raise StackError(f"fake model /_fake/stats answered {status}: {body!r}")
        return body

    def set_delay(self, ms: int) -> None:
        status, body = http_json(f"{self.base}/_fake/config", "POST", {"delay_ms": ms})
        if status != 200:
            raise StackError(f"fake model /_fake/config answered {status}: {body!r}")
        self.delay_ms = ms


# --------------------------------------------------------------------------
# The chatd pool


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


def json_log_records(text: str) -> "list[dict]":
    """The JSON objects among the lines of a log (chatd's and chatd-cleanup's
    lines are JSON; multiwatch's and sanitizers' are not)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


class Pool(_Service):
    """spawn-fcgi binds the socket and execs multiwatch, which forks N chatd
    workers sharing it and respawns any that die: the production layout."""

    name = "pool"

    def __init__(self, tmpdir: Path | str, build_dir: Path | str, env: Mapping[str, Optional[str]],
                 workers: int = 2, threads: int = 4, log_path: Optional[Path | str] = None) -> None:
        super().__init__()
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.build_dir = Path(build_dir).resolve()
        self.binary = self.build_dir / "bin" / "chatd"
        self.workers = workers
        self.threads = threads
        self.socket_path = self.dir / "chatd.sock"
        self.log_path = Path(log_path) if log_path else self.dir / "chatd.log"
        # The worker sees exactly this environment (no stray CHATD_* of the
        # caller): what a test configures is what chatd reads.
        self.env = {k: v for k, v in env.items() if v is not None}
        self.env.setdefault("CHATD_THREADS", str(threads))
        self.env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        for name in PASSTHROUGH_ENV:
            if name in os.environ and name not in self.env:
                self.env[name] = os.environ[name]

    def start(self) -> "Pool":
        if not self.binary.exists():
            raise StackError(f"{self.binary} is missing: run `make all` first")
        self.socket_path.unlink(missing_ok=True)
        self._spawn(["spawn-fcgi", "-n", "-s", self.socket_path, "-M", "0660", "--",
                     "/usr/bin/multiwatch", "-f", str(self.workers), "--", self.binary],
                    self.log_path, env=self.env)
        # Ready when all workers exist and one of them has answered a request:
        # workers that die at start-up (a configuration error) never answer,
        # and multiwatch exits once it gives up on them.
        wait_until(lambda: self.socket_path.exists() and len(self.worker_pids()) == self.workers
                   and fastcgi_get(self.socket_path, "/api/health") != b"",
                   POOL_START_TIMEOUT_S, "chatd pool", self.proc, self.log_path)
        return self

    def worker_pids(self) -> "list[int]":
        """The live chatd processes (children of multiwatch)."""
        if self.proc is None:
            return []
        return _proc_children(self.proc.pid)

    def log_records(self) -> "list[dict]":
        """The JSON lines of the log (other lines, e.g. multiwatch's, skipped)."""
        return json_log_records(self.log_text())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM to multiwatch (spawn-fcgi exec'd it), which asks the workers
        to finish (SIGUSR1) and exits when they have. Returns the seconds it took;
        SIGKILLs the group after `timeout`."""
        elapsed = self._terminate(signal.SIGTERM, timeout)
        self.socket_path.unlink(missing_ok=True)
        return elapsed


# --------------------------------------------------------------------------
# nginx


def render_template(template: Path, values: Mapping[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    # Named locations (@json_404) are nginx syntax; placeholders are @UPPER_CASE@.
    leftover = sorted(set(re.findall(r"@[A-Z][A-Z0-9_]*@", text)))
    if leftover:
        raise StackError(f"{template}: unrendered placeholders {leftover}")
    return text


class Nginx(_Service):
    """nginx in front of one pool, rendered from the templates in nginx/ into
    its own prefix folder."""

    name = "nginx"

    def __init__(self, tmpdir: Path | str, pool_socket: Path | str,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout_s: Optional[int] = None,
                 port: Optional[int] = None, access_log: bool = False) -> None:
        super().__init__()
        self.prefix = Path(tmpdir).resolve()
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.pool_socket = Path(pool_socket).resolve()
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout_s = read_timeout_s or (
            math.ceil(DEFAULT_REQUEST_DEADLINE_MS / 1000) + NGINX_READ_TIMEOUT_MARGIN_S)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.access_log = access_log
        self.conf_path = self.prefix / "nginx.conf"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def render(self) -> Path:
        site = render_template(NGINX_SITE_TEMPLATE, {
            "LISTEN": f"{LOOPBACK}:{self.port}",
            "CHATD_SOCKET": str(self.pool_socket),
            "MAX_BODY": str(self.max_body_bytes),
            "READ_TIMEOUT": f"{self.read_timeout_s}s",
        })
        (self.prefix / "chatd-site.conf").write_text(site)
        # As root, nginx's workers would run as `nobody`, which can neither enter
        # the 0700 temporary folder nor connect to the 0660 root-owned socket;
        # in a throw-away test prefix, running them as root is the simple fix.
        # As another user the workers keep that user, which owns everything.
        user = "user root root;" if os.geteuid() == 0 else "# workers keep the invoking user"
        main = render_template(NGINX_MAIN_TEMPLATE, {
            "USER_DIRECTIVE": user,
            "PREFIX": str(self.prefix),
            "SITE_CONF": str(self.prefix / "chatd-site.conf"),
            "ACCESS_LOG": str(self.prefix / "access.log") if self.access_log else "off",
        })
        self.conf_path.write_text(main)
        return self.conf_path

    def _argv(self, *extra: str) -> "list[str]":
        # -e: without it nginx first opens the compiled-in /var/log/nginx/error.log.
        return ["nginx", "-p", f"{self.prefix}/", "-c", str(self.conf_path),
                "-e", str(self.prefix / "error.log"), *extra]

    def test_config(self) -> "tuple[int, str]":
        """`nginx -t` on the rendered configuration: (exit status, output)."""
        self.render()
        done = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout + done.stderr

    def _answers(self) -> bool:
        # An HTTP answer from our own site, not just an open port: with a fixed
        # port (make run) someone else may be listening there.
        status, headers, _ = http_request(self.url, "GET", "/", timeout=2)
        return status == 404 and headers.get("server") == "nginx"

    def start(self) -> "Nginx":
        def spawn() -> None:
            self.render()
            self._spawn(self._argv("-g", "daemon off;"), self.prefix / "nginx.out")

        self._start_on_free_port(
            spawn,
            lambda: wait_until(self._answers, NGINX_START_TIMEOUT_S, "nginx", self.proc, self.prefix / "error.log"),
            self.error_log_text)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        # SIGQUIT: graceful, lets a request in progress finish.
        return self._terminate(signal.SIGQUIT, timeout)

    def error_log_text(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------
# The whole stack


def _int_env(env: Mapping[str, Optional[str]], name: str, default: int) -> int:
    value = env.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default  # chatd itself rejects it; nginx keeps the default


def nginx_limits_for(env: Mapping[str, Optional[str]]) -> "tuple[int, int]":
    """(client_max_body_size, fastcgi_read_timeout in s) agreeing with a pool's env."""
    max_body = _int_env(env, "CHATD_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
    deadline_ms = _int_env(env, "CHATD_REQUEST_DEADLINE_MS", DEFAULT_REQUEST_DEADLINE_MS)
    return max_body, math.ceil(deadline_ms / 1000) + NGINX_READ_TIMEOUT_MARGIN_S


class Frontend:
    """One pool and the nginx in front of it."""

    def __init__(self, pool: Pool, nginx: Nginx) -> None:
        self.pool = pool
        self.nginx = nginx

    @property
    def url(self) -> str:
        return self.nginx.url

    @classmethod
    def start(cls, tmpdir: Path, build_dir: Path | str, env: Mapping[str, Optional[str]],
              workers: int, threads: int) -> "Frontend":
        pool = Pool(tmpdir / "pool", build_dir, env, workers=workers, threads=threads)
        max_body, read_timeout = nginx_limits_for(env)
        nginx = Nginx(tmpdir / "nginx", pool.socket_path, max_body_bytes=max_body, read_timeout_s=read_timeout)
        pool.start()
        try:
            nginx.start()
        except BaseException:
            pool.stop()
            raise
        return cls(pool, nginx)

    def stop(self) -> None:
        self.nginx.stop()
        self.pool.stop()


class Stack:
    """Redis, Chroma, the fake model, and one pool behind nginx."""

    def __init__(self, build_dir: Path | str, tmpdir: Optional[Path | str] = None) -> None:
        self.build_dir = Path(build_dir).resolve()
        self._own_tmpdir = tmpdir is None
        self.tmpdir = Path(tmpdir) if tmpdir else Path(tempfile.mkdtemp(prefix="chatd-stack-"))
        if self._own_tmpdir:
            with _live_lock:
                _live_tmpdirs.add(self.tmpdir)
        self.redis: Optional[Redis] = None
        self.redis_cluster: Any = None  # a harness.cluster.RedisCluster instead of `redis`
        self.chroma: Optional[Chroma] = None
        self.fake: Optional[FakeModel] = None
        self.pool: Optional[Pool] = None
        self.nginx: Optional[Nginx] = None
        self.frontends: "list[Frontend]" = []
        self._chroma_url = ""
        self._pool_counter = 0
        self._stopped = False

    @classmethod
    def start(cls, build_dir: Path | str, pool_env_overrides: Optional[Mapping[str, Optional[str]]] = None,
              workers: int = 2, threads: int = 4, with_chroma: bool = True, fake_delay_ms: int = 0,
              tmpdir: Optional[Path | str] = None, redis_cluster: bool = False) -> "Stack":
        """Starts everything, or stops what started and raises. redis_cluster:
        a Redis Cluster (harness/cluster.py) instead of one Redis."""
        stack = cls(build_dir, tmpdir)
        try:
            if redis_cluster:
                from .cluster import RedisCluster  # it builds on this module
                stack.redis_cluster = RedisCluster(stack.tmpdir).start()
            else:
                stack.redis = Redis(stack.tmpdir).start()
            if with_chroma:
                stack.chroma = Chroma(stack.tmpdir).start()
                stack._chroma_url = stack.chroma.url
            else:
                # A port nobody listens on: chatd must cope with Chroma being down.
                stack._chroma_url = f"http://{LOOPBACK}:{free_port()}"
            stack.fake = FakeModel(stack.tmpdir, delay_ms=fake_delay_ms).start()
            main = stack.new_pool(pool_env_overrides, workers, threads)
            stack.pool, stack.nginx = main.pool, main.nginx
        except BaseException:
            stack.stop()
            raise
        return stack

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    @property
    def chroma_url(self) -> str:
        return self._chroma_url

    def pool_env(self, threads: int, overrides: Optional[Mapping[str, Optional[str]]] = None
                 ) -> "dict[str, Optional[str]]":
        """The environment of a pool; an override of None removes the variable."""
        assert (self.redis or self.redis_cluster) is not None and self.fake is not None
        redis_env = {"CHATD_REDIS_CLUSTER": self.redis_cluster.seeds} if self.redis_cluster else {
            "CHATD_REDIS_HOST": self.redis.host, "CHATD_REDIS_PORT": str(self.redis.port)}
        env: "dict[str, Optional[str]]" = {
            **redis_env,
            "CHATD_CHROMA_URL": self._chroma_url,
            "OPENAI_BASE_URL": self.fake.url,
            "OPENAI_API_KEY": "test-key",
            "CHATD_THREADS": str(threads),
            "CHATD_METRICS_FILE": "",  # set per pool below
            "CHATD_AUTH_MODE": "off",
            "CHATD_INDEX_CLAIM_IDLE_MS": "2000",
        }
        env.update(overrides or {})
        return env

    def new_pool(self, env_overrides: Optional[Mapping[str, Optional[str]]] = None, workers: int = 2,
                 threads: int = 4) -> Frontend:
        """Another pool + nginx pair (own socket, port and metrics file) sharing
        this stack's Redis, Chroma and fake model. Stopped with the stack."""
        self._pool_counter += 1
        folder = self.tmpdir / f"frontend-{self._pool_counter}"
        overrides = dict(env_overrides or {})
        overrides.setdefault("CHATD_METRICS_FILE", str(folder / "metrics"))
        frontend = Frontend.start(folder, self.build_dir, self.pool_env(threads, overrides), workers, threads)
        self.frontends.append(frontend)
        return frontend

    def stop(self) -> None:
        """Stops everything that runs, in the reverse order of start. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        errors = []
        for frontend in reversed(self.frontends):
            for service in (frontend.nginx, frontend.pool):
                try:
                    service.stop()
                except Exception as exc:  # keep stopping the rest
                    errors.append(exc)
        for service in (self.fake, self.chroma, self.redis, self.redis_cluster):
            if service is not None:
                try:
                    service.stop()
                except Exception as exc:
                    errors.append(exc)
        if self._own_tmpdir:
            with _live_lock:
                _live_tmpdirs.discard(self.tmpdir)
            if os.environ.get(KEEP_TMP_ENV) != "1":
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise StackError(f"errors while stopping: {errors}")

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


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
