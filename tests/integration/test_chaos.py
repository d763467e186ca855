"""The short chaos run under load (issue 13; `make chaos` is the long one).

A stack of its own (Redis, Chroma, the fake model, a pool behind nginx) takes
chats at a steady rate from a dozen users, two of them faster than their rate
limit, while faults come one after another: `chatd-cleanup run` and `forget`
next to the chats, kill -9 of a worker, kill -9 of Redis and its restart from
the AOF, Chroma frozen by SIGSTOP, model 500s and timeouts. Then every 200's
`turnId` is looked up in Redis, Chroma and the archives once the indexers
drained (tests/harness/chaos.py says exactly what each count means).

Redis runs with `appendfsync always` here, so that a kill may lose nothing that
was acknowledged: "no answered turn lost" is then an exact assertion, with no
window of tolerance. The `everysec` loss is measured by `make chaos`.

The users never burst: each has at most one chat in flight, so the per-user cap
on chats in flight keeps its default.
"""

from harness.chaos import ChaosConfig, ChaosRun, summary_text

EXPECTED_PHASES = ("cleanup", "worker-kill", "redis-kill-always", "chroma-freeze", "model-faults")
# Well below what the short form answers on a loaded machine (about 250).
MIN_ANSWERED = 50


def test_no_turn_lost_or_duplicated_no_admission_over_the_limit_no_crash_under_chaos(build_dir, tmp_path):
    report = ChaosRun(ChaosConfig.short(), build_dir, tmpdir=tmp_path).run()
    summary = summary_text(report)
    print(summary)

    # The run did what it says: every fault ran, with chats answered around it.
    assert report["drain"]["drained"], f"the indexers did not drain:\n{summary}"
    names = [p["name"] for p in report["phase_windows"]]
    assert [n for n in names if n in EXPECTED_PHASES] == list(EXPECTED_PHASES), summary
    worker_kill = next(p for p in report["phase_windows"] if p["name"] == "worker-kill")
    assert worker_kill["detail"]["respawned"], f"multiwatch did not replace the killed worker:\n{summary}"
    assert report["totals"]["answered"] >= MIN_ANSWERED, summary
    assert report["phases"]["model-faults"]["statuses"].get("502"), f"no model failure reached a client:\n{summary}"
    rejected = sum(p["statuses"].get("429", 0) for p in report["phases"].values())
    assert rejected, f"no user reached the rate limit, so the limit was not exercised:\n{summary}"
    for run in report["cleanup_runs"]:
        assert run["exit"] == 0, f"chatd-cleanup {run['args']} exited {run['exit']}: {run['errors']}\n{summary}"
    assert report["totals"]["found_in"].get("archive"), f"the cleanup archived nobody:\n{summary}"

    # The targets of issue 13.
    assert report["lost"] == [], f"answered turns lost:\n{summary}"
    assert report["over_limit"]["count"] == 0, f"admissions over the limit: {report['over_limit']}\n{summary}"
    assert report["crashes"]["count"] == 0, f"worker crashes: {report['crashes']}\n{summary}"
    # A worker killed after it recorded a turn gives nginx's 502, and the
    # client retries with the same Idempotency-Key: before keys were honoured
    # (issue 13, items 1 and 2) the turn was recorded again under a new turn
    # id, in 3 of 6 short runs.
    assert report["duplicates"]["count"] == 0, f"duplicates: {report['duplicates']}\n{summary}"
    # A chat in flight while `forget` erases its user must not record its turn
    # afterwards: before the erase tombstone (issue 13, item 4) the forgotten
    # user was remembered again in every run.
    kept = {user: {cls: v for cls, v in info.items()
                   if cls in ("answered before the forget", "in flight during the forget") and v["kept"]}
            for user, info in report["forgotten"].items()}
    assert not any(kept.values()), f"turns of forgotten users kept after the forget: {kept}\n{summary}"
