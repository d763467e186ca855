"""Starts and stops the real chatd stack for tests and for `make run`.

Every service runs as a child process on a free loopback port, with its files
in a temporary folder, in its own session so that its whole process group can
be killed. Readiness is always a bounded poll of a real condition, never a
fixed sleep. Standard library only: it runs under Debian's /usr/bin/python3.

The pieces live beside it: processes.py (bookkeeping), clients.py (RESP,
FastCGI, HTTP), services.py (one class per service); every name they define
can still be imported from here.

    with Stack.start("build") as stack:
        status, headers, body = post_chat(stack.url, "alice", "Hi")
"""

from __future__ import annotations

import http.client
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from harness.processes import (  # noqa: F401 (re-exported)
    APPENDFSYNC_MODES, CHROMA_BIN, CHROMA_START_TIMEOUT_S, DEFAULT_HTTP_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_REQUEST_DEADLINE_MS, FAKE_MODEL_SCRIPT, FAKE_START_TIMEOUT_S, KEEP_TMP_ENV, LOG_TAIL_CHARS, LOOPBACK,
    NGINX_DIR, NGINX_MAIN_TEMPLATE, NGINX_READ_TIMEOUT_MARGIN_S, NGINX_SITE_TEMPLATE, NGINX_START_TIMEOUT_S,
    PASSTHROUGH_ENV, POLL_INTERVAL_S, POOL_START_TIMEOUT_S, PORT_RACE_ATTEMPTS, REDIS_START_TIMEOUT_S, REPO_ROOT,
    STOP_TIMEOUT_S, SYSTEM_PYTHON, StackError, UNCAPPED, _Service, _kill_group, _kill_leftovers, _live_lock,
    _live_processes, _live_tmpdirs, _log_tail, _proc_children, _raise_nofile_limit, _register, _unregister,
    free_port, json_log_records, poll_until, proc_stat_fields, render_template, wait_until)
from harness.clients import (  # noqa: F401 (re-exported)
    PROBE_REQUEST_ID, PROBE_TIMEOUT_S, RedisError, _FCGI_BEGIN_REQUEST, _FCGI_END_REQUEST, _FCGI_PARAMS,
    _FCGI_RESPONDER, _FCGI_STDIN, _FCGI_STDOUT, _OMIT, _RespReader, _fcgi_pair, _fcgi_record, _resp_encode,
    concurrently, fastcgi_get, http_json, http_request, post_chat, redis_now_ms, resp_command, scrape_metrics)
from harness.services import Chroma, FakeModel, Nginx, Pool, REDIS_TRANSIENT_ERRORS, Redis  # noqa: F401 (re-exported)


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
