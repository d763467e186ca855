"""A chaos run under load (issue 13): the real stack, chats at a steady rate
from many users, faults injected one after another, then every answered turn
reconciled against Redis, Chroma and the cleanup's archives.

    config = ChaosConfig.short()          # or ChaosConfig(...) / the CLI in tests/chaos/chaos.py
    report = ChaosRun(config, "build").run()
    report["totals"]["lost"], report["duplicates"]["count"], ...

What is measured, and how precisely:

- **Answered**: a logical chat (one unique message) whose final attempt got 200
  with a `turnId`. The client retries, like a real one, after a connection
  error or a 502/503/504 that is not the model's own failure, and sends the
  same `Idempotency-Key` with every attempt (ignored by servers without it).
- **Found**: the turn id is in the user's recent list, hot set, the index
  stream or its dead letters, Chroma, or an archive file, read after the
  indexers drained (bounded poll). **Lost**: answered and found nowhere; each
  lost turn is attributed to the phase (fault window) in which it was answered.
- **Duplicates**: one message stored under more than one turn id (anywhere), or
  one turn id answered to two different messages.
- **Over-limit admissions** (fixed windows aligned in Redis time, which is this
  machine's clock): a 200 whose whole interval, from its first attempt's send
  to its answer, lies inside one window certainly was admitted in it; more
  such 200s than the limit in one window of one user is a violation. Chats
  whose interval straddles a boundary are counted as "possible" only.
- **Worker crashes**: worker pids that disappeared without being killed on
  purpose (sampled continuously), multiwatch's respawn lines beyond the kills,
  sanitizer reports in the pool's log.
- **Forgotten users** are chatting while `chatd-cleanup forget` erases them:
  their turns are kept out of the lost count and classified by when they were
  answered relative to the forget.

Standard library only, like the rest of the harness. Pacing (a user's next
chat, a phase's duration, a fault that lasts N seconds) waits on an Event;
every wait for a condition is a bounded poll.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from harness.chroma_layout import DEFAULT_SHARDS, shard_records
from harness import keys as rkeys
from harness.stack import (APPENDFSYNC_MODES, Chroma, FakeModel, Redis, Stack, StackError, concurrently,
                           json_log_records, poll_until, post_chat)

INDEX_GROUP = "indexers"
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")
RESPAWN_LINE = "died, respawn"
GIVE_UP_LINE = "died to often"
# Statuses a client retries when the body does not say the model failed: a
# worker that died (nginx 502), a dependency that is down (503), nginx's timeout.
RETRY_STATUSES = (502, 503, 504)
MODEL_FAILURE_CODES = ("model_error", "model_timeout")
PHASES = ("worker-kill", "redis-kill", "chroma-freeze", "model-faults", "cleanup")
# The cleanup comes first by default: a worker killed while indexing, or an
# indexer write that timed out during a Chroma freeze, leaves the user's
# indexing marker to its TTL (288 Chroma timeouts + 1 s: 289 s by default), and
# a cleanup of that user waits for it (up to half its lock TTL, 300 s) and then
# fails with indexer_busy. `--phases` puts it anywhere to show that.
DEFAULT_ORDER = ("cleanup", "worker-kill", "redis-kill", "chroma-freeze", "model-faults")
PID_SAMPLE_S = 0.05
RESPAWN_TIMEOUT_S = 20.0
CLEANUP_TIMEOUT_S = 120.0
DRAIN_POLL_S = 0.5


@dataclass
class ChaosConfig:
    """Every knob of a run. The defaults are the long form's (`make chaos`)."""

    steady_users: int = 24
    hot_users: int = 4  # send faster than the rate limit: some get 429, the rest is checked exactly
    forget_users: int = 3  # chatting while `chatd-cleanup forget` erases them
    sleeper_users: int = 4  # chat during the warm-up only, then `chatd-cleanup run` archives them
    steady_period_s: float = 1.5
    hot_period_s: float = 0.4
    forget_model_delay_ms: int = 600  # keeps a forgotten user's chat in flight while the forget runs
    rate_limit: int = 6
    rate_window_s: int = 4
    workers: int = 3
    threads: int = 6
    warmup_s: float = 10.0
    phase_s: float = 25.0  # how long each fault phase lasts (chats go on throughout)
    calm_s: float = 8.0  # calm between phases
    chroma_freeze_s: float = 20.0
    phases: "tuple[str, ...]" = DEFAULT_ORDER
    # fsync policies the Redis-kill phase runs under, one kill each, in order;
    # the run starts with the first.
    redis_kill_fsync: "tuple[str, ...]" = ("everysec", "always")
    # Closed-loop throughput under each policy during a calm phase (0: not measured).
    bench_s: float = 15.0
    bench_clients: int = 8
    inactive_s: int = 10  # CHATD_CLEANUP_INACTIVE_S of the concurrent `chatd-cleanup run`
    request_deadline_ms: int = 6000
    # Three attempts of 2.5 s outlast the deadline: a model that never answers
    # in time ends as 504 model_timeout, one that fails fast as 502 model_error.
    llm_attempt_timeout_ms: int = 2500
    drain_timeout_s: float = 240.0
    http_timeout_s: float = 30.0
    max_attempts: int = 4
    retry_backoff_s: float = 0.5

    @classmethod
    def short(cls) -> "ChaosConfig":
        """The form inside `make test`: well under a minute of chaos, few users,
        Redis killed under `always` only, so that no answered turn may be lost."""
        return cls(steady_users=6, hot_users=2, forget_users=2, sleeper_users=2, steady_period_s=1.0,
                   workers=2, threads=4, warmup_s=3.0, phase_s=4.0, calm_s=1.0, chroma_freeze_s=6.0,
                   redis_kill_fsync=("always",), bench_s=0.0, inactive_s=4, drain_timeout_s=180.0)

    def pool_env(self) -> "dict[str, str]":
        return {
            "CHATD_RATE_LIMIT": str(self.rate_limit),
            "CHATD_RATE_WINDOW_S": str(self.rate_window_s),
            "CHATD_RATE_ALGORITHM": "fixed",
            "CHATD_REQUEST_DEADLINE_MS": str(self.request_deadline_ms),
            "CHATD_LLM_ATTEMPT_TIMEOUT_MS": str(self.llm_attempt_timeout_ms),
            "CHATD_LLM_BACKOFF_BASE_MS": "100",
            "CHATD_LLM_BACKOFF_MAX_MS": "400",
            # The claim of a killed worker's pending turns comes within the run.
            "CHATD_INDEX_CLAIM_IDLE_MS": "2000",
            # A Chroma query of a loaded machine is not mistaken for an outage.
            "CHATD_CHROMA_TIMEOUT_MS": "3000",
            # The per-user cap on chats in flight stays at its default: every
            # simulated user has at most one chat in flight (no bursts).
        }


