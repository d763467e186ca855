"""Process bookkeeping of the test harness: the limits and paths every service
shares, free ports, bounded polls, and `_Service`, the base of every child
process (its own session, so its whole group can be killed; registered, so
nothing outlives the tests). Standard library only."""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence


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


def proc_stat_fields(path: str) -> "Optional[list[str]]":
    """The fields of a /proc stat file after the command name (field 3 of
    proc(5) first), or None when it cannot be read (the process is gone)."""
    try:
        with open(path, "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: the fields
    # that follow start after the last ')'.
    return stat[stat.rfind(")") + 2:].split()


def _proc_children(pid: int) -> "list[int]":
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(f"/proc/{entry}/stat")
        if fields is not None and len(fields) >= 2 and fields[1] == str(pid) and fields[0] != "Z":
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


def render_template(template: Path, values: Mapping[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    # Named locations (@json_404) are nginx syntax; placeholders are @UPPER_CASE@.
    leftover = sorted(set(re.findall(r"@[A-Z][A-Z0-9_]*@", text)))
    if leftover:
        raise StackError(f"{template}: unrendered placeholders {leftover}")
    return text


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
