"""The phases of `make bench`: the bench's own services (nginx with room for
thousands of connections), wrk runs, and each measured phase."""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

from bench_settings import (
    BACKLOG_DRAIN_LIMIT_S, BACKLOG_POLL_S, BACKLOG_SAMPLE_S, BASE_POOL_ENV, CAPACITY_DELAY_MS,
    CAPACITY_P99_BREAK_FACTOR, CAPACITY_RUN_S, CAPACITY_SAMPLE_S, CAPACITY_STEPS, CAPACITY_THREADS,
    CAPACITY_WORKERS, CAP_CONNECTIONS, CAP_OFF_ENV, CAP_RUN_S, CEILING_CONNECTIONS, CEILING_RUN_S,
    CHAT_CONCURRENCY, CHAT_PREFIX, CHAT_RUN_S, CHAT_USERS, CHROMA_ADDS, CHROMA_BATCH_USERS, CHROMA_COLD_SAMPLE,
    CHROMA_FIRST_QUERIES, CHROMA_LOAD_THREADS, CHROMA_MESSAGES, CHROMA_QUERIES, CHROMA_SHARDS,
    CHROMA_STAGE_TIMEOUT_S, CHROMA_TIMEOUT_MS, CLK_TCK, Chroma, FakeModel, Frontend, GATEWAY_CONNECTIONS,
    GATEWAY_ONLY_ENV, GATEWAY_RUN_S, LAYOUT_STUDY, LIMITED_USER_PREFIX, LOOPBACK,
    MEMORY_CONNECTIONS, MEMORY_RUN_S, MEMORY_SEED_WORKERS, MEMORY_TURNS, NGINX_RLIMIT_NOFILE,
    NGINX_WORKER_CONNECTIONS, Nginx, POOL_THREADS, POOL_WORKERS, Pool, RATE_LIMIT, RATE_WINDOW_S, REJECTED_RUN_S,
    REPO, Redis, STREAM_SECONDS, STREAM_STEPS, STREAM_TIMEOUT_S, STREAM_TTFB_CHUNK_DELAY_MS,
    STREAM_TTFB_CONNECTIONS, STREAM_TTFB_RUN_S, STREAM_TTFB_THREADS, STREAM_TTFB_WORKERS, STREAM_WORDS, Stack,
    StackError, TARGET_CAPACITY_RSS_BYTES, WARMUP_CONNECTIONS, WARMUP_RUN_S, WRK_SCRIPT, WRK_THREADS,
    WRK_TIMEOUT_S, concurrently, free_port, http_json, nginx_limits_for, post_chat, raise_nofile_limit, say)
from harness import keys as rkeys
from harness.clients import redis_now_ms
from harness.cluster import RedisCluster
from bench_procfs import (
    Probe, chroma_collections, delta, descendants, loadavg, metric, open_files, pool_requests, proc_ticks,
    pss_kib, redis_breakdown, scrape_metrics, status_kib)


# ---------------------------------------------------------------------------
# Building the bench binaries


def build_bench_binaries(build_dir: Path) -> None:
    """The bench's own binaries, through the Makefile's rules, with the BUILD
    spelling `make bench` used so make sees the same targets."""
    bins = ("trivial_fcgi", "chroma_bench", "sse_ttfb")
    rel = os.path.relpath(build_dir, REPO)
    build = build_dir if rel.startswith("..") else Path(rel)
    subprocess.run(["make", "-j2", f"BUILD={build}"] + [str(build / "bin" / n) for n in bins], cwd=REPO, check=True)


# ---------------------------------------------------------------------------
# Services for the bench: the harness's, with room for thousands of connections


class BenchNginx(Nginx):
    """The harness's nginx (same templates), plus two bench locations in the
    same server: /bench/static (nginx alone) and /bench/trivial (the trivial
    FastCGI pool), and worker limits for thousands of connections."""

    def __init__(self, *args: Any, trivial_socket: Optional[Path] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trivial_socket = trivial_socket

    def render(self) -> Path:
        conf = super().render()
        site_path = self.prefix / "chatd-site.conf"
        site = site_path.read_text()
        extra = ["", "    # make bench only: the ceilings, through this same server.",
                 "    location = /bench/static {", "        return 200 '{\"response\":\"ok\"}\\n';", "    }"]
        if self.trivial_socket is not None:
            extra += ["    location = /bench/trivial {", f"        fastcgi_pass unix:{self.trivial_socket};", "    }"]
        end = site.rstrip().rfind("}")
        site = site[:end] + "\n".join(extra) + "\n" + site[end:]
        site_path.write_text(site)

        main = conf.read_text()
        main, n = re.subn(r"worker_connections\s+\d+;", f"worker_connections {NGINX_WORKER_CONNECTIONS};", main)
        if n != 1:
            raise StackError("bench: expected one worker_connections in nginx-local.conf.in")
        if re.search(r"worker_rlimit_nofile\s+\d+;", main):
            main = re.sub(r"worker_rlimit_nofile\s+\d+;", f"worker_rlimit_nofile {NGINX_RLIMIT_NOFILE};", main)
        else:
            main, n = re.subn(r"(worker_processes[^;]*;)", rf"\1\nworker_rlimit_nofile {NGINX_RLIMIT_NOFILE};",
                              main, count=1)
            if n != 1:
                raise StackError("bench: no worker_processes line in nginx-local.conf.in")
        conf.write_text(main)
        return conf


def start_frontend(stack: Stack, name: str, env_overrides: dict, workers: int, threads: int,
                   trivial: bool) -> "tuple[Frontend, Optional[Pool]]":
    """A chat pool (and optionally a trivial pool of the same N x T) behind one
    BenchNginx; stopped with the stack."""
    folder = stack.tmpdir / name
    overrides = dict(env_overrides)
    overrides.setdefault("CHATD_METRICS_FILE", str(folder / "metrics"))
    env = stack.pool_env(threads, overrides)
    pool = Pool(folder / "pool", stack.build_dir, env, workers=workers, threads=threads)
    trivial_pool = None
    if trivial:
        # The harness's pool, running the trivial responder instead of chatd.
        trivial_pool = Pool(folder / "trivial", stack.build_dir, {"CHATD_THREADS": str(threads)},
                            workers=workers, threads=threads)
        trivial_pool.binary = stack.build_dir / "bin" / "trivial_fcgi"
    max_body, read_timeout = nginx_limits_for(env)
    nginx = BenchNginx(folder / "nginx", pool.socket_path, max_body_bytes=max_body, read_timeout_s=read_timeout,
                       trivial_socket=trivial_pool.socket_path if trivial_pool else None)
    pool.start()
    frontend = Frontend(pool, nginx)
    stack.frontends.append(frontend)  # from here on, stack.stop() stops it
    if trivial_pool is not None:
        trivial_pool.start()
        stack.frontends.append(Frontend(trivial_pool, nginx))
    nginx.start()
    return frontend, trivial_pool


def start_stack(build_dir: Path, tmp_parent: Optional[str]) -> Stack:
    """Redis, Chroma and the fake model, as Stack.start does, without its
    pool: the bench starts its own frontends."""
    stack = Stack(build_dir, tempfile.mkdtemp(prefix="chatd-bench-", dir=tmp_parent))
    stack._own_tmpdir = True  # removed by stop(), like a stack the harness made
    try:
        stack.redis = Redis(stack.tmpdir).start()
        stack.chroma = Chroma(stack.tmpdir).start()
        stack._chroma_url = stack.chroma.url
        stack.fake = FakeModel(stack.tmpdir).start()
    except BaseException:
        stack.stop()
        raise
    return stack


def stop_frontend(stack: Stack, frontend: Frontend) -> None:
    for f in [f for f in stack.frontends if f.nginx is frontend.nginx]:
        f.nginx.stop()
        f.pool.stop()
        stack.frontends.remove(f)


# ---------------------------------------------------------------------------
# wrk


def run_wrk(url: str, path: str, connections: int, duration_s: int, users: int, prefix: str,
            timeout_s: int = WRK_TIMEOUT_S) -> "dict[str, Any]":
    threads = min(WRK_THREADS, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout",
            f"{timeout_s}s", "-s", str(WRK_SCRIPT), url, "--", str(users), prefix, path]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 60,
                          preexec_fn=raise_nofile_limit)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result = json.loads(line[len("WRK_JSON "):])
            break
    else:
        raise StackError(f"wrk printed no result (status {done.returncode}):\n{done.stdout}\n{done.stderr}")
    duration = result["duration_us"] / 1e6
    result["connections"] = connections
    result["rps"] = result["requests"] / duration if duration else 0.0
    result["socket_errors"] = (result["errors_connect"] + result["errors_read"] + result["errors_write"]
                               + result["errors_timeout"])
    return result


