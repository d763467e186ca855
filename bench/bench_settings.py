"""What `make bench` measures and how hard: every run length, concurrency and
target of bench/run_bench.py, and the harness it starts the stack with."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness.stack import (  # noqa: E402
    LOOPBACK, UNCAPPED, Chroma, FakeModel, Frontend, Nginx, Pool, Redis, Stack, StackError, _proc_children, concurrently,
    free_port, http_json, http_request, nginx_limits_for, post_chat, proc_stat_fields)

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
