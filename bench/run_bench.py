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
     runs use the same users, so they too run with hot sets (the full path);
  8. the gateway path on a Redis Cluster ("gateway_cluster": 3 primaries and
     3 replicas on this machine) next to the single Redis of "gateway":
     throughput, Redis round trips and pool CPU per chat.

Prints one table and writes the raw figures to bench/results/latest.json.
Targets are reported, never asserted: the exit status is 0 when every phase
ran, whatever the figures. docs/performance.md explains what bounds each one.

Standard library only; runs under Debian's /usr/bin/python3.

The pieces live beside it: bench_settings.py (what is measured),
bench_procfs.py (readings), bench_phases.py (the runs), bench_report.py
(the table); every name they define can still be imported from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from bench_settings import (  # noqa: F401 (re-exported)
    BACKLOG_DRAIN_LIMIT_S, BACKLOG_POLL_S, BACKLOG_SAMPLE_S, BASE_POOL_ENV, BENCH_DIR, CAPACITY_DELAY_MS,
    CAPACITY_P99_BREAK_FACTOR, CAPACITY_RUN_S, CAPACITY_SAMPLE_S, CAPACITY_STEPS, CAPACITY_THREADS,
    CAPACITY_WORKERS, CAP_CONNECTIONS, CAP_OFF_ENV, CAP_RUN_S, CEILING_CONNECTIONS, CEILING_RUN_S,
    CHAT_CONCURRENCY, CHAT_PREFIX, CHAT_RUN_S, CHAT_USERS, CHROMA_ADDS, CHROMA_API, CHROMA_BATCH_USERS,
    CHROMA_COLD_SAMPLE, CHROMA_FIRST_QUERIES, CHROMA_LOAD_THREADS, CHROMA_MESSAGES, CHROMA_QUERIES, CHROMA_SHARDS,
    CHROMA_SIZES, CHROMA_STAGE_TIMEOUT_S, CHROMA_TIMEOUT_MS, CLK_TCK, Chroma, FakeModel, Frontend,
    GATEWAY_CONNECTIONS, GATEWAY_ONLY_ENV, GATEWAY_RUN_S, LAYOUT_STUDY, LIMITED_USER_PREFIX,
    LOOPBACK, MEMORY_CONNECTIONS, MEMORY_RUN_S, MEMORY_SEED_WORKERS, MEMORY_TURNS, NGINX_RLIMIT_NOFILE,
    NGINX_WORKER_CONNECTIONS, Nginx, POOL_THREADS, POOL_WORKERS, Pool, RATE_LIMIT, RATE_WINDOW_S, REJECTED_RUN_S,
    REPO, RESULTS_DIR, ROUND_TRIP_SLACK, Redis, STREAM_SECONDS, STREAM_STEPS, STREAM_TIMEOUT_S,
    STREAM_TTFB_CHUNK_DELAY_MS, STREAM_TTFB_CONNECTIONS, STREAM_TTFB_RUN_S, STREAM_TTFB_THREADS,
    STREAM_TTFB_WORKERS, STREAM_WORDS, Stack, StackError, TARGET_CAPACITY_IDEAL_SHARE, TARGET_CAPACITY_IN_FLIGHT,
    TARGET_CAPACITY_RSS_BYTES, TARGET_CHAT_SHARE_AT_64, TARGET_CHROMA_CPU_PER_TURN_MS, TARGET_CHROMA_OPEN_FILES,
    TARGET_CHROMA_QUERY_P99_MS, TARGET_CHROMA_RSS_BYTES, TARGET_INDEX_DRAIN_S, TARGET_INDEX_OLDEST_P99_S,
    TARGET_POOL_CPU_US, TARGET_REDIS_ROUND_TRIPS, TARGET_REJECTED_SHARE, TARGET_STREAMS,
    TARGET_STREAM_TTFB_P50_MS, UNCAPPED, WARMUP_CONNECTIONS, WARMUP_RUN_S, WRK_SCRIPT, WRK_THREADS, WRK_TIMEOUT_S,
    _proc_children, concurrently, free_port, http_json, http_request, nginx_limits_for, post_chat,
    raise_nofile_limit, say)
from bench_procfs import (  # noqa: F401 (re-exported)
    Probe, chroma_collections, delta, descendants, loadavg, machine_ticks, metric, open_files, pool_requests,
    proc_ticks, pss_kib, redis_breakdown, redis_info, scrape_metrics, status_kib, task_ticks)
from bench_phases import (  # noqa: F401 (re-exported)
    BacklogSampler, BenchNginx, PeriodicSampler, Sampler, _chatd_stream_request, _sse_closed_loop,
    _sse_request, _ttfb_figures, backlog_empty, backlog_now, build_bench_binaries,
    chat_figures, chat_line, chroma_process, gateway_env, index_backlog, layout_study, measured_run, percentile,
    phase_cap, phase_capacity, phase_ceilings, phase_chat, phase_chat_memory, phase_chroma, phase_gateway,
    phase_gateway_cluster, phase_rejected, phase_stream_capacity, phase_stream_ttfb, run_chroma_bench, run_wrk, seed_memory,
    start_frontend, start_stack, stop_frontend, wait_backlog_empty)
from bench_report import (  # noqa: F401 (re-exported)
    build_table, cpu_line, format_table, machine_info, markdown_table, redis_row, verdict)


# ---------------------------------------------------------------------------


PHASES = ("ceilings", "rejected", "chat", "chat_memory", "gateway", "gateway_cluster", "cap", "capacity", "capacity_gateway",
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
            if "gateway_cluster" in phases:
                results["gateway_cluster"] = phase_gateway_cluster(stack, ceiling)
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