def measured_run(probe: Probe, path: str, connections: int, duration_s: int, users: int, prefix: str,
                 with_chat: bool = True, timeout_s: int = WRK_TIMEOUT_S) -> "dict[str, Any]":
    before = probe.snapshot(with_chat)
    load = loadavg()
    wrk = run_wrk(probe.frontend.url, path, connections, duration_s, users, prefix, timeout_s)
    after = probe.snapshot(with_chat)
    d = delta(before, after)
    return {"wrk": wrk, "delta": d, "loadavg_before": load}


def index_backlog(stack: Stack) -> int:
    """Recorded turns the indexers have not yet moved into Chroma."""
    return rkeys.total_len(stack.redis, rkeys.all_index_streams())


# ---------------------------------------------------------------------------
# Phases


def chat_figures(run: "dict[str, Any]", ceiling_rps: float) -> "dict[str, Any]":
    """The per-request figures of one chat run."""
    wrk, d = run["wrk"], run["delta"]
    statuses = pool_requests(d)
    answered = sum(statuses.values())
    chats = statuses.get("200", 0.0)
    pool_cpu = d["cpu_s"].get("pool", 0.0)
    model_count = metric(d, "chatd_model_duration_seconds_count")
    model_mean_ms = metric(d, "chatd_model_duration_seconds_sum") / model_count * 1000 if model_count else 0.0
    req_count = metric(d, "chatd_request_duration_seconds_count")
    pool_mean_ms = metric(d, "chatd_request_duration_seconds_sum") / req_count * 1000 if req_count else 0.0
    latency_mean_ms = wrk["latency_mean_us"] / 1000
    redis = redis_breakdown(d)
    # The request path calls Chroma only for a user whose hot set is full
    # (one query each, counted by chatd_recall_long_term_queries_total);
    # every other Chroma call is the indexer's (one upsert per shard per
    # batch, and the shard id lookups, once per process).
    chroma_calls = metric(d, "chatd_chroma_calls_total")
    request_path_chroma = metric(d, "chatd_recall_long_term_queries_total")
    per = lambda x: x / chats if chats else 0.0  # noqa: E731
    threads = d.get("pool_threads_cpu_s", {})
    return {
        "connections": wrk["connections"],
        "rps": wrk["rps"],
        "share_of_fastcgi_ceiling": wrk["rps"] / ceiling_rps if ceiling_rps else 0.0,
        "latency_ms": {"mean": latency_mean_ms, "p50": wrk["latency_p50_us"] / 1000,
                       "p90": wrk["latency_p90_us"] / 1000, "p99": wrk["latency_p99_us"] / 1000,
                       "p999": wrk["latency_p999_us"] / 1000, "max": wrk["latency_max_us"] / 1000},
        "requests": wrk["requests"],
        "errors_http": wrk["errors_status"],
        "errors_socket": wrk["socket_errors"],
        "pool_statuses": statuses,
        "model_mean_ms": model_mean_ms,
        "pool_mean_ms": pool_mean_ms,
        # What the gateway adds to the model's own time, end to end and
        # inside the pool (Redis, Chroma, embedding, prompt, JSON).
        "gateway_overhead_mean_ms": latency_mean_ms - model_mean_ms,
        "pool_overhead_mean_ms": pool_mean_ms - model_mean_ms,
        "nginx_fastcgi_mean_ms": latency_mean_ms - pool_mean_ms,
        "pool_cpu_us_per_request": pool_cpu / answered * 1e6 if answered else 0.0,
        "pool_request_threads_cpu_us_per_request":
            threads.get("request_threads", 0.0) / answered * 1e6 if answered and threads else None,
        "pool_other_threads_cpu_us_per_request":
            threads.get("other_threads", 0.0) / answered * 1e6 if answered and threads else None,
        "redis_round_trips_per_chat": per(redis["request_path"]),
        # The same per answered request, for runs where not every request
        # is a chat (gateway_cluster while records are refused).
        "redis_round_trips_per_request": redis["request_path"] / answered if answered else 0.0,
        "redis_limiter_scripts_per_chat": per(redis["limiter_scripts"]),
        "redis_record_scripts_per_chat": per(redis["record_scripts"]),
        "redis_lrange_per_chat": per(redis["lrange"]),
        "redis_hvals_pipelined_per_chat": per(redis["hvals_pipelined"]),
        "redis_eval_fallbacks": redis["eval_fallbacks"],
        "redis_indexer_round_trips_per_chat": per(redis["indexer"]),
        "redis_connections_opened": redis["connections_opened"],
        "redis_commands": {k[4:]: v for k, v in d.get("redis", {}).items() if k.startswith("cmd.")},
        "chroma_calls_per_chat": per(chroma_calls),
        "chroma_request_path_calls_per_chat": per(request_path_chroma),
        "chroma_indexer_calls_per_chat": per(max(0.0, chroma_calls - request_path_chroma)),
        "model_calls_per_chat": per(metric(d, "chatd_model_calls_total")),
        "fake_chat_requests_per_chat": per(d.get("fake_chat_requests", 0)),
        "recall_degraded": metric(d, "chatd_recall_degraded_total"),
        "turns_indexed": metric(d, "chatd_turns_indexed_total"),
        "cpu_s": d["cpu_s"],
        # Where the machine's CPU went, per answered request: every figure
        # here is bounded by the sum, on 2 cores shared by all of them.
        "cpu_us_per_request": {k: v / answered * 1e6 for k, v in d["cpu_s"].items()} if answered else {},
        "machine_cpus_busy": d["machine_cpus_busy"],
        "loadavg_before": run["loadavg_before"],
    }