@dataclass
class Attempt:
    send: float
    recv: float
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    code: str = ""
    turn: str = ""
    error: str = ""
    retry_after: str = ""


@dataclass
class Chat:
    user: str
    kind: str
    message: str
    key: str
    attempts: "list[Attempt]" = field(default_factory=list)

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def answered(self) -> bool:
        return self.final.status == 200 and bool(self.final.turn)

    @property
    def first_send(self) -> float:
        return self.attempts[0].send


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    detail: "dict[str, Any]" = field(default_factory=dict)


def _now() -> float:
    return time.time()


def _bytes_text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _stream_fields(raw: list) -> "dict[str, Any]":
    return {_bytes_text(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}


def _turn_of_message_id(message_id: str) -> str:
    # "<turn>:u" / "<turn>:a", possibly prefixed by "<user>/" (Chroma ids).
    tail = message_id.rsplit("/", 1)[-1]
    return tail.rsplit(":", 1)[0] if tail.endswith((":u", ":a")) else tail


class ChaosRun:
    """One run: start the stack, load it, inject, reconcile, report. `log` gets
    one line per event (print for the CLI, None for quiet)."""

    def __init__(self, config: ChaosConfig, build_dir: Path | str, tmpdir: Optional[Path | str] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        for mode in config.redis_kill_fsync:
            if mode not in APPENDFSYNC_MODES:
                raise ValueError(f"unknown fsync mode {mode!r}")
        unknown = [p for p in config.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"unknown phases {unknown}; known: {PHASES}")
        self.config = config
        self.build_dir = Path(build_dir).resolve()
        self.tmpdir = tmpdir
        self.log = log or (lambda _line: None)
        self.stack: Optional[Stack] = None
        self.archive_dir: Optional[Path] = None
        self.run_tag = uuid.uuid4().hex[:8]
        self.chats: "list[Chat]" = []
        self._chats_lock = threading.Lock()
        self.phases: "list[Phase]" = []
        self.model_faults = threading.Event()
        self.stop_users = threading.Event()
        self.stop_sleepers = threading.Event()
        self.stop_monitor = threading.Event()
        self.killed_pids: "set[int]" = set()
        self.seen_pids: "dict[int, float]" = {}
        self.gone_pids: "dict[int, float]" = {}
        self.forgets: "dict[str, dict]" = {}
        self.cleanup_runs: "list[dict]" = []
        self.bench: "dict[str, dict]" = {}
        self.users: "dict[str, str]" = {}  # user -> kind

    # ------------------------------------------------------------------
    # The stack

    def _start_stack(self) -> Stack:
        cfg = self.config
        stack = Stack(self.build_dir, self.tmpdir)
        try:
            stack.redis = Redis(stack.tmpdir, appendfsync=cfg.redis_kill_fsync[0]).start()
            stack.chroma = Chroma(stack.tmpdir).start()
            stack._chroma_url = stack.chroma.url
            stack.fake = FakeModel(stack.tmpdir).start()
            main = stack.new_pool(cfg.pool_env(), workers=cfg.workers, threads=cfg.threads)
            stack.pool, stack.nginx = main.pool, main.nginx
        except BaseException:
            stack.stop()
            raise
        self.archive_dir = stack.tmpdir / "archive"
        return stack

    def _cleanup_env(self) -> "dict[str, str]":
        assert self.stack is not None and self.archive_dir is not None
        env = {k: v for k, v in self.stack.pool_env(1, {
            "CHATD_ARCHIVE_DIR": str(self.archive_dir),
            "CHATD_CLEANUP_INACTIVE_S": str(self.config.inactive_s),
        }).items() if v is not None}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        return env

    # ------------------------------------------------------------------
    # The load

    def _message(self, user: str, kind: str, n: int, fault_n: int) -> str:
        text = f"chaos {self.run_tag} {user} #{n} {uuid.uuid4().hex[:12]}"
        if kind == "forget":
            return f"{text} #fake:delay_ms={self.config.forget_model_delay_ms}"
        if self.model_faults.is_set():
            # In turn, from each user's first chat of the phase on: a 500 the
            # retries cannot cure (502), a 500 the first retry cures (200),
            # every attempt slower than its timeout (504), a normal chat.
            fault = fault_n % 4
            if fault == 0:
                return f"{text} #fake:status=500"
            if fault == 1:
                return f"{text} #fake:status=500 #fake:fail_times=1"
            if fault == 2:
                return f"{text} #fake:delay_ms={self.config.llm_attempt_timeout_ms + 1000}"
        return text

    def _attempt(self, chat: Chat) -> Attempt:
        assert self.stack is not None
        send = _now()
        try:
            status, headers, body = post_chat(self.stack.url, chat.user, chat.message,
                                              headers={"Idempotency-Key": chat.key},
                                              timeout=self.config.http_timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            return Attempt(send, _now(), 0, error=f"{type(exc).__name__}: {exc}"[:200])
        recv = _now()
        code = body.get("code", "") if isinstance(body, dict) else ""
        turn = body.get("turnId", "") if isinstance(body, dict) and status == 200 else ""
        return Attempt(send, recv, status, str(code), str(turn), retry_after=headers.get("retry-after", ""))

    def _chat(self, user: str, kind: str, n: int, fault_n: int) -> Chat:
        chat = Chat(user, kind, self._message(user, kind, n, fault_n), uuid.uuid4().hex)
        with self._chats_lock:
            self.chats.append(chat)
        for i in range(self.config.max_attempts):
            attempt = self._attempt(chat)
            chat.attempts.append(attempt)
            retry = attempt.status == 0 or (attempt.status in RETRY_STATUSES
                                            and attempt.code not in MODEL_FAILURE_CODES)
            if not retry or i == self.config.max_attempts - 1 or self.stop_users.is_set():
                break
            # A client's backoff, not synchronisation: Retry-After when given.
            hint = attempt.retry_after
            delay = min(float(hint), 2.0) if hint.isdigit() else self.config.retry_backoff_s
            self.stop_users.wait(delay)
        return chat

    def _user_loop(self, user: str, kind: str, period: float, stop: threading.Event) -> None:
        n = fault_n = 0
        next_send = _now()
        while not stop.is_set() and not self.stop_users.is_set():
            wait = next_send - _now()
            if wait > 0:
                stop.wait(wait)
                continue
            started = _now()
            faulty = self.model_faults.is_set()
            self._chat(user, kind, n, fault_n if faulty else 0)
            n += 1
            fault_n = fault_n + 1 if faulty else 0
            next_send = max(started + period, _now()) if period > 0 else _now()

    # ------------------------------------------------------------------
    # Watching the workers

    def _monitor(self) -> None:
        assert self.stack is not None
        pool = self.stack.pool
        while not self.stop_monitor.is_set():
            now = _now()
            alive = set(pool.worker_pids())
            for pid in alive:
                self.seen_pids.setdefault(pid, now)
            for pid in self.seen_pids:
                if pid not in alive and pid not in self.gone_pids:
                    self.gone_pids[pid] = now
            self.stop_monitor.wait(PID_SAMPLE_S)

    # ------------------------------------------------------------------
    # Phases

    def _phase(self, name: str, **detail: Any) -> Phase:
        phase = Phase(name, _now(), detail=dict(detail))
        self.phases.append(phase)
        self.log(f"[{time.strftime('%H:%M:%S')}] phase {name} {detail or ''}")
        return phase

    def _hold(self, seconds: float) -> None:
        # A phase lasts this long while the load runs: a duration, not a wait
        # for a condition.
        self.stop_monitor.wait(max(0.0, seconds))

    def _calm(self, seconds: float, label: str = "calm") -> None:
        if seconds <= 0:
            return
        phase = self._phase(label)
        self._hold(seconds)
        phase.end = _now()

    def _worker_kill(self) -> None:
        assert self.stack is not None
        pool = self.stack.pool
        phase = self._phase("worker-kill")
        before = pool.worker_pids()
        victim = before[0]
        self.killed_pids.add(victim)
        os.kill(victim, signal.SIGKILL)
        phase.detail.update(victim=victim, killed_at=_now())
        replaced = poll_until(lambda: (lambda pids: pids if len(pids) == len(before) and victim not in pids
                                       else None)(pool.worker_pids()), RESPAWN_TIMEOUT_S)
        phase.detail["respawned"] = bool(replaced)
        phase.detail["respawned_after_s"] = round(_now() - phase.detail["killed_at"], 3)
        self._hold(self.config.phase_s - (_now() - phase.start))
        phase.end = _now()

    def _redis_kill(self, mode: str) -> None:
        assert self.stack is not None and self.stack.redis is not None
        redis = self.stack.redis
        if redis.appendfsync != mode:
            redis.set_appendfsync(mode)
        phase = self._phase(f"redis-kill-{mode}", appendfsync=mode)
        # Half the phase runs before the kill, so that turns answered in the
        # seconds before it are at stake.
        self._hold(self.config.phase_s / 2)
        phase.detail["killed_at"] = _now()
        redis.kill()
        redis.start()  # from its AOF, on the same port; ready once it answers PING (not LOADING)
        phase.detail["restarted_at"] = _now()
        phase.detail["down_s"] = round(phase.detail["restarted_at"] - phase.detail["killed_at"], 3)
        self._hold(self.config.phase_s - (_now() - phase.start))
        phase.end = _now()

    def _chroma_freeze(self) -> None:
        assert self.stack is not None and self.stack.chroma is not None
        chroma = self.stack.chroma
        phase = self._phase("chroma-freeze", seconds=self.config.chroma_freeze_s)
        os.killpg(chroma.pid, signal.SIGSTOP)
        phase.detail["stopped_at"] = _now()
        try:
            self._hold(self.config.chroma_freeze_s)
        finally:
            os.killpg(chroma.pid, signal.SIGCONT)
        phase.detail["continued_at"] = _now()
        self._hold(self.config.phase_s - (_now() - phase.start))
        phase.end = _now()

    def _model_faults(self) -> None:
        phase = self._phase("model-faults")
        self.model_faults.set()
        try:
            self._hold(self.config.phase_s)
        finally:
            self.model_faults.clear()
        phase.end = _now()

    def _cleanup(self) -> None:
        """`chatd-cleanup run` (archives the sleepers), then `forget` of each
        forgettable user, one process at a time, all while the chats go on.
        One at a time: two cleanup processes at once is a race of its own
        (the second one's settling step releases the first one's lock)."""
        binary = self.build_dir / "bin" / "chatd-cleanup"
        env = self._cleanup_env()
        phase = self._phase("cleanup")
        self.stop_sleepers.set()
        jobs = [["run"]] + [["forget", user] for user, kind in self.users.items() if kind == "forget"]
        for args in jobs:
            started = _now()
            proc = subprocess.Popen([str(binary), *args], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _, stderr = proc.communicate(timeout=CLEANUP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
            ended = _now()
            records = json_log_records(stderr)
            summary = next((r for r in reversed(records) if r.get("event") == "cleanup_summary"), None)
            entry = {"args": args, "exit": proc.returncode, "start": started, "end": ended,
                     "summary": summary, "errors": [r for r in records if r.get("level") == "error"][:10]}
            self.cleanup_runs.append(entry)
            self.log(f"  chatd-cleanup {' '.join(args)}: exit {proc.returncode} in {ended - started:.1f} s")
            if args[0] == "forget":
                # The erase's point: its tombstone is a stream id, "<ms>-<seq>"
                # in Redis's clock (this machine's), kept longer than any chat.
                tomb = self.stack.redis.command("GET", rkeys.user_key(args[1], "erased"))
                entry["erased_ms"] = int(_bytes_text(tomb).split("-")[0]) if tomb else None
                self.forgets[args[1]] = entry
        phase.detail["runs"] = len(jobs)
        self._hold(self.config.phase_s - (_now() - phase.start))
        phase.end = _now()

    def _bench(self, mode: str) -> None:
        """Closed-loop chats as fast as the stack answers them, on fresh users
        of a second pool with no practical rate limit, next to the steady load."""
        assert self.stack is not None and self.stack.redis is not None
        if self.config.bench_s <= 0:
            return
        if self.stack.redis.appendfsync != mode:
            self.stack.redis.set_appendfsync(mode)
        if not hasattr(self, "_bench_frontend"):
            env = dict(self.config.pool_env(), CHATD_RATE_LIMIT="1000000")
            self._bench_frontend = self.stack.new_pool(env, workers=self.config.workers,
                                                       threads=self.config.threads)
        url = self._bench_frontend.url
        phase = self._phase(f"bench-{mode}", appendfsync=mode)
        deadline = _now() + self.config.bench_s
        latencies: "list[float]" = []
        statuses: Counter = Counter()
        lock = threading.Lock()

        def client(i: int) -> None:
            n = 0
            while _now() < deadline:
                user = f"bench-{self.run_tag}-{mode}-{i}-{n % 8}"
                started = time.monotonic()
                try:
                    status, _, _ = post_chat(url, user, f"bench {n} {uuid.uuid4().hex[:8]}",
                                             timeout=self.config.http_timeout_s)
                except (OSError, http.client.HTTPException):
                    status = 0
                elapsed = time.monotonic() - started
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(elapsed)
                n += 1

        started = _now()
        concurrently(client, range(self.config.bench_clients), max_workers=self.config.bench_clients)
        elapsed = _now() - started
        phase.end = _now()
        self.bench[mode] = {
            "chats_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "p99_ms": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1000, 1) if latencies else None,
            "answered": len(latencies), "statuses": dict(statuses), "clients": self.config.bench_clients,
            "seconds": round(elapsed, 1)}
        self.log(f"  bench {mode}: {self.bench[mode]}")

    # ------------------------------------------------------------------
    # Drain and reconcile

    def _drain(self) -> "dict[str, Any]":
        assert self.stack is not None and self.stack.redis is not None
        redis = self.stack.redis
        state: "dict[str, Any]" = {}

        def drained() -> bool:
            try:
                length = rkeys.total_len(redis, rkeys.all_index_streams())
                pending = rkeys.pending_total(redis)
            except (OSError, StackError, RuntimeError) as exc:
                state["error"] = str(exc)
                return False
            state.update(stream_length=length, pending=pending)
            return length == 0 and pending == 0

        started = _now()
        state["drained"] = bool(poll_until(drained, self.config.drain_timeout_s, DRAIN_POLL_S))
        state["seconds"] = round(_now() - started, 1)
        return state

    def _stored(self) -> "dict[str, Any]":
        """Everything the stores hold about the run's users: per store, the set
        of turn ids, and the user messages with the turn ids they are under."""
        assert self.stack is not None and self.stack.redis is not None and self.archive_dir is not None
        redis = self.stack.redis
        turns: "dict[str, set[str]]" = defaultdict(set)  # store -> turn ids
        texts: "dict[str, set[str]]" = defaultdict(set)  # user message -> turn ids (all stores)
        stream_turns: Counter = Counter()
        chroma_halves: "dict[str, set[str]]" = defaultdict(set)

        def note(store: str, turn: str, text: Optional[str]) -> None:
            turns[store].add(turn)
            if text is not None:
                texts[text].add(turn)

        for user in self.users:
            for raw in redis.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1) or []:
                entry = json.loads(raw)
                note("recent", _turn_of_message_id(entry["id"]),
                     entry["content"] if entry.get("role") == "user" else None)
            for message_id in redis.command("HKEYS", rkeys.user_key(user, "hot")) or []:
                note("hot", _turn_of_message_id(_bytes_text(message_id)), None)
        for streams, store in ((rkeys.all_index_streams(), "stream"), (rkeys.all_dead_letters(), "dead_letter")):
            try:
                entries = rkeys.stream_entries(redis, streams)
            except RuntimeError:
                entries = []
            for _, raw in entries:
                fields = _stream_fields(raw)
                turn = _bytes_text(fields.get("turn", b""))
                if store == "stream":
                    stream_turns[turn] += 1
                note(store, turn, _bytes_text(fields["u"]) if "u" in fields else None)
        for shard in range(DEFAULT_SHARDS):
            for record in shard_records(self.stack.chroma_url, shard):
                meta = record["metadata"] or {}
                turn = str(meta.get("turn") or _turn_of_message_id(record["raw_id"]))
                chroma_halves[turn].add(record["raw_id"].rsplit(":", 1)[-1])
                note("chroma", turn, record["document"] if meta.get("role") == "user" else None)
        for path in sorted(self.archive_dir.rglob("*.json")) if self.archive_dir.exists() else []:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for record in doc.get("records", []):
                meta = record.get("metadata") or {}
                turn = str(meta.get("turn") or _turn_of_message_id(str(record.get("id", ""))))
                note("archive", turn, record.get("document") if meta.get("role") == "user" else None)
        return {"turns": turns, "texts": texts, "stream_turns": stream_turns, "chroma_halves": chroma_halves}

    def _phase_at(self, t: float) -> str:
        current = "warmup"
        for phase in self.phases:
            if phase.start <= t:
                current = phase.name
        return current

    def _redis_kill_after(self, t: float) -> Optional[float]:
        """When `t` falls in a Redis-kill phase before its kill: the kill's time."""
        phase = next((p for p in reversed(self.phases) if p.start <= t), None)
        if phase is None or not phase.name.startswith("redis-kill"):
            return None
        killed_at = phase.detail.get("killed_at")
        return killed_at if killed_at is not None and t <= killed_at else None

    def _forget_class(self, chat: Chat) -> str:
        forget = self.forgets.get(chat.user)
        if forget is None:
            return "not forgotten"
        if chat.final.recv < forget["start"]:
            return "answered before the forget"
        if chat.first_send > forget["end"]:
            return "sent after the forget"
        # The chat reads the user's memory (and its erase fence) before it asks
        # the model: one the model saw before the erase surely read the old
        # memory and must be refused. One the model saw only later may have
        # read either side of the erase, so both outcomes are right: refused,
        # or kept as a memory that started after it.
        erased_ms = forget.get("erased_ms")
        seen = self.stack.fake.received_ms(chat.message) if erased_ms is not None else []
        if erased_ms is not None and seen and min(seen) > erased_ms:
            return "reached the model after the erase"
        return "in flight during the forget"

    def _reconcile(self, stored: "dict[str, Any]") -> "dict[str, Any]":
        cfg = self.config
        turns_by_store: "dict[str, set[str]]" = stored["turns"]
        all_found = set().union(*turns_by_store.values()) if turns_by_store else set()
        per_phase: "dict[str, dict]" = defaultdict(lambda: {"sent": 0, "answered": 0, "found": 0, "lost": 0,
                                                             "statuses": Counter(), "latencies": []})
        lost: "list[dict]" = []
        forgotten: "dict[str, dict]" = defaultdict(lambda: defaultdict(lambda: {"answered": 0, "kept": 0}))
        turn_owners: "dict[str, list[str]]" = defaultdict(list)
        found_in: Counter = Counter()
        for chat in self.chats:
            phase_name = self._phase_at(chat.first_send)
            row = per_phase[phase_name]
            row["sent"] += 1
            row["statuses"][chat.final.status] += 1
            if not chat.answered:
                continue
            turn = chat.final.turn
            turn_owners[turn].append(chat.message)
            answered_phase = per_phase[self._phase_at(chat.final.recv)]
            where = [store for store, ids in turns_by_store.items() if turn in ids]
            if self.users[chat.user] == "forget":
                cls = self._forget_class(chat)
                forgotten[chat.user][cls]["answered"] += 1
                if where:
                    forgotten[chat.user][cls]["kept"] += 1
                continue
            answered_phase["answered"] += 1
            answered_phase["latencies"].append(chat.final.recv - chat.final.send)
            for store in where:
                found_in[store] += 1
            if where:
                answered_phase["found"] += 1
            else:
                answered_phase["lost"] += 1
                item = {"turn": turn, "user": chat.user, "phase": self._phase_at(chat.final.recv),
                        "answered_at": round(chat.final.recv, 3),
                        "attempts": [(a.status, a.code) for a in chat.attempts]}
                kill = self._redis_kill_after(chat.final.recv)
                if kill is not None:
                    item["answered_before_redis_kill_s"] = round(kill - chat.final.recv, 3)
                lost.append(item)

        # Duplicates: a message under two turn ids, or a turn id given to two messages.
        sent_texts = {c.message for c in self.chats}
        by_text = {c.message: c for c in self.chats}
        # A duplicate's fault window: where its first attempt ended (in failure).
        dup_messages = {t: {"turns": sorted(ids), "user": by_text[t].user,
                            "fault_window": self._phase_at(by_text[t].attempts[0].recv),
                            "attempts": [(a.status, a.code, a.turn, round(a.send, 3)) for a in by_text[t].attempts]}
                        for t, ids in stored["texts"].items() if len(ids) > 1 and t in sent_texts}
        dup_turns = {t: m for t, m in turn_owners.items() if len(m) > 1}
        dup_stream = {t: n for t, n in stored["stream_turns"].items() if n > 1}
        # Stored although the client never got a 200 for it (a 503 or 502 that said "not recorded").
        answered_texts = {c.message for c in self.chats if c.answered}
        recorded_unanswered = [{"user": c.user, "attempts": [(a.status, a.code) for a in c.attempts],
                                "phase": self._phase_at(c.first_send)}
                               for c in self.chats if not c.answered and c.message in stored["texts"]
                               and self.users[c.user] != "forget"]
        half_turns = sorted(t for t, halves in stored["chroma_halves"].items() if halves != {"u", "a"})

        # Admissions over the limit, per user and fixed window (see the module doc).
        over: "list[dict]" = []
        possible: "list[dict]" = []
        for user, kind in self.users.items():
            definite: Counter = Counter()
            straddling: Counter = Counter()
            forget = self.forgets.get(user)
            for chat in self.chats:
                if chat.user != user or not chat.answered:
                    continue
                first, last = math.floor(chat.first_send / cfg.rate_window_s), math.floor(
                    chat.final.recv / cfg.rate_window_s)
                if first == last:
                    definite[first] += 1
                else:
                    for w in range(first, last + 1):
                        straddling[w] += 1
            for window, count in sorted(definite.items()):
                w_start = window * cfg.rate_window_s
                # forget deletes the user's rate-limit keys on purpose (erasure):
                # the window it ran in starts a fresh count.
                if forget and forget["start"] < w_start + cfg.rate_window_s and forget["end"] > w_start:
                    continue
                if count > cfg.rate_limit:
                    over.append({"user": user, "kind": kind, "window_start": w_start, "admitted": count,
                                 "phase": self._phase_at(w_start)})
            for window in set(definite) | set(straddling):
                if definite[window] + straddling[window] > cfg.rate_limit and definite[window] <= cfg.rate_limit:
                    possible.append({"user": user, "window_start": window * cfg.rate_window_s,
                                     "definite": definite[window], "straddling": straddling[window]})

        phases_out = {}
        for name, row in per_phase.items():
            lat = row.pop("latencies")
            row["statuses"] = {str(k): v for k, v in sorted(row["statuses"].items())}
            row["p50_ms"] = round(statistics.median(lat) * 1000, 1) if lat else None
            phases_out[name] = row
        answered = sum(r["answered"] for r in phases_out.values())
        found = sum(r["found"] for r in phases_out.values())
        return {
            "totals": {"chats": len(self.chats), "answered": answered, "found": found, "lost": len(lost),
                       "found_in": dict(found_in), "stored_turns": len(all_found)},
            "phases": phases_out,
            "lost": lost,
            "duplicates": {"count": len(dup_messages) + len(dup_turns) + len(dup_stream),
                           "messages_under_several_turns": dict(list(dup_messages.items())[:20]),
                           "turns_answered_twice": dict(list(dup_turns.items())[:20]),
                           "turns_twice_in_stream": dict(list(dup_stream.items())[:20])},
            "recorded_but_not_answered": {"count": len(recorded_unanswered), "chats": recorded_unanswered[:20]},
            "chroma_half_turns": half_turns[:20],
            "over_limit": {"count": len(over), "windows": over[:50], "possible_at_boundaries": possible[:50],
                           "limit": cfg.rate_limit, "window_s": cfg.rate_window_s},
            "forgotten": {u: {"forget": {k: self.forgets[u][k] for k in ("start", "end", "exit")},
                              **{cls: dict(v) for cls, v in classes.items()}}
                          for u, classes in forgotten.items() if u in self.forgets},
        }

    def _crashes(self) -> "dict[str, Any]":
        assert self.stack is not None
        text = self.stack.pool.log_text()
        respawns = text.count(RESPAWN_LINE)
        unexpected = sorted(pid for pid in self.gone_pids if pid not in self.killed_pids)
        sanitizer = [m for m in SANITIZER_MARKERS if m in text]
        fatal = [r for r in self.stack.pool.log_records() if r.get("level") in ("fatal", "critical")]
        return {
            "count": len(unexpected) + len(sanitizer) + (1 if GIVE_UP_LINE in text else 0),
            "killed_on_purpose": sorted(self.killed_pids),
            "unexpected_exits": unexpected,
            "respawn_lines": respawns,
            "gave_up": GIVE_UP_LINE in text,
            "sanitizer_reports": sanitizer,
            "fatal_log_lines": fatal[:10],
            "workers_seen": len(self.seen_pids),
        }

    # ------------------------------------------------------------------
    # The run

    def _make_users(self) -> "list[tuple[str, str, float]]":
        cfg = self.config
        plan = []
        for kind, count, period in (("steady", cfg.steady_users, cfg.steady_period_s),
                                    ("hot", cfg.hot_users, cfg.hot_period_s),
                                    ("forget", cfg.forget_users, cfg.forget_model_delay_ms / 1000),
                                    ("sleeper", cfg.sleeper_users, cfg.steady_period_s)):
            for i in range(count):
                user = f"{kind}-{self.run_tag}-{i}"
                self.users[user] = kind
                plan.append((user, kind, period))
        return plan

    def run(self) -> "dict[str, Any]":
        """Starts the stack, runs everything, returns the report; the stack is
        stopped whatever happens."""
        started = _now()
        self.stack = self._start_stack()
        try:
            return self._load_inject_reconcile(started)
        finally:
            self.stop_monitor.set()
            self.stack.stop()

    def _load_inject_reconcile(self, started: float) -> "dict[str, Any]":
        cfg = self.config
        assert self.stack is not None
        threads: "list[threading.Thread]" = []
        monitor = threading.Thread(target=self._monitor, name="chaos-monitor", daemon=True)
        try:
            monitor.start()
            poll_until(lambda: len(self.seen_pids) >= cfg.workers, RESPAWN_TIMEOUT_S)
            for user, kind, period in self._make_users():
                stop = self.stop_sleepers if kind == "sleeper" else self.stop_users
                thread = threading.Thread(target=self._user_loop, args=(user, kind, period, stop),
                                          name=f"chaos-{user}", daemon=True)
                thread.start()
                threads.append(thread)
            self._calm(cfg.warmup_s, "warmup")
            # The sleepers stop now so that they are inactive by the cleanup
            # phase; their last chat ends first.
            self.stop_sleepers.set()
            for thread in threads:
                if thread.name.startswith("chaos-sleeper-"):
                    thread.join(timeout=cfg.http_timeout_s * cfg.max_attempts + 5)
            actions: "dict[str, Callable[[], None]]" = {
                "worker-kill": self._worker_kill,
                "redis-kill": lambda: [self._redis_kill(m) or self._calm(cfg.calm_s, f"calm-after-redis-kill-{m}")
                                       for m in cfg.redis_kill_fsync],
                "chroma-freeze": self._chroma_freeze,
                "model-faults": self._model_faults,
                "cleanup": self._cleanup,
            }
            for name in cfg.phases:
                if name == "cleanup":
                    # The sleepers must have been idle longer than the threshold
                    # (a duration measured from their last chat's answer).
                    last = max((c.final.recv for c in list(self.chats)
                                if self.users[c.user] == "sleeper" and c.attempts), default=_now())
                    self._hold(cfg.inactive_s + 1 - (_now() - last))
                actions[name]()
                if name != "redis-kill":
                    self._calm(cfg.calm_s, f"calm-after-{name}")
        finally:
            self.stop_users.set()
            self.stop_sleepers.set()
            for thread in threads:
                thread.join(timeout=cfg.http_timeout_s * cfg.max_attempts + 5)
            if self.stack.chroma is not None and self.stack.chroma.pid:
                try:
                    os.killpg(self.stack.chroma.pid, signal.SIGCONT)
                except (ProcessLookupError, PermissionError):
                    pass
        drain = self._drain()
        stored = self._stored()
        # After the reconciliation, so that its thousands of turns neither
        # meet the cleanup (they would all be inactive users to archive) nor
        # hold up the drain; the chaos load has stopped by then.
        for mode in dict.fromkeys(cfg.redis_kill_fsync) if cfg.bench_s > 0 else ():
            self._bench(mode)
        self.stop_monitor.set()
        monitor.join()
        report = self._reconcile(stored)
        report["drain"] = drain
        report["crashes"] = self._crashes()
        report["bench"] = self.bench
        report["cleanup_runs"] = list(self.cleanup_runs)
        report["phase_windows"] = [dataclasses.asdict(p) for p in self.phases]
        report["config"] = dataclasses.asdict(cfg)
        report["seconds"] = round(_now() - started, 1)
        report["users"] = dict(Counter(self.users.values()))
        return report


def summary_text(report: "dict[str, Any]") -> str:
    """The human summary of a report."""
    t = report["totals"]
    lines = [f"chaos run: {report['seconds']} s, {report['users']} users",
             f"turns answered {t['answered']}, found {t['found']}, lost {t['lost']} "
             f"(found in: {t['found_in']})",
             "per phase: chats sent in it (all users) and their final statuses; turns answered in it, found and "
             "lost (forgotten users apart)",
             f"{'phase':<30}{'sent':>6}{'answ.':>6}{'found':>7}{'lost':>6}{'p50 ms':>8}  statuses"]
    for name, row in report["phases"].items():
        lines.append(f"{name:<30}{row['sent']:>6}{row['answered']:>6}{row['found']:>7}{row['lost']:>6}"
                     f"{row['p50_ms'] if row['p50_ms'] is not None else '-':>8}  {row['statuses']}")
    for item in report["lost"][:10]:
        lines.append(f"  lost: turn {item['turn']} of {item['user']} answered in {item['phase']}")
    d = report["duplicates"]
    lines.append(f"duplicates: {d['count']}")
    for text, info in list(d["messages_under_several_turns"].items())[:5]:
        lines.append(f"  {text[:60]!r} (first attempt ended in {info['fault_window']}) under turns {info['turns']}; "
                     f"attempts {[(a[0], a[1]) for a in info['attempts']]}")
    lines.append(f"recorded although not answered 200: {report['recorded_but_not_answered']['count']}")
    o = report["over_limit"]
    lines.append(f"admissions over the limit ({o['limit']} per {o['window_s']} s): {o['count']} "
                 f"(boundary cases not decidable: {len(o['possible_at_boundaries'])})")
    for item in o["windows"][:5]:
        lines.append(f"  {item['user']}: {item['admitted']} in the window at {item['window_start']} ({item['phase']})")
    c = report["crashes"]
    lines.append(f"worker crashes: {c['count']} (killed on purpose: {len(c['killed_on_purpose'])}, "
                 f"respawn lines {c['respawn_lines']}, unexpected exits {c['unexpected_exits']})")
    for user, info in report["forgotten"].items():
        classes = {k: v for k, v in info.items() if k != "forget"}
        lines.append(f"forgotten {user} (exit {info['forget']['exit']}): {classes}")
    for mode, b in report["bench"].items():
        lines.append(f"calm throughput, appendfsync {mode}: {b['chats_per_s']} chats/s, p50 {b['p50_ms']} ms, "
                     f"p99 {b['p99_ms']} ms ({b['clients']} clients, {b['seconds']} s)")
    lines.append(f"indexers drained: {report['drain']}")
    return "\n".join(lines)
