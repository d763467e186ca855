"""Readings of the bench: CPU, memory and open files from /proc, the pool's
/metrics, Redis INFO, and the before/after probe that turns them into
per-request figures."""

from __future__ import annotations

import collections
import os
import re
import resource
import time
from typing import Any, Optional

from bench_settings import (
    CHROMA_API, CLK_TCK, Frontend, Pool, Redis, Stack, StackError, _proc_children, http_json, http_request,
    proc_stat_fields)


# ---------------------------------------------------------------------------
# /proc, Redis, metrics


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads, dead ones included)."""
    fields = proc_stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return 0
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def task_ticks(pid: int) -> "dict[int, int]":
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        fields = proc_stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if fields is not None:
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

    def __init__(self, stack: Stack, frontend: Frontend, trivial: Optional[Pool] = None,
                 redis_nodes: Optional["list[Redis]"] = None) -> None:
        self.stack = stack
        self.frontend = frontend
        self.trivial = trivial
        # Whose command counters add up to the pool's Redis calls: the stack's
        # Redis, or a cluster's primaries (a replica counts the replicated
        # writes again).
        self.redis_nodes = redis_nodes if redis_nodes is not None else [stack.redis]

    def groups(self) -> "dict[str, list[int]]":
        s, f = self.stack, self.frontend
        groups = {
            "pool": f.pool.worker_pids(),
            "nginx": descendants(f.nginx.pid) if f.nginx.pid else [],
            "redis": [n.pid for n in self.redis_nodes if n is not None and n.pid],
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
            snap["redis"] = {}
            for node in self.redis_nodes:
                for k, v in redis_info(node).items():
                    snap["redis"][k] = snap["redis"].get(k, 0.0) + v
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
    HVALS as LRANGE). Nothing else sends HVALS.

    Since the admission's script carries the memory read in its round trip
    (RedisChatStart), commands cannot tell round trips apart any more: the
    request path's figure is chatd's own count (chatd_redis_round_trips_total)
    when the pool reports it, and the command-derived sum only for a pool
    that does not."""
    r = d.get("redis", {})
    c = lambda name: r.get("cmd." + name, 0.0)  # noqa: E731
    # With the per-user cap the limiter's script also runs ZCARD (on the
    # leases), so the fixed window's HMGET alone counts its calls; ZCARD
    # counts them for the sliding log without a cap (twice with one).
    limiter = c("hmget") or c("zcard")
    record = c("rpush")
    other_scripts = max(0.0, c("evalsha") + c("eval") - limiter - record)
    counted = metric(d, "chatd_redis_round_trips_total")
    return {
        "request_path": counted or limiter + record + c("lrange"),
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