def phase_ceilings(probe: Probe) -> "dict[str, Any]":
    out = {}
    for name, path in (("nginx_static", "/bench/static"), ("nginx_trivial_fastcgi", "/bench/trivial")):
        say(f"bench: ceiling {name}, {CEILING_CONNECTIONS} connections, {CEILING_RUN_S} s")
        run = measured_run(probe, path, CEILING_CONNECTIONS, CEILING_RUN_S, CHAT_USERS, CHAT_PREFIX,
                           with_chat=False)
        wrk, d = run["wrk"], run["delta"]
        n = wrk["requests"] or 1
        out[name] = {
            "rps": wrk["rps"], "connections": CEILING_CONNECTIONS,
            "latency_ms": {"p50": wrk["latency_p50_us"] / 1000, "p99": wrk["latency_p99_us"] / 1000,
                           "p999": wrk["latency_p999_us"] / 1000},
            "errors": wrk["errors_status"] + wrk["socket_errors"],
            "nginx_cpu_us_per_request": d["cpu_s"].get("nginx", 0) / n * 1e6,
            "trivial_pool_cpu_us_per_request": d["cpu_s"].get("trivial_pool", 0) / n * 1e6,
            "wrk_cpu_us_per_request": d["cpu_s"].get("wrk", 0) / n * 1e6,
            "cpu_s": d["cpu_s"], "machine_cpus_busy": d["machine_cpus_busy"],
            "loadavg_before": run["loadavg_before"],
        }
        say(f"bench:   {wrk['rps']:.0f} req/s, p99 {wrk['latency_p99_us'] / 1000:.2f} ms")
    return out


def phase_rejected(stack: Stack, probe: Probe, ceiling_rps: float) -> "dict[str, Any]":
    user = f"{LIMITED_USER_PREFIX}1"
    say(f"bench: rejected path: driving {user} over its limit ({RATE_LIMIT} per {RATE_WINDOW_S} s)")
    url = probe.frontend.url
    concurrently(lambda i: post_chat(url, user, f"filler {i}"), range(RATE_LIMIT), max_workers=16)
    status, _, _ = post_chat(url, user, "one more")
    if status != 429:
        raise StackError(f"bench: {user} is not over its limit (got {status})")
    say(f"bench: rejected path, {CEILING_CONNECTIONS} connections, {REJECTED_RUN_S} s")
    run = measured_run(probe, "/api/chat", CEILING_CONNECTIONS, REJECTED_RUN_S, 1, LIMITED_USER_PREFIX)
    wrk, d = run["wrk"], run["delta"]
    statuses = pool_requests(d)
    answered = sum(statuses.values()) or 1
    redis = redis_breakdown(d)
    rejected = statuses.get("429", 0.0) or 1
    out = {
        "rps": wrk["rps"], "connections": CEILING_CONNECTIONS,
        "share_of_fastcgi_ceiling": wrk["rps"] / ceiling_rps if ceiling_rps else 0.0,
        "latency_ms": {"p50": wrk["latency_p50_us"] / 1000, "p99": wrk["latency_p99_us"] / 1000,
                       "p999": wrk["latency_p999_us"] / 1000},
        "requests": wrk["requests"], "non_429": answered - statuses.get("429", 0.0),
        "socket_errors": wrk["socket_errors"], "pool_statuses": statuses,
        "pool_cpu_us_per_request": d["cpu_s"].get("pool", 0) / answered * 1e6,
        "redis_round_trips_per_request": redis["request_path"] / rejected,
        "redis_lrange": redis["lrange"], "model_calls": metric(d, "chatd_model_calls_total"),
        "cpu_s": d["cpu_s"], "machine_cpus_busy": d["machine_cpus_busy"], "loadavg_before": run["loadavg_before"],
    }
    say(f"bench:   {wrk['rps']:.0f} req/s ({out['share_of_fastcgi_ceiling']:.0%} of the FastCGI ceiling)")
    return out


def chat_line(f: "dict[str, Any]") -> str:
    return (f"{f['rps']:.0f} req/s, p50 {f['latency_ms']['p50']:.2f} ms, p99 {f['latency_ms']['p99']:.2f} ms, "
            f"errors {f['errors_http'] + f['errors_socket']}, pool CPU {f['pool_cpu_us_per_request']:.0f} us/req, "
            f"Redis {f['redis_round_trips_per_chat']:.2f}/chat")


def phase_chat(stack: Stack, probe: Probe, ceiling_rps: float) -> "dict[str, Any]":
    say(f"bench: chat warm-up, {WARMUP_CONNECTIONS} connections, {WARMUP_RUN_S} s, {CHAT_USERS} users")
    run_wrk(probe.frontend.url, "/api/chat", WARMUP_CONNECTIONS, WARMUP_RUN_S, CHAT_USERS, CHAT_PREFIX)
    out: "dict[str, Any]" = {"users": CHAT_USERS, "runs": {}}
    for connections in CHAT_CONCURRENCY:
        duration = CHAT_RUN_S[connections]
        say(f"bench: full chat path, {connections} connections, {duration} s")
        backlog_before = index_backlog(stack)
        collections_before = chroma_collections(stack.chroma_url)
        run = measured_run(probe, "/api/chat", connections, duration, CHAT_USERS, CHAT_PREFIX)
        figures = chat_figures(run, ceiling_rps)
        figures["index_backlog_before"] = backlog_before
        figures["index_backlog_after"] = index_backlog(stack)
        figures["user_collections_before"] = collections_before
        out["runs"][str(connections)] = figures
        say("bench:   " + chat_line(figures))
    return out


class PeriodicSampler(threading.Thread):
    """Calls sample() every `period_s` while a run goes on and keeps what it
    returns (None: a sample that could not be taken, skipped)."""

    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.stop_event = threading.Event()
        self.samples: "list[dict[str, Any]]" = []

    def sample(self) -> "Optional[dict[str, Any]]":
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            taken = self.sample()
            if taken is not None:
                self.samples.append(taken)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def backlog_now(stack: Stack, url: str) -> "dict[str, Any]":
    """The indexer backlog two ways: the gauges chatd publishes in /metrics
    (what an operator sees; refreshed about once a second, absent when
    stale) and the stream itself, read from Redis at this instant."""
    out: "dict[str, Any]" = {"t": time.monotonic()}
    try:
        m = scrape_metrics(url)
    except (OSError, StackError):
        m = {}
    for key in ("chatd_index_waiting", "chatd_index_pending", "chatd_index_oldest_age_seconds"):
        out[key] = m.get(key)
    r = stack.redis
    out["stream_len"] = rkeys.total_len(r, rkeys.all_index_streams())
    firsts = [f for k in rkeys.all_index_streams() for f in (r.command("XRANGE", k, "-", "+", "COUNT", "1") or [])]
    now_ms = redis_now_ms(r)
    # Entry ids are "<ms>-<seq>": the oldest entry's age over the shards, as chatd computes it.
    oldest = min((int(f[0].split(b"-")[0]) for f in firsts), default=None)
    out["stream_oldest_age_s"] = (now_ms - oldest) / 1000 if oldest is not None else 0.0
    return out


