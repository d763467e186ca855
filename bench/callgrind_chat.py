#!/usr/bin/python3
"""Instructions per chat in chatd's request threads, counted by callgrind.

Wall-clock CPU figures on this shared 2-core machine move with whatever else
runs; callgrind counts instructions, the same for the same binary and data
whatever the machine does. This starts the real stack (Redis, Chroma, the fake
model, nginx, one chatd worker under valgrind), gives USERS users MESSAGES
turns each, waits until the indexer has put them all in Chroma and the hot
sets, then sends CHATS chats (the same ones for every binary: seeded) and
prints the instructions of the request threads (FcgiServer::ThreadMain,
inclusive) per chat, with the biggest callees.

    bench/callgrind_chat.py --binary build/bin/chatd [--users 40] [--turns 10] [--chats 200] [--env N=V]

Compare two binaries on the same data by running it once per binary; --turns
above CHATD_RECALL_HOT_MESSAGES / 2 (32) gives users whose hot set is full,
whose chats also ask Chroma.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import keys as rkeys  # noqa: E402
from harness.stack import Chroma, FakeModel, Nginx, Pool, Redis, poll_until  # noqa: E402

FUNCTIONS = ["FcgiServer::ThreadMain()", "ChatService::Chat(", "RedisShortTermStore::Read(", "RankHot(",
             "ChromaStore::Recall(", "ChromaStore::RecallAmong(", "OpenAIChat::Complete(", "RedisShortTermStore::RecordTurn(",
             "RejectionCache::Check(", "FCGX_Accept_r"]
DRAIN_TIMEOUT_S = 600


def post(url: str, user: str, text: str) -> int:
    body = json.dumps({"userId": user, "message": text}).encode()
    req = urllib.request.Request(url + "/api/chat", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        return r.status


def inclusive(report: str, name: str) -> int:
    """The inclusive count of the first line naming `name` as a function."""
    for line in report.splitlines():
        if "=>" in line or name not in line:
            continue
        count = line.strip().split(" ", 1)[0].replace(",", "")
        if count.isdigit():
            return int(count)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--chats", type=int, default=200)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="one more variable for chatd, e.g. CHATD_RECALL_BY_ID_MAX=0 (repeatable)")
    args = ap.parse_args()
    binary = Path(args.binary).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="chatd-cg-"))
    wrapper_dir = tmp / "build"
    (wrapper_dir / "bin").mkdir(parents=True)
    wrapper = wrapper_dir / "bin" / "chatd"
    out_file = tmp / "callgrind.out"
    # One worker under callgrind; the harness starts it as it starts chatd.
    wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out_file}.%p "
                       f"{binary}\n")
    wrapper.chmod(0o755)
    started = []
    try:
        redis = Redis(tmp).start()
        started.append(redis)
        chroma = Chroma(tmp).start()
        started.append(chroma)
        fake = FakeModel(tmp).start()
        started.append(fake)
        env = {"CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port), "CHATD_CHROMA_URL": chroma.url,
               "OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "callgrind", "CHATD_AUTH_MODE": "off",
               "CHATD_RATE_LIMIT": "100000", "CHATD_MAX_CONCURRENT_PER_USER": "1000",
               "CHATD_METRICS_FILE": str(tmp / "metrics")}
        env.update(kv.split("=", 1) for kv in args.env)
        pool = Pool(tmp / "pool", wrapper_dir, env, workers=1, threads=2, log_path=tmp / "chatd.log")
        pool.start()
        started.append(pool)
        nginx = Nginx(tmp / "nginx", pool.socket_path).start()
        started.append(nginx)
        rng = random.Random(7)
        for turn in range(args.turns):
            for u in range(1, args.users + 1):
                post(nginx.url, f"cg-u{u}", f"note {turn} of user {u}: {rng.choice(['tides', 'cello', 'bread'])}")

        def groups() -> "list[dict]":
            out = []
            for stream in rkeys.all_index_streams():
                for g in redis.redis_command("XINFO", "GROUPS", stream) or []:
                    out.append(dict(zip(g[::2], g[1::2])))
            return out

        def drained() -> bool:
            found = groups()
            return len(found) == rkeys.REDIS_SHARDS and all(
                g.get(b"lag") == 0 and g.get(b"pending") == 0 for g in found)
        if not poll_until(drained, DRAIN_TIMEOUT_S, interval=1):
            raise SystemExit(f"the indexer did not drain the seeded turns: {groups()}")
        worker = str(pool.worker_pids()[0])
        subprocess.run(["callgrind_control", "--zero", worker], check=True, capture_output=True)
        for i in range(args.chats):
            post(nginx.url, f"cg-u{rng.randint(1, args.users)}", f"what did I say about the tides {i}?")
        subprocess.run(["callgrind_control", "--dump", worker], check=True, capture_output=True)
        dumps = poll_until(lambda: [p for p in tmp.glob("callgrind.out.*") if p.stat().st_size > 0], 30)
        if not dumps:
            raise SystemExit("callgrind wrote no profile")
        dump = max(dumps, key=lambda p: p.stat().st_mtime)
        report = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True,
                                text=True, check=True).stdout
        print(f"binary {binary}: {args.users} users x {args.turns} turns, {args.chats} chats {' '.join(args.env)}")
        for name in FUNCTIONS:
            print(f"  {name:36s} {inclusive(report, name) / args.chats:12,.0f} instructions per chat")
        return 0
    finally:
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
