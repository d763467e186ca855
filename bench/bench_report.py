"""The report of `make bench`: the machine, the verdicts against the targets,
and the table in text and Markdown."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any, Optional

from bench_settings import (
    BACKLOG_SAMPLE_S, CHROMA_MESSAGES, POOL_THREADS, POOL_WORKERS, REPO, ROUND_TRIP_SLACK, TARGET_CAPACITY_IDEAL_SHARE,
    TARGET_CAPACITY_IN_FLIGHT, TARGET_CAPACITY_RSS_BYTES, TARGET_CHAT_SHARE_AT_64, TARGET_CHROMA_CPU_PER_TURN_MS,
    TARGET_CHROMA_OPEN_FILES, TARGET_CHROMA_QUERY_P99_MS, TARGET_CHROMA_RSS_BYTES, TARGET_INDEX_DRAIN_S,
    TARGET_INDEX_OLDEST_P99_S, TARGET_POOL_CPU_US, TARGET_REDIS_ROUND_TRIPS, TARGET_REJECTED_SHARE,
    TARGET_STREAMS, TARGET_STREAM_TTFB_P50_MS)
from bench_phases import layout_study


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
    # HVALS rides in the LRANGE pipeline, and both in the admission's round
    # trip: shown to prove they cost none.
    hvals = f.get("redis_hvals_pipelined_per_chat", 0.0)
    return (f"{lead}: Redis round trips / chat",
            f"{f['redis_round_trips_per_chat']:.2f} (memory read with the admission; HVALS {hvals:.2f}/chat; "
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
    gc = r.get("gateway_cluster")
    if g and gc:
        rows.append((f"Gateway, c={gc['connections']}: Redis Cluster ({gc['redis_primaries']} primaries) vs one Redis",
                     f"{gc['rps']:,.0f} vs {g['rps']:,.0f} req/s; pool CPU {gc['pool_cpu_us_per_request']:.0f} vs "
                     f"{g['pool_cpu_us_per_request']:.0f} us/req; Redis {gc['redis_round_trips_per_request']:.2f} vs "
                     f"{g['redis_round_trips_per_request']:.2f} round trips/request; pool answers "
                     f"{gc['pool_statuses']}",
                     "", "-"))
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
            bi = st["query"].get("recall_by_id_ms")
            if bi and bi.get("n"):
                # What the request path sends for a user whose older messages
                # number at most CHATD_RECALL_BY_ID_MAX: a /get by id, ranked
                # in the worker (its CPU per call is the pool's cost).
                wc = st["query"].get("recall_by_id_client_cpu_ms", {})
                rows.append((f"Chroma {n} users: recall by id ({CHROMA_MESSAGES - 4} older messages) p50 / p99",
                             f"{bi['p50']:.2f} / {bi['p99']:.2f} ms, n={bi['n']} (Chroma CPU "
                             f"{st['query'].get('recall_by_id_cpu_ms', -1):.1f} ms/recall; worker CPU p50 "
                             f"{wc.get('p50', -1):.2f} ms)",
                             f"p99 < {TARGET_CHROMA_QUERY_P99_MS:.0f} ms",
                             verdict(bi["p99"] < TARGET_CHROMA_QUERY_P99_MS)))
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
        same = st.get("added_same_request_ms") or {}
        if same.get("p50") is not None:
            # The verdict: each request's wait less the model's own time for it.
            rows.append((f"Stream: time to first delta less the model's first chunk of the same request, "
                         f"c={st['connections']}, chunks every {st.get('chunk_delay_ms', 0)} ms "
                         f"({st['workers']}x{st['threads']})",
                         f"p50 {same['p50']:.1f} ms, p99 {same['p99']:.1f} ms (n={same['n']:,})",
                         f"p50 <= {TARGET_STREAM_TTFB_P50_MS:.0f} ms",
                         verdict(same["p50"] <= TARGET_STREAM_TTFB_P50_MS)))
        own = st.get("chatd_own_ms") or {}
        if own.get("p50") is not None:
            # What the request log says chatd took: no client, nginx or fake in it.
            rows.append((f"Stream: chatd's own share by its request log, c={st['connections']}",
                         f"p50 {own['p50']:.2f} ms, p99 {own['p99']:.2f} ms (n={own['n']:,})", "", "-"))
        rows.append((f"Stream: the same, less the model-only run's first chunk, c={st['connections']}",
                     f"p50 {a['p50']:.1f} ms, p99 {a['p99']:.1f} ms (through nginx {c['p50']:.1f} / {c['p99']:.1f}, "
                     f"model {m['p50']:.1f} / {m['p99']:.1f}; errors {st['chatd']['errors']})",
                     "" if same.get("p50") is not None else f"p50 <= {TARGET_STREAM_TTFB_P50_MS:.0f} ms",
                     "-" if same.get("p50") is not None else verdict(a["p50"] <= TARGET_STREAM_TTFB_P50_MS)))
        one = st.get("single", {}).get("added_same_request_ms") or st.get("single", {}).get("added_ms")
        if one and one.get("p50") is not None:
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