def backlog_empty(b: "dict[str, Any]") -> Optional[bool]:
    if b["chatd_index_waiting"] is None or b["chatd_index_pending"] is None:
        return None
    return b["chatd_index_waiting"] + b["chatd_index_pending"] == 0


def wait_backlog_empty(stack: Stack, url: str, limit_s: float) -> "dict[str, Any]":
    """Seconds until waiting + pending == 0 in /metrics, and until the stream
    is empty in Redis (the exact figure; the gauges lag by up to ~1 s)."""
    started = time.monotonic()
    metrics_s = stream_s = None
    first = last = None
    while time.monotonic() - started < limit_s:
        b = backlog_now(stack, url)
        first = first or b
        last = b
        if stream_s is None and b["stream_len"] == 0:
            stream_s = b["t"] - started
        if metrics_s is None and backlog_empty(b):
            metrics_s = b["t"] - started
        if metrics_s is not None and stream_s is not None:
            break
        time.sleep(BACKLOG_POLL_S)
    # When it does not empty in time, the turns left and the rate they went
    # at say how long it would have taken.
    return {"metrics_s": metrics_s, "stream_s": stream_s, "limit_s": limit_s,
            "stream_len_start": first["stream_len"] if first else None,
            "stream_len_end": last["stream_len"] if last else None,
            "seconds_waited": (last["t"] - started) if last else 0.0}


class BacklogSampler(PeriodicSampler):
    """The indexer backlog every BACKLOG_SAMPLE_S while a run goes on."""

    def __init__(self, stack: Stack, url: str) -> None:
        super().__init__(BACKLOG_SAMPLE_S)
        self.stack, self.url = stack, url

    def sample(self) -> "Optional[dict[str, Any]]":
        try:
            return backlog_now(self.stack, self.url)
        except (OSError, StackError, IndexError, ValueError):
            return None


