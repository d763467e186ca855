#!/usr/bin/python3
"""`make bench`: the request path measured against its ceilings.

Starts the real stack with the test harness (Redis, Chroma, the fake model,
spawn-fcgi + multiwatch pools, nginx) on free loopback ports, drives it with
wrk (bench/chat.lua) and measures, in one run:

  1. ceilings: nginx answering by itself (`return 200`) and nginx in front of
     a trivial FastCGI responder (bench/trivial_fcgi.cc, chatd's threading
     model, same N x T), through the same nginx as the chat path;
  2. the rejected path: one user over the rate limit;
  3. the full chat path, the fake model answering at once, at 1, 64 and 512
     connections over many users: throughput, latency, errors, the gateway's
     own latency, pool CPU per request (/proc), Redis calls per request
     (INFO commandstats), HTTP calls per request to Chroma and to the model,
     and the CPU every process spent per request; then the same path without
     long-term memory ("gateway only"), which tells chatd's costs from Chroma's;
  4. capacity: the fake answering after 2 s, concurrency raised until errors
     or latency break: the largest concurrency held, throughput against the
     ideal (concurrency / 2 s), the pool's RSS per request in flight; for the
     full path and for the gateway alone;
  5. what the per-user cap on chats in flight costs ("cap"): the same chat
     run on a pool with the cap on (the default, 4) and on one with it off
     (0); Redis commands and pool CPU per chat side by side;
  6. Chroma at scale (bench/chroma_bench.cc, chatd's own adapter, shard
     collections): an incremental load of 1k, then 5k, then 10k users x 50
     messages; at each size Chroma's CPU per indexed turn, the recall query's
     latency, add latency, Chroma's RSS and open files; at the end, the first
     query after a restart. The old layout (a collection per user) is no
     longer in the adapter: its figures come from the layout study
     (bench/results/chroma-layouts.json, bench/chroma_layouts.cc) and are
     printed beside these;
  7. the chat path with long-term memory ("chat_memory", issue 11): 2,000
     users each given 5 turns through chatd and indexed first, then 64
     connections for 60 s: throughput, pool CPU, Redis round trips and Chroma
     calls per chat, the oldest turn waiting for the indexer (sampled every
     0.5 s) and the time the backlog takes to empty afterwards. The capacity
     runs use the same users, so they too run with hot sets (the full path).

Prints one table and writes the raw figures to bench/results/latest.json.
Targets are reported, never asserted: the exit status is 0 when every phase
ran, whatever the figures. docs/performance.md explains what bounds each one.

Standard library only; runs under Debian's /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import keys as rkeys  # noqa: E402
from harness.stack import (  # noqa: E402
    LOOPBACK, UNCAPPED, Chroma, FakeModel, Frontend, Nginx, Pool, Redis, Stack, StackError, _proc_children, concurrently,
    free_port, http_json, http_request, nginx_limits_for, post_chat)

BENCH_DIR = REPO / "bench"
WRK_SCRIPT = BENCH_DIR / "chat.lua"
RESULTS_DIR = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# What is measured, and how hard. Each figure runs 10-20 s at most: the
# machine has 2 cores shared with other developers.

WRK_THREADS = 2
WRK_TIMEOUT_S = 10            # a reply slower than this counts as an error
CEILING_CONNECTIONS = 64
CEILING_RUN_S = 10
REJECTED_RUN_S = 10
CHAT_USERS = 2000             # "many users": the same ids the capacity run uses
CHAT_PREFIX = "bench-u"
CHAT_CONCURRENCY = (1, 64, 512)
CHAT_RUN_S = {1: 10, 64: 15, 512: 15}
# Connections opened, scripts loaded: not a steady state of memory, which
# would take the indexer minutes (see docs/performance.md).
WARMUP_RUN_S = 3
WARMUP_CONNECTIONS = 16
LIMITED_USER_PREFIX = "bench-limited-"
# The gateway alone: the same chat path without long-term memory (no
# embedding, no recall; the indexer's Chroma is unreachable, so it only
# retries), to tell chatd's own costs from Chroma's.
GATEWAY_ONLY_ENV = {"CHATD_RECALL_K": "0"}
GATEWAY_CONNECTIONS = 64
GATEWAY_RUN_S = 15

# The pool of phases 1-3: chatd's documented defaults (CHATD_WORKERS,
# CHATD_THREADS); the trivial responder gets exactly the same.
POOL_WORKERS = 2
POOL_THREADS = 8
# Every chat of the run fits in one window, so no chat is refused; the
# limited user is driven over it on purpose.
RATE_LIMIT = 500
RATE_WINDOW_S = 3600
# Every bench pool: the limit above, and the production claim delay (the
# harness shortens it for tests).
BASE_POOL_ENV = {"CHATD_RATE_LIMIT": str(RATE_LIMIT), "CHATD_RATE_WINDOW_S": str(RATE_WINDOW_S),
                 "CHATD_INDEX_CLAIM_IDLE_MS": "30000"}
# The main pool's rejected phase drives one user over its limit with 16 chats
# at once, and the capacity runs keep up to 2,500 chats in flight over 2,000
# random users, so some users have more than 4 at once: both measure the
# pool, not the per-user cap, which is raised there on purpose. The "cap"
# phase measures the cap itself.
CAP_OFF_ENV = {"CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED}
CAP_RUN_S = 10
CAP_CONNECTIONS = 64

CAPACITY_WORKERS = 4
CAPACITY_THREADS = 512        # workers x threads >= the largest step: one thread per chat in flight
CAPACITY_DELAY_MS = 2000
CAPACITY_STEPS = (250, 500, 1000, 1500, 2000, 2500)
CAPACITY_RUN_S = 12           # six rounds of 2 s
# A step breaks on any error, or when p99 exceeds the model's delay by half.
CAPACITY_P99_BREAK_FACTOR = 1.5
CAPACITY_SAMPLE_S = 0.5

# nginx holds two connections per proxied request (client + FastCGI), and
# nginx-local.conf.in's 1024 per worker fails at 2,000 in flight ("worker_connections
# are not enough"): room for the largest step, twice over. Listen backlogs
# stay at their defaults, as deployed.
NGINX_WORKER_CONNECTIONS = 8192
NGINX_RLIMIT_NOFILE = 20000

# Issue 11: 10,000 users x 50 messages, loaded incrementally so that each
# size is measured on the data of the one before (1k, +4k, +5k).
CHROMA_SIZES = (1000, 5000, 10000)
CHROMA_MESSAGES = 50
CHROMA_SHARDS = 16             # CHATD_CHROMA_SHARDS' default
# Two writers: Chroma applies writes one at a time (one compaction actor),
# so more only queue; the layout study used two as well.
CHROMA_LOAD_THREADS = 2
# Users per adapter call: 40 users x 50 messages over 16 shards is ~125
# records per shard upsert, the size the layout study measured (128). A
# write's cost is mostly per call, so this is what a bulk load (migrate)
# pays; the indexer's own batches are measured by chat_memory.
CHROMA_BATCH_USERS = 40
CHROMA_FIRST_QUERIES = 100     # a user's first query after the load: sampled
CHROMA_QUERIES = 500
CHROMA_ADDS = 20
CHROMA_COLD_SAMPLE = 50
CHROMA_TIMEOUT_MS = 30000
CHROMA_STAGE_TIMEOUT_S = 3600
LAYOUT_STUDY = RESULTS_DIR / "chroma-layouts.json"

# Issue 11's chat path with long-term memory: every user holds turns in
# Chroma and a hot set in Redis before the measured run.
MEMORY_TURNS = 5
MEMORY_SEED_WORKERS = 16
MEMORY_CONNECTIONS = 64
MEMORY_RUN_S = 60
BACKLOG_SAMPLE_S = 0.5
BACKLOG_POLL_S = 0.1
BACKLOG_DRAIN_LIMIT_S = 300

CHROMA_API = "/api/v2/tenants/default_tenant/databases/default_database"

# Targets of issue 8 (reported, never asserted).
TARGET_REJECTED_SHARE = 0.70
TARGET_CHAT_SHARE_AT_64 = 0.25
TARGET_POOL_CPU_US = 150.0
TARGET_REDIS_ROUND_TRIPS = 3.0
TARGET_CAPACITY_IN_FLIGHT = 2000
TARGET_CAPACITY_IDEAL_SHARE = 0.90
TARGET_CAPACITY_RSS_BYTES = 1 << 30
TARGET_CHROMA_QUERY_P99_MS = 20.0
# Targets of issue 11.
TARGET_CHROMA_CPU_PER_TURN_MS = 2.0
TARGET_CHROMA_RSS_BYTES = 2 << 30
TARGET_CHROMA_OPEN_FILES = 500
TARGET_INDEX_OLDEST_P99_S = 2.0
TARGET_INDEX_DRAIN_S = 5.0
# Issue 14: streamed replies. Time to first byte at 64 streams, through nginx,
# less the model's own time to first chunk (the fake, asked directly the same
# way); then the most streams held open at once, the model streaming ~10 s each.
STREAM_TTFB_CONNECTIONS = 64
STREAM_TTFB_RUN_S = 10
# The model writes one chunk per 20 ms (about 50 tokens a second, the pace of
# gpt-4o-mini), so 64 streams are 64 users reading replies, as in production.
# Unpaced, the closed loop saturates both cores with the Python client and the
# fake themselves, and the figure becomes their queueing: it is reported too,
# but it is not what chatd adds.
STREAM_TTFB_CHUNK_DELAY_MS = 20
# Thread per request: 64 streams at once need 64 threads, or they queue.
STREAM_TTFB_WORKERS = 2
STREAM_TTFB_THREADS = 32
STREAM_SECONDS = 10
STREAM_WORDS = 15                      # the fake streams one chunk per word of its reply
STREAM_STEPS = (500, 1000, 2000)
STREAM_TIMEOUT_S = 40
TARGET_STREAM_TTFB_P50_MS = 2.0
TARGET_STREAMS = 2000
# Requests still in flight when a run's counters are read make per-chat
# counts a little uneven; a real extra round trip per chat shows as +1.
ROUND_TRIP_SLACK = 0.01


def say(text: str = "") -> None:
    print(text, flush=True)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------
# Building the bench binaries


def build_bench_binaries(build_dir: Path) -> None:
    """The Makefile builds them when it has the bench rules; until it does,
    the same flags by hand."""
    bins = {"trivial_fcgi": [], "chroma_bench": [str(build_dir / "libchatd.a")]}
    makefile = (REPO / "Makefile").read_text()
    if all(f"$(BUILD)/bin/{name}" in makefile for name in bins):
        # The BUILD spelling `make bench` used, so make sees the same targets.
        rel = os.path.relpath(build_dir, REPO)
        build = build_dir if rel.startswith("..") else Path(rel)
        subprocess.run(["make", "-j2", f"BUILD={build}"] + [str(build / "bin" / n) for n in bins],
                       cwd=REPO, check=True)
        return
    flags = ["-std=c++20", "-Wall", "-Wextra", "-Werror", "-Iinclude", "-pthread", "-O2", "-g"]
    libs = ["-lfcgi", "-lhiredis", "-lcurl", "-lcrypto", "-pthread"]
    for name, extra in bins.items():
        source = BENCH_DIR / f"{name}.cc"
        target = build_dir / "bin" / name
        inputs = [source] + [Path(p) for p in extra]
        if target.exists() and all(target.stat().st_mtime >= p.stat().st_mtime for p in inputs):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        argv = ["g++", *flags, str(source), *extra, *libs, "-o", str(target)]
        say("bench: " + " ".join(argv))
        subprocess.run(argv, cwd=REPO, check=True)


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
# /proc, Redis, metrics


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads, dead ones included)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def task_ticks(pid: int) -> "dict[int, int]":
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def descendants(pid: int) -> "list[int]":
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_proc_children(p))
    return out


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def machine_ticks() -> "tuple[int, int]":
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(x) for x in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def loadavg() -> "list[float]":
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def scrape_metrics(url: str) -> "dict[str, float]":
    status, _, body = http_request(url, "GET", "/metrics", timeout=30)
    if status != 200 or not isinstance(body, str):
        raise StackError(f"/metrics answered {status}")
    samples = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


def redis_info(redis: Redis) -> "dict[str, float]":
    """Calls per command (cmdstat_*: calls + rejected_calls, i.e. round trips),
    plus a few server counters."""
    out: "dict[str, float]" = {}
    text = redis.command("INFO", "commandstats").decode()
    for line in text.splitlines():
        m = re.match(r"cmdstat_([a-z|_-]+):(.*)", line.strip())
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(2).split(","))
        out["cmd." + m.group(1)] = float(fields.get("calls", 0)) + float(fields.get("rejected_calls", 0))
    stats = redis.command("INFO", "stats").decode()
    for line in stats.splitlines():
        if line.startswith(("total_connections_received:", "total_commands_processed:")):
            k, v = line.strip().split(":", 1)
            out[k] = float(v)
    return out


def chroma_collections(chroma_url: str) -> int:
    status, body = http_json(f"{chroma_url}{CHROMA_API}/collections_count", timeout=30)
    return int(body) if status == 200 and isinstance(body, int) else -1


class Probe:
    """Counters of every process and service taking part, before and after a
    run; `delta` turns two snapshots into per-run figures."""

    def __init__(self, stack: Stack, frontend: Frontend, trivial: Optional[Pool] = None) -> None:
        self.stack = stack
        self.frontend = frontend
        self.trivial = trivial

    def groups(self) -> "dict[str, list[int]]":
        s, f = self.stack, self.frontend
        groups = {
            "pool": f.pool.worker_pids(),
            "nginx": descendants(f.nginx.pid) if f.nginx.pid else [],
            "redis": [s.redis.pid] if s.redis and s.redis.pid else [],
            "chroma": descendants(s.chroma.pid) if s.chroma and s.chroma.pid else [],
            "fake_model": [s.fake.pid] if s.fake and s.fake.pid else [],
        }
        if self.trivial is not None:
            groups["trivial_pool"] = self.trivial.worker_pids()
        return groups

    def pool_thread_ticks(self) -> "dict[str, int]":
        """Ticks of the FastCGI threads and of the others (main, indexer), told
        apart by creation order: main, then CHATD_THREADS request threads,
        then the indexer (src/main_chatd.cc)."""
        request = other = 0
        for pid in self.frontend.pool.worker_pids():
            ticks = task_ticks(pid)
            tids = sorted(ticks)
            total = proc_ticks(pid)
            if len(tids) != self.frontend.pool.threads + 2 or tids[0] != pid:
                return {}
            req = sum(ticks[t] for t in tids[1:1 + self.frontend.pool.threads])
            request += req
            other += total - req
        return {"request_threads": request, "other_threads": other}

    def snapshot(self, with_chat: bool = True) -> "dict[str, Any]":
        snap: "dict[str, Any]" = {"t": time.monotonic(), "machine": machine_ticks(),
                                  "rusage_children": resource.getrusage(resource.RUSAGE_CHILDREN)}
        snap["ticks"] = {name: sum(proc_ticks(p) for p in pids) for name, pids in self.groups().items()}
        snap["pool_threads"] = self.pool_thread_ticks()
        if with_chat:
            snap["metrics"] = scrape_metrics(self.frontend.url)
            snap["redis"] = redis_info(self.stack.redis)
            snap["fake"] = self.stack.fake.stats()
            snap["collections"] = chroma_collections(self.stack.chroma_url)
        return snap


def delta(a: "dict[str, Any]", b: "dict[str, Any]") -> "dict[str, Any]":
    out: "dict[str, Any]" = {"elapsed_s": b["t"] - a["t"]}
    busy = b["machine"][0] - a["machine"][0]
    total = b["machine"][1] - a["machine"][1]
    out["machine_busy_cpu_s"] = busy / CLK_TCK
    out["machine_cpus_busy"] = busy / total * (os.cpu_count() or 1) if total else 0.0
    cpu = {k: (b["ticks"].get(k, 0) - a["ticks"].get(k, 0)) / CLK_TCK for k in b["ticks"]}
    ru_a, ru_b = a["rusage_children"], b["rusage_children"]
    cpu["wrk"] = (ru_b.ru_utime + ru_b.ru_stime) - (ru_a.ru_utime + ru_a.ru_stime)
    cpu["others_on_machine"] = max(0.0, out["machine_busy_cpu_s"] - sum(cpu.values()))
    out["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    if a.get("pool_threads") and b.get("pool_threads"):
        out["pool_threads_cpu_s"] = {k: (b["pool_threads"][k] - a["pool_threads"][k]) / CLK_TCK
                                     for k in b["pool_threads"]}
    if "metrics" in a and "metrics" in b:
        ma, mb = a["metrics"], b["metrics"]
        out["metrics"] = {k: mb[k] - ma.get(k, 0.0) for k in mb if mb[k] - ma.get(k, 0.0) != 0}
        ra, rb = a["redis"], b["redis"]
        out["redis"] = {k: rb[k] - ra.get(k, 0.0) for k in rb if rb[k] - ra.get(k, 0.0) != 0}
        fa, fb = a["fake"], b["fake"]
        out["fake_chat_requests"] = fb.get("chat_requests", 0) - fa.get("chat_requests", 0)
        out["fake_max_in_flight"] = fb.get("max_in_flight", 0)
        out["collections_created"] = b["collections"] - a["collections"]
    return out


def metric(d: "dict[str, Any]", key: str) -> float:
    return d.get("metrics", {}).get(key, 0.0)


def pool_requests(d: "dict[str, Any]") -> "dict[str, float]":
    """chatd_requests_total deltas by status."""
    out = {}
    for key, value in d.get("metrics", {}).items():
        m = re.match(r'chatd_requests_total\{status="([^"]+)"\}', key)
        if m:
            out[m.group(1)] = value
    return out


def redis_breakdown(d: "dict[str, Any]") -> "dict[str, float]":
    """Round trips of the request path and of the indexer, from command counts.

    Commands run inside scripts are counted too (Redis 7), which tells the
    request path's scripts apart by what they run exactly once: the limiter
    HMGET (fixed window) or ZCARD (sliding log), the record script RPUSH.
    The request path's round trips are those scripts plus LRANGE; every other
    script call (EVALSHA/EVAL) is the indexer's, as are its stream reads.
    EVAL counts the NOSCRIPT fallbacks (a second round trip), after a start
    or SCRIPT FLUSH only.

    Since the hot set (issue 11) the context read is a pipeline of LRANGE
    (recent messages) and HVALS (the hot set): two commands, one round
    trip. Round trips are counted, not commands, so LRANGE counts the
    pipeline and HVALS is reported apart, to show it rides along (as many
    HVALS as LRANGE). Nothing else sends HVALS."""
    r = d.get("redis", {})
    c = lambda name: r.get("cmd." + name, 0.0)  # noqa: E731
    # With the per-user cap the limiter's script also runs ZCARD (on the
    # leases), so the fixed window's HMGET alone counts its calls; ZCARD
    # counts them for the sliding log without a cap (twice with one).
    limiter = c("hmget") or c("zcard")
    record = c("rpush")
    other_scripts = max(0.0, c("evalsha") + c("eval") - limiter - record)
    return {
        "request_path": limiter + record + c("lrange"),
        "limiter_scripts": limiter,
        "record_scripts": record,
        "lrange": c("lrange"),
        "hvals_pipelined": c("hvals"),
        "eval_fallbacks": c("eval"),
        "indexer": other_scripts + c("xreadgroup") + c("xautoclaim"),
        "indexer_scripts": other_scripts,
        "indexer_acks": c("xack"),
        "connections_opened": r.get("total_connections_received", 0.0),
    }


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
    now = r.command("TIME")
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
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


def phase_gateway(stack: Stack, ceiling_rps: float) -> "dict[str, Any]":
    """The chat path without long-term memory, on a pool of the same size."""
    say(f"bench: gateway only (no recall, Chroma unreachable), {GATEWAY_CONNECTIONS} connections, {GATEWAY_RUN_S} s")
    frontend, _ = start_frontend(stack, "gateway", dict(gateway_env(), **BASE_POOL_ENV), POOL_WORKERS,
                                 POOL_THREADS, trivial=False)
    try:
        probe = Probe(stack, frontend)
        run_wrk(frontend.url, "/api/chat", WARMUP_CONNECTIONS, WARMUP_RUN_S, CHAT_USERS, CHAT_PREFIX)
        run = measured_run(probe, "/api/chat", GATEWAY_CONNECTIONS, GATEWAY_RUN_S, CHAT_USERS, CHAT_PREFIX)
        figures = chat_figures(run, ceiling_rps)
        say("bench:   " + chat_line(figures))
        return figures
    finally:
        stop_frontend(stack, frontend)


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


def _fake_stream_request(stack: Stack, message: str) -> "tuple[str, int, bytes, bytes]":
    body = json.dumps({"model": "fake-chat", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": message}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer bench\r\n")
    return LOOPBACK, stack.fake.port, head, body


async def _closed_loop(make, first_marker: bytes, end_marker: bytes, connections: int,
                       duration_s: float) -> "list[dict[str, Any]]":
    results: "list[dict[str, Any]]" = []
    stop_at = time.monotonic() + duration_s

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            host, port, head, body = make(w, i)
            results.append(await _sse_request(host, port, head, body, first_marker, end_marker, WRK_TIMEOUT_S))
            i += 1
    await asyncio.gather(*(worker(w) for w in range(connections)))
    return results


def _ttfb_figures(results: "list[dict[str, Any]]") -> "dict[str, Any]":
    ttfb = [r["ttfb_ms"] for r in results if r["ok"]]
    return {"requests": len(results), "errors": sum(1 for r in results if not r["ok"]),
            "ttfb_ms": {"p50": percentile(ttfb, 50), "p99": percentile(ttfb, 99), "n": len(ttfb)}}


def phase_stream_ttfb(stack: Stack) -> "dict[str, Any]":
    """Time to the first delta through nginx and the pool, less the model's
    time to its first content chunk (the fake asked directly, same load)."""
    say(f"bench: stream TTFB, {STREAM_TTFB_CONNECTIONS} streams, {STREAM_TTFB_RUN_S} s, "
        f"{STREAM_TTFB_WORKERS} x {STREAM_TTFB_THREADS} threads")
    frontend, _ = start_frontend(stack, "stream-ttfb", dict(BASE_POOL_ENV, **CAP_OFF_ENV), STREAM_TTFB_WORKERS,
                                 STREAM_TTFB_THREADS, trivial=False)

    def measure(connections: int, chunk_delay_ms: int) -> "dict[str, Any]":
        pace = f" #fake:chunk_delay_ms={chunk_delay_ms}" if chunk_delay_ms else ""
        msg = lambda w, i: f"stream bench {w} {i}{pace}"  # noqa: E731
        model = asyncio.run(_closed_loop(lambda w, i: _fake_stream_request(stack, msg(w, i)),
                                         b'"content":"[fake]', b"[DONE]", connections, STREAM_TTFB_RUN_S))
        chatd = asyncio.run(_closed_loop(
            lambda w, i: _chatd_stream_request(frontend.url, f"{CHAT_PREFIX}{(w * 7919 + i) % CHAT_USERS}",
                                               msg(w, i)),
            b'data: {"delta"', b'"done":true', connections, STREAM_TTFB_RUN_S))
        out = {"connections": connections, "chunk_delay_ms": chunk_delay_ms,
               "model": _ttfb_figures(model), "chatd": _ttfb_figures(chatd)}
        m, c = out["model"]["ttfb_ms"], out["chatd"]["ttfb_ms"]
        if m["p50"] is not None and c["p50"] is not None:
            out["added_ms"] = {"p50": c["p50"] - m["p50"], "p99": c["p99"] - m["p99"]}
        say(f"bench:   c={connections}, chunks every {chunk_delay_ms} ms: model first chunk p50 {m['p50']} ms; "
            f"through chatd p50 {c['p50']} ms, p99 {c['p99']} ms; errors {out['chatd']['errors']}")
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
            steps.append(step)
            say(f"bench:   held={held} errors={errors} p99 {p99_s:.2f} s, {little_rps:.0f} req/s "
                f"({step['share_of_ideal']:.0%} of ideal), pool RSS {peak['rss_kib'] / 1024:.0f} MiB")
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


# ---------------------------------------------------------------------------
# Report


def machine_info() -> "dict[str, Any]":
    cpu_model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {}
    for name, argv in (("nginx", ["nginx", "-v"]), ("redis", ["redis-server", "--version"]),
                       ("wrk", ["wrk", "-v"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            versions[name] = "?"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "mem_total_bytes": mem_kib * 1024, "git_head": head,
            "kernel": platform.release(), "python": platform.python_version(), "versions": versions}


def verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def cpu_line(f: "dict[str, Any]") -> str:
    cpu = f.get("cpu_us_per_request", {})
    names = ("pool", "chroma", "redis", "nginx", "fake_model", "wrk", "others_on_machine")
    short = {"fake_model": "fake", "others_on_machine": "others"}
    return ", ".join(f"{short.get(n, n)} {cpu[n]:.0f}" for n in names if n in cpu) + " us"


def redis_row(lead: str, f: "dict[str, Any]") -> "tuple[str, str, str, str]":
    # HVALS rides in the LRANGE pipeline: shown to prove it costs no round trip.
    hvals = f.get("redis_hvals_pipelined_per_chat", 0.0)
    return (f"{lead}: Redis round trips / chat",
            f"{f['redis_round_trips_per_chat']:.2f} (HVALS pipelined with LRANGE: {hvals:.2f}/chat; "
            f"+ indexer {f['redis_indexer_round_trips_per_chat']:.2f})",
            f"<= {TARGET_REDIS_ROUND_TRIPS:.0f}",
            verdict(f["redis_round_trips_per_chat"] <= TARGET_REDIS_ROUND_TRIPS + ROUND_TRIP_SLACK))


def build_table(r: "dict[str, Any]") -> "list[tuple[str, str, str, str]]":
    rows: "list[tuple[str, str, str, str]]" = []
    c = r.get("ceilings")
    ceiling = c["nginx_trivial_fastcgi"]["rps"] if c else 0.0
    if c:
        s = c["nginx_static"]
        rows.append((f"Ceiling: nginx return 200, c={s['connections']}",
                     f"{s['rps']:,.0f} req/s, p99 {s['latency_ms']['p99']:.2f} ms", "", "-"))
        t = c["nginx_trivial_fastcgi"]
        rows.append((f"Ceiling: nginx + trivial FastCGI ({POOL_WORKERS}x{POOL_THREADS}), c={t['connections']}",
                     f"{t['rps']:,.0f} req/s, p99 {t['latency_ms']['p99']:.2f} ms", "", "-"))
    rj = r.get("rejected")
    if rj:
        rows.append((f"Rejected path (429), c={rj['connections']}",
                     f"{rj['rps']:,.0f} req/s = {rj['share_of_fastcgi_ceiling']:.0%} of FastCGI ceiling",
                     f">= {TARGET_REJECTED_SHARE:.0%}",
                     verdict(rj["share_of_fastcgi_ceiling"] >= TARGET_REJECTED_SHARE)))
        rows.append(("Rejected path: Redis round trips / request", f"{rj['redis_round_trips_per_request']:.2f}",
                     "1 (design)", verdict(rj["redis_round_trips_per_request"] <= 1.0 + ROUND_TRIP_SLACK)))
        rows.append(("Rejected path: pool CPU / request", f"{rj['pool_cpu_us_per_request']:.0f} us", "", "-"))
    ch = r.get("chat")
    if ch:
        for key in sorted(ch["runs"], key=int):  # the JSON keeps them sorted as text
            f = ch["runs"][key]
            lat = f["latency_ms"]
            at64 = key == "64"
            rows.append((f"Chat c={key}: throughput",
                         f"{f['rps']:,.0f} req/s = {f['share_of_fastcgi_ceiling']:.0%} of FastCGI ceiling",
                         f">= {TARGET_CHAT_SHARE_AT_64:.0%}" if at64 else "",
                         verdict(f["share_of_fastcgi_ceiling"] >= TARGET_CHAT_SHARE_AT_64) if at64 else "-"))
            rows.append((f"Chat c={key}: latency p50 / p99 / p99.9",
                         f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p999']:.2f} ms", "", "-"))
            errors = f["errors_http"] + f["errors_socket"]
            rows.append((f"Chat c={key}: errors", f"{errors} of {f['requests']:,}", "0", verdict(errors == 0)))
            rows.append((f"Chat c={key}: gateway overhead (mean latency - model)",
                         f"{f['gateway_overhead_mean_ms']:.2f} ms (in pool {f['pool_overhead_mean_ms']:.2f} ms, "
                         f"model {f['model_mean_ms']:.2f} ms)", "", "-"))
            rows.append((f"Chat c={key}: pool CPU / request", f"{f['pool_cpu_us_per_request']:.0f} us",
                         f"<= {TARGET_POOL_CPU_US:.0f} us" if at64 else "",
                         verdict(f["pool_cpu_us_per_request"] <= TARGET_POOL_CPU_US) if at64 else "-"))
            rows.append(redis_row(f"Chat c={key}", f))
            rows.append((f"Chat c={key}: HTTP calls / chat",
                         f"Chroma {f['chroma_request_path_calls_per_chat']:.2f} (+ indexer "
                         f"{f['chroma_indexer_calls_per_chat']:.2f}), model {f['model_calls_per_chat']:.2f}",
                         "", "-"))
            rows.append((f"Chat c={key}: CPU per chat by process", cpu_line(f), "", "-"))
    cm = r.get("chat_memory")
    if cm:
        c = cm["connections"]
        seed = cm["seed"]
        lead = f"Chat with memory c={c}"
        rows.append((f"{lead}: users with long-term memory",
                     f"{seed['users']:,} x {seed['turns_per_user']} turns indexed before the run", "", "-"))
        rows.append((f"{lead}: throughput",
                     f"{cm['rps']:,.0f} req/s = {cm['share_of_fastcgi_ceiling']:.0%} of FastCGI ceiling",
                     f">= {TARGET_CHAT_SHARE_AT_64:.0%}",
                     verdict(cm["share_of_fastcgi_ceiling"] >= TARGET_CHAT_SHARE_AT_64) if cm["share_of_fastcgi_ceiling"]
                     else "-"))
        lat = cm["latency_ms"]
        errors = cm["errors_http"] + cm["errors_socket"]
        rows.append((f"{lead}: latency p50 / p99, errors",
                     f"{lat['p50']:.2f} / {lat['p99']:.2f} ms, {errors} of {cm['requests']:,}", "0 errors",
                     verdict(errors == 0)))
        rows.append((f"{lead}: pool CPU / chat", f"{cm['pool_cpu_us_per_request']:.0f} us",
                     f"<= {TARGET_POOL_CPU_US:.0f} us", verdict(cm["pool_cpu_us_per_request"] <= TARGET_POOL_CPU_US)))
        rows.append(redis_row(lead, cm))
        rows.append((f"{lead}: HTTP calls to Chroma / chat",
                     f"request path {cm['chroma_request_path_calls_per_chat']:.3f}, indexer "
                     f"{cm['chroma_indexer_calls_per_chat']:.3f}", "~0 on the request path",
                     verdict(cm["chroma_request_path_calls_per_chat"] < 0.01)))
        o = cm["oldest_age_s"]
        rows.append((f"{lead}: oldest waiting turn p99 (/metrics every {BACKLOG_SAMPLE_S} s)",
                     "no fresh gauge" if o["p99"] is None else
                     f"{o['p99']:.2f} s (max {o['max']:.2f} s, n={o['samples']}; stream "
                     f"{cm['stream_oldest_age_s']['p99']:.2f} s)",
                     f"< {TARGET_INDEX_OLDEST_P99_S:.0f} s",
                     verdict(None if o["p99"] is None else o["p99"] < TARGET_INDEX_OLDEST_P99_S)))
        dr = cm["drain_after"]
        left = f" (peak backlog during the run {cm['backlog_max']:,} turns)"
        if dr.get("stream_len_end") and dr.get("seconds_waited"):
            rate = (dr["stream_len_start"] - dr["stream_len_end"]) / dr["seconds_waited"]
            left = (f" ({dr['stream_len_start']:,} turns at the end of the run, {dr['stream_len_end']:,} left: "
                    f"{rate:.0f} turns/s)")
        rows.append((f"{lead}: backlog empty after the run (waiting + pending = 0)",
                     f"not within {dr['limit_s']:.0f} s{left}" if dr["metrics_s"] is None else
                     f"{dr['metrics_s']:.2f} s (stream empty {dr['stream_s']:.2f} s; peak backlog "
                     f"{cm['backlog_max']:,})" if dr["stream_s"] is not None else f"{dr['metrics_s']:.2f} s",
                     f"< {TARGET_INDEX_DRAIN_S:.0f} s",
                     verdict(dr["metrics_s"] is not None and dr["metrics_s"] < TARGET_INDEX_DRAIN_S)))
        rows.append((f"{lead}: CPU per chat by process", cpu_line(cm), "", "-"))
    g = r.get("gateway")
    if g:
        rows.append((f"Gateway only (no recall), c={g['connections']}: throughput",
                     f"{g['rps']:,.0f} req/s = {g['share_of_fastcgi_ceiling']:.0%} of FastCGI ceiling",
                     f"(>= {TARGET_CHAT_SHARE_AT_64:.0%})", "-"))
        rows.append((f"Gateway only, c={g['connections']}: latency p50 / p99 / p99.9, errors",
                     f"{g['latency_ms']['p50']:.2f} / {g['latency_ms']['p99']:.2f} / {g['latency_ms']['p999']:.2f} ms, "
                     f"{g['errors_http'] + g['errors_socket']}", "", "-"))
        rows.append((f"Gateway only, c={g['connections']}: pool CPU / request",
                     f"{g['pool_cpu_us_per_request']:.0f} us", f"(<= {TARGET_POOL_CPU_US:.0f} us)", "-"))
        rows.append((f"Gateway only, c={g['connections']}: Redis round trips / chat",
                     f"{g['redis_round_trips_per_chat']:.2f}", f"(<= {TARGET_REDIS_ROUND_TRIPS:.0f})", "-"))
        rows.append((f"Gateway only, c={g['connections']}: CPU per chat by process", cpu_line(g), "", "-"))
    for key, label in (("capacity", "full path"), ("capacity_gateway", "gateway only")):
        cap = r.get(key)
        if not cap:
            continue
        best = cap["best"]
        target = key == "capacity"
        mem = cap.get("memory")
        if mem:
            rows.append((f"Capacity, {label}: users with long-term memory",
                         f"{mem['users']:,} x {mem['turns_per_user']} turns (hot sets)", "", "-"))
        rows.append((f"Capacity, {label} ({cap['workers']}x{cap['threads']}, model 2 s): largest held",
                     f"{cap['largest_held']:,} in flight, 0 errors",
                     f">= {TARGET_CAPACITY_IN_FLIGHT:,}" if target else f"(>= {TARGET_CAPACITY_IN_FLIGHT:,})",
                     verdict(cap["largest_held"] >= TARGET_CAPACITY_IN_FLIGHT) if target else "-"))
        if best:
            rows.append((f"Capacity, {label}, at {best['connections']:,}: throughput vs ideal",
                         f"{best['rps_little']:,.0f} of {best['ideal_rps']:,.0f} req/s = {best['share_of_ideal']:.0%}",
                         (f">= {TARGET_CAPACITY_IDEAL_SHARE:.0%}" if target
                          else f"(>= {TARGET_CAPACITY_IDEAL_SHARE:.0%})"),
                         verdict(best["share_of_ideal"] >= TARGET_CAPACITY_IDEAL_SHARE) if target else "-"))
            rows.append((f"Capacity, {label}, at {best['connections']:,}: pool RSS",
                         f"{best['pool_rss_peak_bytes'] / 2**20:,.0f} MiB "
                         f"({best['pool_rss_per_in_flight_bytes'] / 1024:.0f} KiB per chat in flight)",
                         "< 1 GiB" if target else "(< 1 GiB)",
                         verdict(best["pool_rss_peak_bytes"] < TARGET_CAPACITY_RSS_BYTES) if target else "-"))
        broke = [st for st in cap["steps"] if not st["held"]]
        if broke:
            b = broke[0]
            refused = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(b["pool_statuses"].items()) if k != "200")
            rows.append((f"Capacity, {label}, at {b['connections']:,}: broke",
                         f"{b['errors']} errors (pool statuses {refused or 'none'}), p99 "
                         f"{b['latency_ms']['p99'] / 1000:.2f} s, recall degraded {b['recall_degraded']:.0f}", "", "-"))
    cr = r.get("chroma")
    if cr and cr.get("stages"):
        study = layout_study()
        per_user = study.get(("per-user", 1000))
        old = (f"; per-user layout at 1k (layout study): {per_user['load']['chroma_cpu_ms_per_turn']:.2f} ms"
               if per_user else "")
        for st in cr["stages"]:
            n = f"{st['users']:,}"
            cpu_turn = st["chroma_cpu_ms_per_turn"]
            rows.append((f"Chroma {n} users ({cr['shards']} shards, +{st['users'] - st['users_before']:,}): "
                         "CPU per indexed turn",
                         f"{cpu_turn:.2f} ms (load {st['load']['seconds']:.0f} s, load avg "
                         f"{st['loadavg_before'][0]:.1f}{old if st['users'] == 1000 else ''})",
                         f"< {TARGET_CHROMA_CPU_PER_TURN_MS:.0f} ms", verdict(cpu_turn < TARGET_CHROMA_CPU_PER_TURN_MS)))
            q = st["query"]["query_ms"]
            qcpu = st["query"].get("chroma_cpu_ms_per_call", {})
            old_q = (f"; per-user at 1k: {per_user['query']['ms']['p99']:.1f} ms"
                     if per_user and st["users"] == 1000 else "")
            rows.append((f"Chroma {n} users: recall query p50 / p99",
                         f"{q['p50']:.2f} / {q['p99']:.2f} ms, n={q['n']} (Chroma CPU {qcpu.get('query', -1):.1f} "
                         f"ms/query{old_q})",
                         f"p99 < {TARGET_CHROMA_QUERY_P99_MS:.0f} ms", verdict(q["p99"] < TARGET_CHROMA_QUERY_P99_MS)))
            rq = st["query"].get("query_before_ts_ms")
            if rq and rq.get("n"):
                # What the request path sends since the hot set, and only for
                # users whose hot set is full: where user AND ts < bound.
                rows.append((f"Chroma {n} users: recall older than the hot set (user + ts bound) p50 / p99",
                             f"{rq['p50']:.1f} / {rq['p99']:.1f} ms, n={rq['n']} (Chroma CPU "
                             f"{st['query'].get('query_before_ts_cpu_ms', -1):.1f} ms/query)",
                             f"p99 < {TARGET_CHROMA_QUERY_P99_MS:.0f} ms",
                             verdict(rq["p99"] < TARGET_CHROMA_QUERY_P99_MS)))
            a = st["query"]["add_turn_ms"]
            rows.append((f"Chroma {n} users: add one turn p50 / p99",
                         f"{a['p50']:.1f} / {a['p99']:.1f} ms (Chroma CPU {qcpu.get('add_turn', -1):.1f} ms/add)",
                         "", "-"))
            aq = st["after_query"]
            old_m = (f"; per-user at 1k: {per_user['chroma']['rss_mib']:,.0f} MiB / {per_user['chroma']['open_files']:,}"
                     if per_user and st["users"] == 1000 else "")
            rows.append((f"Chroma {n} users: RSS / open files",
                         f"{aq['rss_bytes'] / 2**20:,.0f} MiB / {aq['open_files']:,}{old_m}",
                         "< 2 GiB / < 500",
                         verdict(aq["rss_bytes"] < TARGET_CHROMA_RSS_BYTES
                                 and aq["open_files"] < TARGET_CHROMA_OPEN_FILES)))
        missing = [s for s in cr["sizes"] if s not in [st["users"] for st in cr["stages"]]]
        if missing:
            rows.append(("Chroma: sizes not measured (stopped for time)", ", ".join(f"{m:,}" for m in missing),
                         "", "MISSED"))
        cold = cr.get("cold")
        if cold:
            rows.append(("Chroma: first query after restart vs warm p50",
                         f"{cold['cold_query_ms']['p50']:.2f} vs {cold['warm_query_ms']['p50']:.2f} ms "
                         f"(very first {cold['very_first_query_ms']:.1f} ms)", "", "-"))
    st = r.get("stream_ttfb")
    if st and st.get("added_ms"):
        a, c, m = st["added_ms"], st["chatd"]["ttfb_ms"], st["model"]["ttfb_ms"]
        rows.append((f"Stream: time to first delta less the model's first chunk, c={st['connections']}, "
                     f"chunks every {st.get('chunk_delay_ms', 0)} ms ({st['workers']}x{st['threads']})",
                     f"p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms (through nginx {c['p50']:.1f} / {c['p99']:.1f}, "
                     f"model {m['p50']:.1f} / {m['p99']:.1f}; errors {st['chatd']['errors']})",
                     f"p50 <= {TARGET_STREAM_TTFB_P50_MS:.0f} ms", verdict(a["p50"] <= TARGET_STREAM_TTFB_P50_MS)))
        one = st.get("single", {}).get("added_ms")
        if one:
            rows.append(("Stream: the same, one stream at a time", f"p50 {one['p50']:.1f} ms, p99 {one['p99']:.1f} ms",
                         "", "-"))
        sat = st.get("saturated", {})
        if sat.get("added_ms"):
            a, c, m = sat["added_ms"], sat["chatd"]["ttfb_ms"], sat["model"]["ttfb_ms"]
            rows.append((f"Stream: the same, c={sat['connections']} unpaced (both cores saturated by client and fake)",
                         f"p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms (through nginx {c['p50']:.1f} / "
                         f"{c['p99']:.1f}, model {m['p50']:.1f} / {m['p99']:.1f})", "", "-"))
    sc = r.get("stream_capacity")
    if sc:
        best = max((s for s in sc["steps"] if s["held"]), key=lambda s: s["streams"], default=None)
        last = sc["steps"][-1] if sc["steps"] else None
        shown = best or last
        value = (f"{sc['largest_held']:,} held ({sc['workers']}x{sc['threads']} threads); at the largest step "
                 f"{shown['streams']:,}: {shown['errors']} errors, pool RSS {shown['pool_rss_peak_bytes'] / 2**20:,.0f} MiB"
                 if shown else "no step ran")
        if last is not None and not last["held"]:
            value += f"; {last['streams']:,} failed: {last['errors']} errors {last['error_kinds']}"
        rows.append((f"Stream: concurrent open streams, model streaming {sc['stream_seconds']} s each", value,
                     f">= {TARGET_STREAMS:,}, 0 errors, RSS < 1 GiB", verdict(sc["largest_held"] >= TARGET_STREAMS)))
    return rows


def format_table(rows: "list[tuple[str, str, str, str]]") -> str:
    head = ("Figure", "Value", "Target", "Verdict")
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(4)]
    line = lambda row: "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(row) for row in rows])


def markdown_table(rows: "list[tuple[str, str, str, str]]") -> str:
    out = ["| Figure | Value | Target | Verdict |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------


PHASES = ("ceilings", "rejected", "chat", "chat_memory", "gateway", "cap", "capacity", "capacity_gateway",
          "stream_ttfb", "stream_capacity", "chroma")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", default="build", help="build folder (default: build)")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})")
    parser.add_argument("--out", default=str(RESULTS_DIR / "latest.json"), help="where to write the JSON")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--tmp", help="parent folder of the temporary data (default: the system's)")
    parser.add_argument("--chroma-sizes", default=",".join(str(n) for n in CHROMA_SIZES),
                        help="users after each incremental Chroma load (default: %(default)s)")
    parser.add_argument("--reuse", action="append", default=[],
                        help="a results JSON of an earlier run whose phases not run now go into this table "
                             "(each phase keeps its own figures; their dates are in the file's started_utc)")
    args = parser.parse_args()
    phases = [p for p in args.only.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}")
    try:
        chroma_sizes = tuple(sorted(int(x) for x in args.chroma_sizes.split(",") if x))
    except ValueError:
        parser.error("--chroma-sizes: comma-separated user counts")
    if shutil.which("wrk") is None:
        parser.error("wrk is missing: run `make deps`")

    build_dir = (REPO / args.build).resolve()
    raise_nofile_limit()  # inherited by every service and by wrk
    build_bench_binaries(build_dir)
    started = datetime.datetime.now(datetime.timezone.utc)
    results: "dict[str, Any]" = {
        "started_utc": started.isoformat(timespec="seconds"), "machine": machine_info(),
        "loadavg_at_start": loadavg(), "phases": phases,
        "settings": {"pool": f"{POOL_WORKERS}x{POOL_THREADS}",
                     "capacity_pool": f"{CAPACITY_WORKERS}x{CAPACITY_THREADS}",
                     "chat_users": CHAT_USERS, "wrk_threads": WRK_THREADS,
                     "nginx_worker_connections": NGINX_WORKER_CONNECTIONS,
                     "rate_limit": f"{RATE_LIMIT}/{RATE_WINDOW_S}s"},
    }
    say(f"bench: load average {results['loadavg_at_start']}, {os.cpu_count()} CPUs")

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop_on_signal)

    stack: Optional[Stack] = None
    try:
        if any(p != "chroma" for p in phases):
            stack = start_stack(build_dir, args.tmp)
            frontend, trivial = start_frontend(stack, "main", dict(BASE_POOL_ENV, **CAP_OFF_ENV), POOL_WORKERS,
                                               POOL_THREADS,
                                               trivial=True)
            probe = Probe(stack, frontend, trivial)
            ceiling = 0.0
            if "ceilings" in phases:
                results["ceilings"] = phase_ceilings(probe)
                ceiling = results["ceilings"]["nginx_trivial_fastcgi"]["rps"]
            if "rejected" in phases:
                results["rejected"] = phase_rejected(stack, probe, ceiling)
            if "chat" in phases:
                results["chat"] = phase_chat(stack, probe, ceiling)
            if "chat_memory" in phases:
                results["chat_memory"] = phase_chat_memory(stack, probe, ceiling)
            stop_frontend(stack, frontend)
            if "gateway" in phases:
                results["gateway"] = phase_gateway(stack, ceiling)
            if "cap" in phases:
                results["cap"] = phase_cap(stack)
            if "capacity" in phases:
                results["capacity"] = phase_capacity(stack, "full", {})
            if "capacity_gateway" in phases:
                results["capacity_gateway"] = phase_capacity(stack, "gateway", gateway_env())
            if "stream_ttfb" in phases:
                results["stream_ttfb"] = phase_stream_ttfb(stack)
            if "stream_capacity" in phases:
                results["stream_capacity"] = phase_stream_capacity(stack)
            stack.stop()
            stack = None
        if "chroma" in phases:
            results["chroma"] = phase_chroma(build_dir, args.tmp, chroma_sizes)
    finally:
        if stack is not None:
            stack.stop()
    results["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["loadavg_at_end"] = loadavg()

    # Phases from earlier runs (the machine is shared: Chroma's long load and
    # the chat runs are run apart), each with its run's date.
    reused = {}
    for path in args.reuse:
        earlier = json.loads(Path(path).read_text())
        for phase in PHASES:
            if phase in earlier and phase not in results:
                results[phase] = earlier[phase]
                reused[phase] = {"file": os.path.basename(path), "started_utc": earlier.get("started_utc"),
                                 "git_head": earlier.get("machine", {}).get("git_head")}
    if reused:
        results["reused_phases"] = reused
    rows = build_table(results)
    results["table"] = [list(r) for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n")
    say()
    say(format_table(rows))
    say()
    say(f"bench: raw figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
