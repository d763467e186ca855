"""The services of the stack, one class each, every one a `_Service`: Redis,
Chroma, the fake model, the chatd pool (spawn-fcgi + multiwatch) and nginx."""

from __future__ import annotations

import http.client
import math
import os
import signal
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from harness.processes import (
    APPENDFSYNC_MODES, CHROMA_BIN, CHROMA_START_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_DEADLINE_MS,
    FAKE_MODEL_SCRIPT, FAKE_START_TIMEOUT_S, LOOPBACK, NGINX_MAIN_TEMPLATE, NGINX_READ_TIMEOUT_MARGIN_S,
    NGINX_SITE_TEMPLATE, NGINX_START_TIMEOUT_S, PASSTHROUGH_ENV, POOL_START_TIMEOUT_S, REDIS_START_TIMEOUT_S,
    STOP_TIMEOUT_S, SYSTEM_PYTHON, StackError, _Service, _proc_children, _raise_nofile_limit, free_port,
    json_log_records, render_template, wait_until)
from harness.clients import RedisError, fastcgi_get, http_json, http_request, resp_command


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

    def received_ms(self, contains: str = "") -> "list[int]":
        """When the recorded chat requests whose last user message contains
        `contains` arrived (wall clock, ms), in the order of requests()."""
        query = urllib.parse.urlencode({"contains": contains})
        status, body = http_json(f"{self.base}/_fake/requests?{query}")
        if status != 200 or not isinstance(body, dict):
            raise StackError(f"fake model /_fake/requests answered {status}: {body!r}")
        return body["received_ms"]

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

    def request_lines(self, user: str) -> "list[dict]":
        """The access log lines (event "request") of one user's requests."""
        return [r for r in self.log_records() if r.get("event") == "request" and r.get("user") == user]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM to multiwatch (spawn-fcgi exec'd it), which asks the workers
        to finish (SIGUSR1) and exits when they have. Returns the seconds it took;
        SIGKILLs the group after `timeout`."""
        elapsed = self._terminate(signal.SIGTERM, timeout)
        self.socket_path.unlink(missing_ok=True)
        return elapsed


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