def percentile(values: "list[float]", p: float) -> Optional[float]:
    """Nearest rank, as wrk and chroma_bench report them."""
    if not values:
        return None
    v = sorted(values)
    rank = max(1, int(-(-p / 100 * len(v) // 1)))
    return v[min(len(v), rank) - 1]


def chatd_own_split(records: "list[dict]") -> "dict[str, Any]":
    """From the pool's request log: where each chat's own time went, before
    the model call (admission, memory, recall) and after it (the record),
    p50 and p99 in ms over the chats that called the model."""
    timed = [r for r in records if r.get("event") == "request" and "before_model_ms" in r]
    before = [r["before_model_ms"] for r in timed]
    after = [r["latency_ms"] - r["upstream_ms"] - r["before_model_ms"] for r in timed]

    def summary(values: "list[float]") -> "dict[str, Any]":
        return {"p50": round(percentile(values, 50), 1) if values else None,
                "p99": round(percentile(values, 99), 1) if values else None}
    return {"n": len(timed), "before_model": summary(before), "after_model": summary(after)}


def seed_memory(stack: Stack, url: str) -> "dict[str, Any]":
    """Every bench user gets MEMORY_TURNS turns through chatd itself (so
    Redis holds its recent list and hot set and the indexer writes them to
    Chroma), then the backlog is waited out. Once per stack: the chat and
    capacity phases share the users."""
    seeded = getattr(stack, "bench_memory", None)
    if seeded is not None:
        return seeded
    chats = CHAT_USERS * MEMORY_TURNS
    say(f"bench: long-term memory: {CHAT_USERS} users x {MEMORY_TURNS} turns through chatd")
    started = time.monotonic()
    # Round-robin over users, so that a user's turns are not concurrent.
    statuses = concurrently(
        lambda i: post_chat(url, f"{CHAT_PREFIX}{i % CHAT_USERS + 1}",
                            f"seed turn {i // CHAT_USERS}: tell me about topic {i % 97}")[0],
        range(chats), max_workers=MEMORY_SEED_WORKERS)
    seconds = time.monotonic() - started
    failed = sum(1 for st in statuses if st != 200)
    drain = wait_backlog_empty(stack, url, BACKLOG_DRAIN_LIMIT_S)
    hot = sum(int(stack.redis.command("HLEN", rkeys.user_key(f"{CHAT_PREFIX}{u}", "hot")) or 0)
              for u in (1, CHAT_USERS // 2, CHAT_USERS))
    seeded = {"users": CHAT_USERS, "turns_per_user": MEMORY_TURNS, "chats": chats, "failed": failed,
              "seconds": seconds, "backlog_drain": drain, "hot_messages_of_3_sampled_users": hot}
    say(f"bench:   {chats} chats in {seconds:.0f} s ({failed} failed), backlog empty after "
        f"{drain['stream_s'] if drain['stream_s'] is not None else 'more than the limit'} s")
    if failed:
        raise StackError(f"bench: {failed} seed chats failed")
    stack.bench_memory = seeded  # type: ignore[attr-defined]
    return seeded


def phase_chat_memory(stack: Stack, probe: Probe, ceiling_rps: float) -> "dict[str, Any]":
    """Issue 11: the chat path when every user already has long-term memory;
    the indexer keeps up (oldest waiting turn, drain time afterwards)."""
    url = probe.frontend.url
    seeded = seed_memory(stack, url)
    run_wrk(url, "/api/chat", WARMUP_CONNECTIONS, WARMUP_RUN_S, CHAT_USERS, CHAT_PREFIX)
    warm_drain = wait_backlog_empty(stack, url, BACKLOG_DRAIN_LIMIT_S)
    say(f"bench: chat with memory, {MEMORY_CONNECTIONS} connections, {MEMORY_RUN_S} s, {CHAT_USERS} users")
    sampler = BacklogSampler(stack, url)
    sampler.start()
    try:
        run = measured_run(probe, "/api/chat", MEMORY_CONNECTIONS, MEMORY_RUN_S, CHAT_USERS, CHAT_PREFIX)
    finally:
        sampler.stop()
    drain = wait_backlog_empty(stack, url, BACKLOG_DRAIN_LIMIT_S)
    figures = chat_figures(run, ceiling_rps)
    samples = sampler.samples
    gauge = [x["chatd_index_oldest_age_seconds"] for x in samples if x["chatd_index_oldest_age_seconds"] is not None]
    stream = [x["stream_oldest_age_s"] for x in samples]
    figures.update({
        "seed": seeded, "warmup_drain": warm_drain, "drain_after": drain,
        "oldest_age_s": {"samples": len(gauge), "stale_samples": len(samples) - len(gauge),
                         "p50": percentile(gauge, 50), "p99": percentile(gauge, 99),
                         "max": max(gauge) if gauge else None},
        "stream_oldest_age_s": {"samples": len(stream), "p50": percentile(stream, 50),
                                "p99": percentile(stream, 99), "max": max(stream) if stream else None},
        "backlog_max": max((x["stream_len"] for x in samples), default=0),
        "backlog_samples": samples,
    })
    o = figures["oldest_age_s"]
    say("bench:   " + chat_line(figures))
    say(f"bench:   oldest waiting turn p99 {o['p99']} s (max {o['max']}), backlog empty "
        f"{drain['metrics_s']} s after (stream {drain['stream_s']} s)")
    return figures


def phase_gateway(stack: Stack, ceiling_rps: float, name: str = "gateway",
                  redis_env: Optional["dict[str, Optional[str]]"] = None,
                  redis_nodes: Optional["list[Redis]"] = None) -> "dict[str, Any]":
    """The chat path without long-term memory, on a pool of the same size;
    redis_env/redis_nodes point it at another Redis (gateway_cluster)."""
    say(f"bench: {name} (no recall, Chroma unreachable), {GATEWAY_CONNECTIONS} connections, {GATEWAY_RUN_S} s")
    frontend, _ = start_frontend(stack, name, dict(gateway_env(), **BASE_POOL_ENV, **(redis_env or {})),
                                 POOL_WORKERS, POOL_THREADS, trivial=False)
    try:
        probe = Probe(stack, frontend, redis_nodes=redis_nodes)
        run_wrk(frontend.url, "/api/chat", WARMUP_CONNECTIONS, WARMUP_RUN_S, CHAT_USERS, CHAT_PREFIX)
        run = measured_run(probe, "/api/chat", GATEWAY_CONNECTIONS, GATEWAY_RUN_S, CHAT_USERS, CHAT_PREFIX)
        figures = chat_figures(run, ceiling_rps)
        say("bench:   " + chat_line(figures))
        return figures
    finally:
        stop_frontend(stack, frontend)


def phase_gateway_cluster(stack: Stack, ceiling_rps: float) -> "dict[str, Any]":
    """The gateway phase on a Redis Cluster of 3 primaries and 3 replicas
    (tests/harness/cluster.py) on this same machine, to set beside the
    single Redis: the client's routing costs, not the cluster's capacity
    (six redis-server share the two cores with everything else)."""
    cluster = RedisCluster(stack.tmpdir).start()
    try:
        figures = phase_gateway(stack, ceiling_rps, "gateway_cluster",
                                {"CHATD_REDIS_CLUSTER": cluster.seeds, "CHATD_REDIS_HOST": None,
                                 "CHATD_REDIS_PORT": None}, cluster.primaries())
        figures["redis_primaries"] = len(cluster.primaries())
        return figures
    finally:
        cluster.stop()


def gateway_env() -> "dict[str, str]":
    # A port nobody listens on: the indexer's upserts fail at once and it
    # retries about once a second, so Chroma costs nothing.
    return dict(GATEWAY_ONLY_ENV, CHATD_CHROMA_URL=f"http://{LOOPBACK}:{free_port()}")


class Sampler(PeriodicSampler):
    """Samples the pool's memory and the chats in flight at the fake while a
    capacity step runs."""

    def __init__(self, stack: Stack, pool: Pool) -> None:
        super().__init__(CAPACITY_SAMPLE_S)
        self.stack, self.pool = stack, pool

    def sample(self) -> "Optional[dict[str, Any]]":
        pids = self.pool.worker_pids()
        try:
            in_flight = self.stack.fake.stats().get("in_flight", 0)
        except (OSError, StackError):
            in_flight = -1
        return {
            "rss_kib": sum(status_kib(p, "VmRSS") for p in pids),
            "pss_kib": sum(pss_kib(p) for p in pids),
            "threads": sum(status_kib(p, "Threads") for p in pids),
            "in_flight": in_flight,
        }


async def _sse_request(host: str, port: int, head: bytes, body: bytes, first_marker: bytes, end_marker: bytes,
                       timeout_s: float, on_first=None) -> "dict[str, Any]":
    """One streamed request over HTTP/1.0 (no chunked framing, the end is the
    close): time to the first piece and whether the end marker came."""
    started = time.perf_counter()
    out: "dict[str, Any]" = {"ok": False, "ttfb_ms": None, "error": None}
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        seen, status_line = b"", b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout_s)
            if not data:
                break
            if not status_line:
                status_line = data.split(b"\r\n", 1)[0]
            seen = (seen + data)[-4096:]
            if out["ttfb_ms"] is None and first_marker in seen:
                out["ttfb_ms"] = (time.perf_counter() - started) * 1000
                if on_first is not None:
                    on_first()
            if end_marker in seen:
                out["ok"] = out["ttfb_ms"] is not None
                break
        if not out["ok"]:
            status = status_line.decode("latin-1", "replace")
            out["error"] = status if " 200 " not in status + " " else "no end marker"
    except (OSError, asyncio.TimeoutError) as exc:
        out["error"] = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    return out


def _chatd_stream_request(url: str, user: str, message: str) -> "tuple[str, int, bytes, bytes]":
    parts = urllib.parse.urlsplit(url)
    body = json.dumps({"userId": user, "message": message, "stream": True}).encode()
    head = (b"POST /api/chat HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n")
    return parts.hostname, parts.port, head, body


def _ttfb_figures(results: "list[dict[str, Any]]") -> "dict[str, Any]":
    ttfb = [r["ttfb_ms"] for r in results if r["ok"]]
    return {"requests": len(results), "errors": sum(1 for r in results if not r["ok"]),
            "ttfb_ms": {"p50": percentile(ttfb, 50), "p99": percentile(ttfb, 99), "n": len(ttfb)}}


def _model_first_content_ms(stack: Stack, marker: str) -> "dict[str, float]":
    """The fake's own time from a request to its first piece of text, by the
    request's last user message, for its streams whose message holds `marker`."""
    query = urllib.parse.urlencode({"contains": marker})
    status, doc = http_json(f"{stack.fake.base}/_fake/streams?{query}")
    if status != 200:
        raise StackError(f"fake model /_fake/streams answered {status}: {doc!r}")
    return {r["last_user"]: r["first_content_ms"] - r["received_ms"] for r in doc["streams"]
            if r.get("first_content_ms") is not None}


def _sse_closed_loop(stack: Stack, port: int, path: str, body: str, headers: "list[str]", first: str, end: str,
                     connections: int, duration_s: float) -> "list[dict[str, Any]]":
    """`connections` closed loops of streamed requests for `duration_s`, by the
    bench's C++ client (bench/sse_ttfb.cc): one epoll thread, so its own delay in
    noticing a first delta is microseconds, not an asyncio loop's milliseconds
    on the cores it shares with the server. `body` may hold {w}, {i}, {u}."""
    argv = [str(stack.build_dir / "bin" / "sse_ttfb"), "--host", LOOPBACK, "--port", str(port), "--path", path,
            "--connections", str(connections), "--duration-s", str(duration_s), "--timeout-s", str(WRK_TIMEOUT_S),
            "--users", str(CHAT_USERS), "--body", body, "--first", first, "--end", end]
    for h in headers:
        argv += ["--header", h]
    done = subprocess.run(argv, capture_output=True, check=True, timeout=duration_s + WRK_TIMEOUT_S + 30)
    return [{"wi": (w, i), "ok": ok, "ttfb_ms": ttfb} for w, i, ok, ttfb in json.loads(done.stdout)["requests"]]


def phase_stream_ttfb(stack: Stack) -> "dict[str, Any]":
    """Time to the first delta through nginx and the pool, less the model's
    time to its first content chunk: for the same request (the fake records
    when each stream's request arrived and its first text left), and, as the
    issue first defined it, less the p50/p99 of a model-only run."""
    say(f"bench: stream TTFB, {STREAM_TTFB_CONNECTIONS} streams, {STREAM_TTFB_RUN_S} s, "
        f"{STREAM_TTFB_WORKERS} x {STREAM_TTFB_THREADS} threads")
    frontend, _ = start_frontend(stack, "stream-ttfb", dict(BASE_POOL_ENV, **CAP_OFF_ENV), STREAM_TTFB_WORKERS,
                                 STREAM_TTFB_THREADS, trivial=False)
    chatd_port = urllib.parse.urlsplit(frontend.url).port

    def measure(connections: int, chunk_delay_ms: int) -> "dict[str, Any]":
        pace = f" #fake:chunk_delay_ms={chunk_delay_ms}" if chunk_delay_ms else ""
        run = f"c{connections}-d{chunk_delay_ms}"
        msg = lambda kind, w, i: f"stream bench {kind} {run} {w} {i}{pace}"  # noqa: E731
        model_body = json.dumps({"model": "fake-chat", "stream": True, "stream_options": {"include_usage": True},
                                 "messages": [{"role": "user", "content": msg("model", "{w}", "{i}")}]})
        model = _sse_closed_loop(stack, stack.fake.port, "/v1/chat/completions", model_body,
                                 ["Authorization: Bearer bench"], '"content":"[fake]', "[DONE]", connections,
                                 STREAM_TTFB_RUN_S)
        chatd_body = json.dumps({"userId": f"{CHAT_PREFIX}{{u}}", "message": msg("chatd", "{w}", "{i}"),
                                 "stream": True})
        logged_before = len(frontend.pool.log_records())
        chatd = _sse_closed_loop(stack, chatd_port, "/api/chat", chatd_body, [], 'data: {"delta"', '"done":true',
                                 connections, STREAM_TTFB_RUN_S)
        # chatd's own account of each stream (its request log line): from the
        # request's start to the first delta handed to nginx, less the model's
        # time from the call to that delta. No client, nginx or fake in it.
        timed = [r for r in frontend.pool.log_records()[logged_before:]
                 if r.get("event") == "request" and "first_byte_ms" in r]
        own_log = [r["first_byte_ms"] - r["model_first_delta_ms"] for r in timed]
        # The model's time to its first text twice: as chatd waited for it, and
        # as the fake itself counts it. Their gap is the way to the model and
        # back, including the fake's loop getting to the request.
        model_seen_by_chatd = [r["model_first_delta_ms"] for r in timed]
        out = {"connections": connections, "chunk_delay_ms": chunk_delay_ms, "client": "bench/sse_ttfb.cc",
               "model": _ttfb_figures(model), "chatd": _ttfb_figures(chatd)}
        m, c = out["model"]["ttfb_ms"], out["chatd"]["ttfb_ms"]
        if m["p50"] is not None and c["p50"] is not None:
            out["added_ms"] = {"p50": c["p50"] - m["p50"], "p99": c["p99"] - m["p99"]}
        # The same subtraction per request: what the client waited, less what
        # the fake itself took to its first piece of text for that very request
        # (it records both times). The model's share then comes from the same
        # moment and the same load, not from the model-only run before.
        own = _model_first_content_ms(stack, f"stream bench chatd {run} ")
        shares = [r["ttfb_ms"] - own[msg("chatd", *r["wi"])] for r in chatd
                  if r["ok"] and msg("chatd", *r["wi"]) in own]
        out["added_same_request_ms"] = {"p50": percentile(shares, 50), "p99": percentile(shares, 99), "n": len(shares)}
        out["chatd_own_ms"] = {"p50": percentile(own_log, 50), "p99": percentile(own_log, 99), "n": len(own_log)}
        # chatd's own share in two: before the model call (admission, memory,
        # recall, prompt), and from the model's first text to its event
        # handed to nginx.
        before = [r["before_model_ms"] for r in timed if "before_model_ms" in r]
        relay = [r["first_byte_ms"] - r["model_first_delta_ms"] - r["before_model_ms"] for r in timed
                 if "before_model_ms" in r]
        out["chatd_own_split_ms"] = {
            "before_model": {"p50": percentile(before, 50), "p99": percentile(before, 99)},
            "first_text_to_nginx": {"p50": percentile(relay, 50), "p99": percentile(relay, 99)}}
        fake_own = list(own.values())
        out["model_first_text_ms"] = {
            "seen_by_chatd": {"p50": percentile(model_seen_by_chatd, 50), "p99": percentile(model_seen_by_chatd, 99)},
            "by_the_fake": {"p50": percentile(fake_own, 50), "p99": percentile(fake_own, 99)}}
        say(f"bench:   c={connections}, chunks every {chunk_delay_ms} ms: model first chunk p50 {m['p50']} ms; "
            f"through chatd p50 {c['p50']} ms, p99 {c['p99']} ms; errors {out['chatd']['errors']}; "
            f"chatd's share per request p50 {out['added_same_request_ms']['p50']} ms, "
            f"p99 {out['added_same_request_ms']['p99']} ms (n={len(shares)}); by chatd's log p50 "
            f"{out['chatd_own_ms']['p50']} ms, p99 {out['chatd_own_ms']['p99']} ms (n={len(own_log)}); model's first "
            f"text p50 as chatd waited {out['model_first_text_ms']['seen_by_chatd']['p50']} ms, by the fake "
            f"{out['model_first_text_ms']['by_the_fake']['p50']} ms; chatd's own p50 before the model "
            f"{out['chatd_own_split_ms']['before_model']['p50']} ms, first text to nginx "
            f"{out['chatd_own_split_ms']['first_text_to_nginx']['p50']} ms")
        return out
    try:
        # One stream at a time too: what chatd adds without any queueing.
        single = measure(1, 0)
        out = measure(STREAM_TTFB_CONNECTIONS, STREAM_TTFB_CHUNK_DELAY_MS)
        saturated = measure(STREAM_TTFB_CONNECTIONS, 0)
    finally:
        stop_frontend(stack, frontend)
    out.update({"workers": STREAM_TTFB_WORKERS, "threads": STREAM_TTFB_THREADS, "single": single,
                "saturated": saturated})
    return out


def phase_stream_capacity(stack: Stack) -> "dict[str, Any]":
    """The most streams open at once: every stream lasts ~STREAM_SECONDS at the
    model; a step holds when every stream ends with done."""
    say(f"bench: stream capacity, {CAPACITY_WORKERS} x {CAPACITY_THREADS} threads, {STREAM_SECONDS} s streams")
    frontend, _ = start_frontend(stack, "stream-capacity", dict(BASE_POOL_ENV, **CAP_OFF_ENV), CAPACITY_WORKERS,
                                 CAPACITY_THREADS, trivial=False)
    # Events of a reply: the role chunk, one per word (4 of the fake's own,
    # the message's words and the directive), finish, usage, [DONE].
    gaps = 1 + 4 + STREAM_WORDS + 1 + 3 - 1
    chunk_delay_ms = STREAM_SECONDS * 1000 // gaps
    steps = []
    try:
        for n in STREAM_STEPS:
            pids = frontend.pool.worker_pids()
            idle_rss = sum(status_kib(p, "VmRSS") for p in pids)
            sampler = Sampler(stack, frontend.pool)
            open_now = {"n": 0, "max": 0}

            def opened() -> None:
                open_now["n"] += 1
                open_now["max"] = max(open_now["max"], open_now["n"])

            async def run() -> "list[dict[str, Any]]":
                words = " ".join(f"w{k}" for k in range(STREAM_WORDS))
                tasks = []
                for i in range(n):
                    host, port, head, body = _chatd_stream_request(
                        frontend.url, f"{CHAT_PREFIX}{i % CHAT_USERS}",
                        f"{words} #fake:chunk_delay_ms={chunk_delay_ms}")
                    tasks.append(_sse_request(host, port, head, body, b'data: {"delta"', b'"done":true',
                                              STREAM_TIMEOUT_S, opened))
                return await asyncio.gather(*tasks)
            say(f"bench: stream capacity, {n} streams")
            sampler.start()
            started = time.monotonic()
            try:
                results = asyncio.run(run())
            finally:
                sampler.stop()
            elapsed = time.monotonic() - started
            errors = [r["error"] for r in results if not r["ok"]]
            samples = sampler.samples or [{"rss_kib": idle_rss, "in_flight": 0, "threads": 0}]
            peak_rss = max(s["rss_kib"] for s in samples) * 1024
            step = {"streams": n, "errors": len(errors), "error_kinds": dict(collections.Counter(errors)),
                    "max_open_at_client": open_now["max"],
                    "max_in_flight_at_model": max(s["in_flight"] for s in samples),
                    "pool_rss_idle_bytes": idle_rss * 1024, "pool_rss_peak_bytes": peak_rss,
                    "pool_threads_peak": max(s["threads"] for s in samples), "elapsed_s": elapsed,
                    "chunk_delay_ms": chunk_delay_ms,
                    "held": not errors and peak_rss < TARGET_CAPACITY_RSS_BYTES}
            steps.append(step)
            say(f"bench:   errors {len(errors)} {step['error_kinds']}, at the model at once "
                f"{step['max_in_flight_at_model']}, pool RSS {peak_rss / 2**20:.0f} MiB, {elapsed:.1f} s")
            if not step["held"]:
                break
    finally:
        stop_frontend(stack, frontend)
    held = [s for s in steps if s["held"]]
    return {"workers": CAPACITY_WORKERS, "threads": CAPACITY_THREADS, "stream_seconds": STREAM_SECONDS,
            "steps": steps, "largest_held": max((s["streams"] for s in held), default=0)}


def phase_cap(stack: Stack) -> "dict[str, Any]":
    """The full chat path with the per-user cap on (default) and off, one pool
    after the other, same load: what the cap adds per chat."""
    out: "dict[str, Any]" = {}
    # 0 takes no lease at all: the chat path as it was before the cap.
    for name, extra in (("off", {"CHATD_MAX_CONCURRENT_PER_USER": "0"}), ("on", {})):
        say(f"bench: cap {name}, {CAP_CONNECTIONS} connections, {CAP_RUN_S} s, {CHAT_USERS} users")
        frontend, _ = start_frontend(stack, f"cap-{name}", dict(BASE_POOL_ENV, **extra), POOL_WORKERS, POOL_THREADS,
                                     trivial=False)
        try:
            probe = Probe(stack, frontend)
            run_wrk(frontend.url, "/api/chat", WARMUP_CONNECTIONS, WARMUP_RUN_S, CHAT_USERS, CHAT_PREFIX)
            figures = chat_figures(measured_run(probe, "/api/chat", CAP_CONNECTIONS, CAP_RUN_S, CHAT_USERS,
                                                CHAT_PREFIX), 0.0)
        finally:
            stop_frontend(stack, frontend)
        chats = figures["pool_statuses"].get("200", 0.0) or 1
        figures["redis_commands_per_chat"] = {k: v / chats for k, v in figures["redis_commands"].items()}
        out[name] = figures
        say("bench:   " + chat_line(figures))
    return out


def phase_capacity(stack: Stack, name: str, env_extra: "dict[str, str]") -> "dict[str, Any]":
    say(f"bench: capacity ({name}), {CAPACITY_WORKERS} x {CAPACITY_THREADS} threads, "
        f"model delay {CAPACITY_DELAY_MS} ms")
    frontend, _ = start_frontend(stack, f"capacity-{name}", dict(env_extra, **BASE_POOL_ENV, **CAP_OFF_ENV),
                                 CAPACITY_WORKERS,
                                 CAPACITY_THREADS, trivial=False)
    probe = Probe(stack, frontend)
    memory = None
    if name == "full":
        # Issue 11: the full path is the path of users with long-term memory
        # (hot sets read on every chat, the indexer writing behind).
        memory = seed_memory(stack, frontend.url)
    stack.fake.set_delay(CAPACITY_DELAY_MS)
    delay_s = CAPACITY_DELAY_MS / 1000
    steps = []
    try:
        for connections in CAPACITY_STEPS:
            pids = frontend.pool.worker_pids()
            idle_rss = sum(status_kib(p, "VmRSS") for p in pids)
            idle_pss = sum(pss_kib(p) for p in pids)
            sampler = Sampler(stack, frontend.pool)
            logged_before = len(frontend.pool.log_records())
            say(f"bench: capacity ({name}), {connections} connections, {CAPACITY_RUN_S} s")
            sampler.start()
            try:
                run = measured_run(probe, "/api/chat", connections, CAPACITY_RUN_S, CHAT_USERS, CHAT_PREFIX,
                                   timeout_s=max(WRK_TIMEOUT_S, int(delay_s * 5)))
            finally:
                sampler.stop()
            figures = chat_figures(run, 0.0)
            samples = sampler.samples or [{"rss_kib": idle_rss, "pss_kib": idle_pss, "threads": 0, "in_flight": 0}]
            peak = max(samples, key=lambda s: s["rss_kib"])
            ideal = connections / delay_s
            mean_s = figures["latency_ms"]["mean"] / 1000
            # A closed loop keeps `connections` requests in flight, so by
            # Little's law it completes connections / mean latency per second;
            # wrk's own count loses the round cut off at the end of the run.
            little_rps = connections / mean_s if mean_s > 0 else 0.0
            errors = figures["errors_http"] + figures["errors_socket"]
            p99_s = figures["latency_ms"]["p99"] / 1000
            held = errors == 0 and p99_s <= delay_s * CAPACITY_P99_BREAK_FACTOR
            step = {
                "connections": connections, "held": held, "errors": errors,
                "errors_http": figures["errors_http"], "errors_socket": figures["errors_socket"],
                "latency_ms": figures["latency_ms"], "requests": figures["requests"],
                "rps_wrk": figures["rps"],
                "rps_upper_bound": (figures["requests"] + connections) / CAPACITY_RUN_S,
                "rps_little": little_rps, "ideal_rps": ideal, "share_of_ideal": little_rps / ideal,
                "max_in_flight_at_model": max(s["in_flight"] for s in samples),
                "pool_rss_idle_bytes": idle_rss * 1024, "pool_rss_peak_bytes": peak["rss_kib"] * 1024,
                "pool_pss_peak_bytes": max(s["pss_kib"] for s in samples) * 1024,
                "pool_rss_per_in_flight_bytes": peak["rss_kib"] * 1024 / connections,
                "pool_rss_added_per_in_flight_bytes": max(0, peak["rss_kib"] - idle_rss) * 1024 / connections,
                "pool_statuses": figures["pool_statuses"], "recall_degraded": figures["recall_degraded"],
                "redis_connections_opened": figures["redis_connections_opened"],
                "pool_cpu_us_per_request": figures["pool_cpu_us_per_request"],
                "model_mean_ms": figures["model_mean_ms"], "pool_mean_ms": figures["pool_mean_ms"],
                "cpu_s": figures["cpu_s"], "machine_cpus_busy": figures["machine_cpus_busy"],
                "loadavg_before": figures["loadavg_before"],
            }
            step["chatd_own_ms"] = own = chatd_own_split(frontend.pool.log_records()[logged_before:])
            steps.append(step)
            say(f"bench:   held={held} errors={errors} p99 {p99_s:.2f} s, {little_rps:.0f} req/s "
                f"({step['share_of_ideal']:.0%} of ideal), pool RSS {peak['rss_kib'] / 1024:.0f} MiB; "
                f"chatd's own p99 {own['before_model']['p99']} ms before the model, "
                f"{own['after_model']['p99']} ms after")
            if not held:
                break
    finally:
        stack.fake.set_delay(0)
        stop_frontend(stack, frontend)
    held_steps = [s for s in steps if s["held"]]
    best = max(held_steps, key=lambda s: s["connections"]) if held_steps else None
    return {"workers": CAPACITY_WORKERS, "threads": CAPACITY_THREADS, "model_delay_ms": CAPACITY_DELAY_MS,
            "env": env_extra, "steps": steps, "largest_held": best["connections"] if best else 0, "best": best,
            "memory": memory}


def run_chroma_bench(build_dir: Path, url: str, command: str, pid: Optional[int], users: int,
                     first_user: int = 0) -> "dict[str, Any]":
    argv = [str(build_dir / "bin" / "chroma_bench"), "--url", url, "--users", str(users),
            "--first-user", str(first_user), "--batch-users", str(CHROMA_BATCH_USERS),
            "--shards", str(CHROMA_SHARDS), "--messages", str(CHROMA_MESSAGES),
            "--threads", str(CHROMA_LOAD_THREADS), "--first", str(CHROMA_FIRST_QUERIES),
            "--queries", str(CHROMA_QUERIES), "--adds", str(CHROMA_ADDS),
            "--sample", str(CHROMA_COLD_SAMPLE), "--timeout-ms", str(CHROMA_TIMEOUT_MS), command]
    if pid:
        argv[-1:-1] = ["--pid", str(pid)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHROMA_STAGE_TIMEOUT_S)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise StackError(f"chroma_bench {command} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if done.stderr.strip():
        result["stderr_tail"] = done.stderr[-1000:]
    return result


def chroma_process(chroma: Chroma) -> "dict[str, Any]":
    pids = descendants(chroma.pid) if chroma.pid else []
    return {"rss_bytes": sum(status_kib(p, "VmRSS") for p in pids) * 1024,
            "open_files": sum(open_files(p) for p in pids),
            "cpu_s": sum(proc_ticks(p) for p in pids) / CLK_TCK}


def phase_chroma(build_dir: Path, tmp_parent: Optional[str], sizes: "tuple[int, ...]") -> "dict[str, Any]":
    """Issue 11's sizes, loaded one on top of the other; a stage is the load
    of the users added, then queries over all users so far. Stopped early
    (SIGTERM/^C), it keeps the stages that finished."""
    tmpdir = Path(tempfile.mkdtemp(prefix="chatd-bench-chroma-", dir=tmp_parent))
    chroma = Chroma(tmpdir)
    out: "dict[str, Any]" = {"sizes": list(sizes), "messages_per_user": CHROMA_MESSAGES, "shards": CHROMA_SHARDS,
                             "batch_users": CHROMA_BATCH_USERS, "load_threads": CHROMA_LOAD_THREADS,
                             "stages": [], "complete": False}
    try:
        chroma.start()
        out["idle"] = chroma_process(chroma)
        loaded = 0
        for size in sizes:
            stage: "dict[str, Any]" = {"users": size, "users_before": loaded,
                                       "started_utc": datetime.datetime.now(datetime.timezone.utc)
                                       .isoformat(timespec="seconds"), "loadavg_before": loadavg()}
            say(f"bench: Chroma at scale: users {loaded}..{size - 1} x {CHROMA_MESSAGES} messages "
                f"({CHROMA_SHARDS} shards, {CHROMA_BATCH_USERS} users per call)")
            before = chroma_process(chroma)
            stage["load"] = run_chroma_bench(build_dir, chroma.url, "load", chroma.pid, size, loaded)
            stage["after_load"] = chroma_process(chroma)
            # Chroma's whole CPU over the load (its background threads too),
            # per turn written: the robust figure on a shared machine.
            turns = (size - loaded) * CHROMA_MESSAGES / 2
            stage["chroma_cpu_ms_per_turn"] = (stage["after_load"]["cpu_s"] - before["cpu_s"]) * 1000 / turns
            stage["loadavg_after_load"] = loadavg()
            say(f"bench:   loaded in {stage['load']['seconds']:.0f} s, Chroma CPU "
                f"{stage['chroma_cpu_ms_per_turn']:.2f} ms/turn; querying")
            loaded = size
            stage["query"] = run_chroma_bench(build_dir, chroma.url, "query", chroma.pid, size)
            stage["after_query"] = chroma_process(chroma)
            stage["loadavg_after"] = loadavg()
            stage["data_bytes"] = sum(f.stat().st_size for f in chroma.dir.rglob("*") if f.is_file())
            out["stages"].append(stage)
            q = stage["query"]["query_ms"]
            say(f"bench:   query p50 {q['p50']:.2f} ms, p99 {q['p99']:.2f} ms, RSS "
                f"{stage['after_query']['rss_bytes'] / 2**20:.0f} MiB, {stage['after_query']['open_files']} files")
        out["collections"] = chroma_collections(chroma.url)
        say("bench:   restarting Chroma")
        chroma.stop()
        chroma.start()
        out["after_restart"] = chroma_process(chroma)
        out["cold"] = run_chroma_bench(build_dir, chroma.url, "cold", chroma.pid, loaded)
        out["after_cold"] = chroma_process(chroma)
        out["complete"] = True
    except KeyboardInterrupt:
        say("bench: Chroma phase stopped; keeping the stages that finished")
        out["interrupted"] = True
    finally:
        chroma.stop()
        if os.environ.get("CHATD_KEEP_STACK_TMP") != "1":
            shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def layout_study() -> "dict[tuple[str, int], dict[str, Any]]":
    """The layout study's stages (bench/chroma_layouts.cc), by (layout, users):
    the old per-user layout's figures, printed beside this run's."""
    out: "dict[tuple[str, int], dict[str, Any]]" = {}
    try:
        lines = LAYOUT_STUDY.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            st = json.loads(line)
        except ValueError:
            continue
        key = "per-user" if st.get("layout") != "shards" else f"N={st.get('shards')}"
        out.setdefault((key, int(st.get("users", 0))), st)  # the first run of a size
    return out
