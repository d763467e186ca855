#!/usr/bin/python3
"""`make chaos`: the long chaos run under load (issue 13, docs/testing.md "Chaos").

Starts the real stack on free loopback ports, chats from many users at a
steady rate (some faster than their rate limit), injects one fault after
another (kill -9 a worker; kill -9 Redis and restart it from its AOF, under
each fsync policy asked for; SIGSTOP Chroma; model 500s and timeouts;
`chatd-cleanup run` and `forget` during the chats), then reconciles every
answered turn against Redis, Chroma and the archives. Writes a JSON report and
a human summary; exit status 1 when a target is missed (a lost turn outside an
`everysec` Redis kill, a duplicate, an admission over the limit, a crash).

    /usr/bin/python3 tests/chaos/chaos.py --build build --out build/chaos \
        [--phase-s 25] [--steady-users 24] [--fsync everysec,always] ...
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.chaos import PHASES, ChaosConfig, ChaosRun, summary_text  # noqa: E402
from harness.stack import REPO_ROOT  # noqa: E402


def parse_args() -> argparse.Namespace:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build", help="build folder (make's BUILD)")
    parser.add_argument("--out", default="build/chaos", help="folder of report.json and report.txt")
    parser.add_argument("--short", action="store_true", help="the short form of make test, with the options below")
    parser.add_argument("--fsync", default=",".join(defaults.redis_kill_fsync),
                        help="fsync policies of the Redis kills, in order (everysec, always)")
    parser.add_argument("--phases", default=",".join(defaults.phases), help=f"faults, in order, from {PHASES}")
    for f in dataclasses.fields(ChaosConfig):
        if f.name in ("redis_kill_fsync", "phases"):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
                            help=f"default {getattr(defaults, f.name)}")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    config = ChaosConfig.short() if args.short else ChaosConfig()
    for f in dataclasses.fields(ChaosConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("redis_kill_fsync", "phases"):
            setattr(config, f.name, value)
    if args.fsync != ",".join(ChaosConfig().redis_kill_fsync) or not args.short:
        config.redis_kill_fsync = tuple(m for m in args.fsync.split(",") if m)
    config.phases = tuple(p for p in args.phases.split(",") if p)

    run = ChaosRun(config, REPO_ROOT / args.build, log=lambda line: print(line, flush=True))
    report = run.run()
    out = REPO_ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    # Every chat and its attempts, for a post-mortem of the report's figures.
    with open(out / "chats.jsonl", "w") as f:
        for chat in run.chats:
            f.write(json.dumps(dataclasses.asdict(chat)) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = summary_text(report)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    print(f"\nreport: {out / 'report.json'}, {out / 'report.txt'}")
    missed = missed_targets(report)
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


def missed_targets(report: dict) -> "list[str]":
    """The targets of issue 13 a run missed. A Redis kill under everysec may
    lose what it acknowledged before the kill and had not yet fsynced: that is
    measured, not a miss; a turn answered after the restart is a miss."""
    missed = []
    lost = [x for x in report["lost"]
            if not (x["phase"] == "redis-kill-everysec" and x.get("answered_before_redis_kill_s", -1) >= 0)]
    if lost:
        missed.append(f"{len(lost)} answered turns lost: {lost[:5]}")
    if report["duplicates"]["count"]:
        missed.append(f"{report['duplicates']['count']} duplicates")
    if report["over_limit"]["count"]:
        missed.append(f"{report['over_limit']['count']} windows with admissions over the limit")
    if report["crashes"]["count"]:
        missed.append(f"{report['crashes']['count']} worker crashes")
    return missed


if __name__ == "__main__":
    sys.exit(main())
