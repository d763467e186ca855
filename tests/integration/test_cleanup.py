"""chatd-cleanup against the real stack (issue 5): inactive users are archived
and removed, active ones untouched; restore brings back every record exactly;
forget erases everything; a run killed at any step and run again ends as if
never killed; a user writing during the cleanup loses nothing; and the work
grows with the inactive users, not with all tracked users.

Each test has its own Redis (so the activity index holds only its users) and
its own pool on it; the module shares one Chroma of its own. The binary runs as
a subprocess with the pool's environment, and CHATD_CLEANUP_NOW_MS, a pretend
clock, makes users inactive without waiting. Races are made deterministic with
HoldingProxy, which holds one chosen Chroma call (the cleanup's delete, or the
indexer's upsert) until the test has done its part.
"""

import json
import os
import re
import signal
import struct
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from fake_model.fake_openai import embed as local_embed
from harness.chroma_proxy import ChromaProxy
from harness.chroma_layout import (CHROMA_PREFIX, legacy_collection_name, legacy_records, shard_of, shard_records,
                                    user_records)
from harness import keys as rkeys
from harness.stack import (LOOPBACK, Chroma, Redis, concurrently, http_json, json_log_records, poll_until, post_chat,
                           redis_now_ms, scrape_metrics)
from harness.windows import LASTING_RATE_ENV

INDEX_GROUP = "indexers"
EXCERPT_PREAMBLE = "Quoted earlier conversation with this user"
EXCERPT_END = "End of quoted earlier conversation."
ARCHIVE_FORMAT = "chatd-archive/1"
CRASH_STATUS = 137
CRASH_POINTS = ("after_lock", "after_export", "after_delete_collection")
DAY_MS = 24 * 3600 * 1000
INACTIVE_S = 3600
# Far enough ahead that everybody in the test's own Redis is inactive.
FAR_FUTURE_MS = 30 * DAY_MS
CLEANUP_TIMEOUT_S = 180
INDEX_TIMEOUT_S = 45
POLL_INTERVAL_S = 0.2
CHROMA_HTTP_TIMEOUT_S = 30
HIGH_RATE_LIMIT = "1000"
# The pools wait this long for Chroma, so that a slow query on a loaded machine
# is not mistaken for an outage by the tests that check recall, and so that a
# request held by HoldingProxy does not time out while the test works.
PATIENT_CHROMA_TIMEOUT_MS = "10000"
# Long enough for the test to freeze an indexer between its read and its lock
# check; every turn of the test reaches Chroma only that long after it was read.
LINGER_MS = "4000"
FREEZE_ATTEMPTS = 5
MEMORY_LINE_RE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\] (user|assistant): (.*)$")


def quoted_lines(content: str) -> "list[str]":
    """The excerpt lines of the quoted-memory user message, without its preamble
    and end line (neither ever appears in the middle: continuations are indented)."""
    lines = content.split("\n")
    assert lines[-1] == EXCERPT_END, lines[-1]
    return lines[1:-1]


# --------------------------------------------------------------------------
# What Redis, Chroma and the archive hold


def chroma_records(chroma_url: str, user: str) -> "list[dict]":
    """Every record of the user in Chroma, as {id, document, metadata, embedding}."""
    return user_records(chroma_url, user)


def exact(records) -> "dict[str, tuple]":
    """Records by id, as comparable values: embeddings as float32 bytes, which
    is what Chroma stores and what the archive must round-trip."""
    out = {}
    for r in records:
        assert r["id"] not in out, f"duplicate id {r['id']}"
        out[r["id"]] = (r["document"], json.dumps(r["metadata"], sort_keys=True),
                        struct.pack(f"<{len(r['embedding'])}f", *r["embedding"]))
    return out


def user_keys(redis, user: str) -> "list[bytes]":
    keys, cursor = [], b"0"
    while True:
        cursor, batch = redis.command("SCAN", cursor, "MATCH", rkeys.user_key_pattern(user), "COUNT", 1000)
        keys.extend(batch)
        if cursor == b"0":
            return sorted(keys)


def recent_list(redis, user: str) -> "list[dict]":
    return [json.loads(raw) for raw in redis.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1)]


def stream_users(redis, streams: "Optional[list[str]]" = None) -> "list[str]":
    """The users of every entry of the streams (default: every shard's index stream)."""
    users = []
    for key in streams if streams is not None else rkeys.all_index_streams():
        for _, fields in redis.command("XRANGE", key, "-", "+"):
            values = dict(zip(fields[0::2], fields[1::2]))
            users.append(values.get(b"user", b"").decode())
    return users


def activity(redis, user: str) -> Optional[int]:
    score = redis.command("ZSCORE", rkeys.activity_of(user), user)
    return None if score is None else int(float(score))


def archive_dir_of(archive_root: Path, user: str) -> Path:
    return archive_root / legacy_collection_name(user)


def archive_files(archive_root: Path, user: str) -> "list[Path]":
    folder = archive_dir_of(archive_root, user)
    return sorted(folder.iterdir()) if folder.exists() else []


def read_archive(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert doc["format"] == ARCHIVE_FORMAT
    return doc


def archived_records(archive_root: Path, user: str) -> "list[dict]":
    records = []
    for path in archive_files(archive_root, user):
        records.extend(read_archive(path)["records"])
    return records


def recorded_prompt(fake, marker: str) -> "list[dict]":
    found = fake.requests(marker)
    assert len(found) == 1, f"{len(found)} model requests carry {marker!r}"
    return found[0]["messages"]


def recalled_texts(messages) -> "list[str]":
    excerpts = [m for m in messages if m["role"] == "user" and m["content"].startswith(EXCERPT_PREAMBLE)]
    texts = []
    for excerpt in excerpts:
        for line in quoted_lines(excerpt["content"]):
            match = MEMORY_LINE_RE.match(line)
            assert match, f"malformed memory line {line!r}"
            texts.append(match.group(2))
    return texts


# The harness's fault-injecting proxy, used here for its `hold`.
HoldingProxy = ChromaProxy


# --------------------------------------------------------------------------
# The world of one test: own Redis, the module's Chroma, a pool on both


@dataclass
class CleanupRun:
    returncode: int
    log: "list[dict]"
    stderr: str

    def events(self, name: str) -> "list[dict]":
        return [r for r in self.log if r.get("event") == name]

    @property
    def summary(self) -> dict:
        found = self.events("cleanup_summary")
        assert found, f"no cleanup_summary line; stderr:\n{self.stderr[-3000:]}"
        assert self.log[-1] is found[-1], "the summary must be the last line"
        return found[-1]


class World:
    def __init__(self, stack, redis: Redis, chroma: Chroma, frontend, archive_root: Path, binary: Path) -> None:
        self.stack = stack
        self.redis = redis
        self.chroma = chroma
        self.frontend = frontend
        self.archive_root = archive_root
        self.binary = binary

    @property
    def url(self) -> str:
        return self.frontend.url

    def env(self, now_ms: Optional[int], crash_at: Optional[str], chroma_url: Optional[str],
            extra: Optional[dict] = None) -> "dict[str, str]":
        overrides = {
            "CHATD_REDIS_PORT": str(self.redis.port),
            "CHATD_CHROMA_URL": chroma_url or self.chroma.url,
            "CHATD_ARCHIVE_DIR": str(self.archive_root),
            "CHATD_CLEANUP_INACTIVE_S": str(INACTIVE_S),
            "CHATD_CLEANUP_NOW_MS": str(now_ms) if now_ms is not None else None,
            "CHATD_CLEANUP_CRASH_AT": crash_at,
            **(extra or {}),
        }
        env = {k: v for k, v in self.stack.pool_env(threads=1, overrides=overrides).items() if v is not None}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        return env

    def start_cleanup(self, *args: str, now_ms: Optional[int] = None, crash_at: Optional[str] = None,
                      chroma_url: Optional[str] = None, extra_env: Optional[dict] = None,
                      stderr_file=None) -> subprocess.Popen:
        """stderr_file: an open file for the log lines, which the test can read
        while the process runs (then `finish` reads it back from there)."""
        return subprocess.Popen([str(self.binary), *args], env=self.env(now_ms, crash_at, chroma_url, extra_env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr_file if stderr_file is not None else subprocess.PIPE, text=True)

    def cleanup(self, *args: str, now_ms: Optional[int] = None, crash_at: Optional[str] = None,
                chroma_url: Optional[str] = None) -> CleanupRun:
        proc = self.start_cleanup(*args, now_ms=now_ms, crash_at=crash_at, chroma_url=chroma_url)
        return finish(proc)

    def far_future(self) -> int:
        return redis_now_ms(self.redis) + FAR_FUTURE_MS

    def chat(self, user: str, message: str) -> str:
        status, _, body = post_chat(self.url, user, message)
        assert status == 200, f"{user}: expected 200, got {status}: {body!r}"
        assert f"last_user={message}" in body["response"], body
        return body["response"]

    def records(self, user: str) -> "list[dict]":
        return chroma_records(self.chroma.url, user)

    def wait_indexed(self, users, expected: int) -> "dict[str, list[dict]]":
        """Polls until each user's collection holds `expected` records and none of
        their turns waits in the stream; returns the records by user."""
        users = [users] if isinstance(users, str) else list(users)
        latest = {}

        def done():
            for user in users:
                latest[user] = self.records(user)
            queued = set(stream_users(self.redis))
            return all(len(latest[u]) >= expected and u not in queued for u in users)

        indexed = poll_until(done, INDEX_TIMEOUT_S, POLL_INTERVAL_S)
        assert indexed, f"not indexed within {INDEX_TIMEOUT_S} s: " \
                        f"{ {u: len(r) for u, r in latest.items()} } (expected {expected} each)"
        for user in users:
            assert len(latest[user]) == expected, (user, len(latest[user]))
        return dict(latest)

    def assert_gone_from_live_storage(self, user: str, erased: bool = False) -> None:
        # An erase (forget) leaves its tombstone, which holds no memory and
        # expires once no chat that started before the erase can still run.
        keys = user_keys(self.redis, user)
        if erased:
            tombstone = rkeys.user_key(user, "erased").encode()
            assert tombstone in keys and 0 < self.redis.command("PTTL", tombstone), keys
            keys.remove(tombstone)
        assert keys == [], f"{user} still has Redis keys"
        assert activity(self.redis, user) is None, f"{user} is still in the activity index"
        assert user not in stream_users(self.redis), f"{user} still has turns in the index stream"
        assert chroma_records(self.chroma.url, user) == [], f"{user} still has records in Chroma"


def finish(proc: subprocess.Popen, stderr_path: Optional[Path] = None) -> CleanupRun:
    try:
        _, stderr = proc.communicate(timeout=CLEANUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"chatd-cleanup ran longer than {CLEANUP_TIMEOUT_S} s:\n{(stderr or '')[-3000:]}")
    if stderr_path is not None:
        stderr = stderr_path.read_text()
    return CleanupRun(proc.returncode, json_log_records(stderr), stderr)


def assert_clean_run(run: CleanupRun, **expected: int) -> dict:
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stderr[-3000:]}"
    summary = run.summary
    for key, value in expected.items():
        assert summary[key] == value, f"{key}: {summary}"
    return summary


@pytest.fixture(scope="module")
def module_chroma(tmp_path_factory):
    chroma = Chroma(tmp_path_factory.mktemp("cleanup-chroma")).start()
    try:
        yield chroma
    finally:
        chroma.stop()


@pytest.fixture
def make_world(module_chroma, tmp_path, build_dir, stack, new_pool):
    """make_world(pool_chroma_url=None, workers=2, pool_env=None) -> World: own
    Redis, a pool on it that reaches the module's Chroma (or a proxy in front of
    it)."""
    started = []

    def make(pool_chroma_url: Optional[str] = None, workers: int = 2, pool_env: Optional[dict] = None) -> World:
        assert not started, "one world per test"
        redis = Redis(tmp_path).start()
        started.append((redis, None))
        frontend = new_pool({"CHATD_REDIS_PORT": str(redis.port),
                             "CHATD_CHROMA_URL": pool_chroma_url or module_chroma.url,
                             "CHATD_RATE_LIMIT": HIGH_RATE_LIMIT,
                             "CHATD_CHROMA_TIMEOUT_MS": PATIENT_CHROMA_TIMEOUT_MS,
                             # Tests compare a user's keys before and after a run: a
                             # fixed window's counter would expire at the next minute.
                             **LASTING_RATE_ENV,
                             **(pool_env or {})}, workers=workers, threads=2)
        started[0] = (redis, frontend)
        return World(stack, redis, module_chroma, frontend, tmp_path / "archive",
                     build_dir / "bin" / "chatd-cleanup-testhooks")

    yield make
    for redis, frontend in started:
        if frontend is not None:
            frontend.stop()  # before its Redis goes; new_pool's second stop does nothing
        redis.stop()


@pytest.fixture
def world(make_world):
    return make_world()


def converse(world: World, user: str, messages) -> "list[tuple[str, str]]":
    return [(m, world.chat(user, m)) for m in messages]


def check_archive_file(world: World, user: str, last_activity: int, expected_records) -> None:
    files = archive_files(world.archive_root, user)
    assert [p.name for p in files] == [f"{last_activity}.json"], files
    doc = read_archive(files[0])
    assert doc["user"] == user and doc["collection"] == legacy_collection_name(user)
    assert doc["last_activity_ms"] == last_activity
    ids = [r["id"] for r in doc["records"]]
    assert len(ids) == len(set(ids)), f"duplicate ids in the archive: {Counter(ids).most_common(3)}"
    assert exact(doc["records"]) == exact(expected_records)


# --------------------------------------------------------------------------
# Archive


def test_inactive_users_are_archived_and_removed_and_active_ones_untouched(make_world, unique):
    world = make_world()
    sleepers = {unique("sleeper"): 2, unique("sleeper"): 1}
    for user, turns in sleepers.items():
        converse(world, user, [f"old message {i} of {user}" for i in range(turns)])
    before = {u: world.wait_indexed(u, 2 * n)[u] for u, n in sleepers.items()}
    last_seen = {u: activity(world.redis, u) for u in sleepers}
    for user in sleepers:
        assert world.redis.command("EXISTS", rkeys.user_key(user, "rl:sliding")) == 1  # so its removal means something
    cutoff = max(last_seen.values()) + 1

    active = unique("active")
    converse(world, active, [f"a fresh message of {active}"])
    active_records = world.wait_indexed(active, 2)[active]
    active_seen = activity(world.redis, active)
    assert active_seen > cutoff, "the active user must be after the cut-off"
    active_keys, active_recent = user_keys(world.redis, active), recent_list(world.redis, active)

    run = world.cleanup(now_ms=cutoff + INACTIVE_S * 1000)
    total = sum(len(r) for r in before.values())
    assert_clean_run(run, scanned=2, archived=2, returned=0, failed=0, records=total)

    for user in sleepers:
        check_archive_file(world, user, last_seen[user], before[user])
        world.assert_gone_from_live_storage(user)
    assert activity(world.redis, active) == active_seen
    assert user_keys(world.redis, active) == active_keys
    assert recent_list(world.redis, active) == active_recent
    assert exact(world.records(active)) == exact(active_records)
    assert archive_files(world.archive_root, active) == []
    assert [p for p in world.archive_root.rglob("*") if p.name.endswith(".tmp")] == []


def test_malformed_ids_in_the_activity_index_and_in_progress_set_are_reported_and_left_alone(world):
    # Only chatd's scripts write these sets, and always with a parsed id: a
    # malformed member is someone else's write. The run parses what it reads,
    # names such a member, counts it failed, builds no key from it, and leaves
    # it where it is.
    inactive, locked = "not a user", "x}y"
    activity_key, in_progress_key = rkeys.shard_key(0, "activity"), rkeys.shard_key(0, "cleanup:inprogress")
    world.redis.command("ZADD", activity_key, "1", inactive)
    world.redis.command("SADD", in_progress_key, locked)

    run = world.cleanup(now_ms=world.far_future())
    assert run.returncode == 1, run.stderr[-3000:]  # a user failed
    summary = run.summary
    assert (summary["scanned"], summary["failed"], summary["archived"]) == (1, 1, 0), summary
    reported = {r["user"] for r in run.events("cleanup_user_failed") if r.get("reason") == "invalid_user_id"}
    assert reported == {inactive, locked}, run.stderr[-3000:]
    assert world.redis.command("ZSCORE", activity_key, inactive) is not None
    assert world.redis.command("SISMEMBER", in_progress_key, locked) == 1


def test_forget_and_restore_refuse_a_malformed_user_id_as_bad_usage(world):
    for command in ("forget", "restore"):
        run = world.cleanup(command, "a b")
        assert run.returncode == 2, run.stderr[-3000:]
        assert '"a b" is not a valid user id' in run.stderr


def test_dry_run_reports_and_changes_nothing(world, unique):
    user = unique("dry")
    converse(world, user, [f"a message of {user}"])
    records = world.wait_indexed(user, 2)[user]
    keys, seen = user_keys(world.redis, user), activity(world.redis, user)

    run = world.cleanup("--dry-run", now_ms=world.far_future())
    assert_clean_run(run, scanned=1, archived=0, failed=0)
    [would] = run.events("cleanup_would_archive")
    assert would["user"] == user and would["records"] == 2
    assert user_keys(world.redis, user) == keys and activity(world.redis, user) == seen
    assert exact(world.records(user)) == exact(records)
    assert not world.archive_root.exists() or list(world.archive_root.iterdir()) == []


# --------------------------------------------------------------------------
# Restore and forget


def test_archive_then_restore_brings_back_every_record_exactly_and_recall_works(world, stack, unique):
    user = unique("restore")
    colour = f"my favourite colour is turquoise {unique('m')}"
    converse(world, user, [colour, f"tell me about comets {unique('m')}", f"and about tides {unique('m')}"])
    # Recall in this pool, so its workers cache the collection id that the
    # archive is about to delete.
    warm = f"anything about comets? {unique('m')}"
    world.chat(user, warm)
    before = world.wait_indexed(user, 8)[user]

    assert_clean_run(world.cleanup(now_ms=world.far_future()), archived=1, records=8)
    world.assert_gone_from_live_storage(user)
    assert len(archive_files(world.archive_root, user)) == 1

    restore = world.cleanup("restore", user)
    assert restore.returncode == 0, restore.stderr[-3000:]
    [done] = restore.events("restore_done")
    assert done["records"] == 8
    after = world.records(user)
    assert exact(after) == exact(before)
    assert not archive_dir_of(world.archive_root, user).exists(), "the archive must go after a restore"
    assert activity(world.redis, user) is not None, "a restored user is tracked again"

    question = f"what is my favourite colour? {unique('m')}"
    world.chat(user, question)
    assert colour in recalled_texts(recorded_prompt(stack.fake, question))


def test_forget_erases_everything_of_the_user(world, stack, unique):
    user = unique("forget")
    old = [f"forgettable one {unique('m')}", f"forgettable two {unique('m')}"]
    converse(world, user, old)
    world.wait_indexed(user, 4)
    assert_clean_run(world.cleanup(now_ms=world.far_future()), archived=1)
    assert archive_files(world.archive_root, user)
    # Back again: live memory next to the archive.
    back = f"forgettable three {unique('m')}"
    world.chat(user, back)
    bystander = unique("bystander")
    world.chat(bystander, f"hello {unique('m')}")
    # A turn still on its way to Chroma is the next test's subject.
    world.wait_indexed([user, bystander], 2)

    run = world.cleanup("forget", user)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.events("forget_done")
    world.assert_gone_from_live_storage(user, erased=True)
    assert user not in stream_users(world.redis, rkeys.all_dead_letters())
    assert not archive_dir_of(world.archive_root, user).exists()
    assert recent_list(world.redis, bystander), "forget touched another user"

    question = f"forgettable? what did I say {unique('m')}"
    reply = world.chat(user, question)
    prompt = recorded_prompt(stack.fake, question)
    assert recalled_texts(prompt) == []
    assert [m for m in prompt if m["role"] != "system"] == [{"role": "user", "content": question}]
    # Once the new turn is indexed, the collection holds it alone: nothing old
    # came back from a queued or in-flight turn.
    records = world.wait_indexed(user, 2)[user]
    assert sorted(r["document"] for r in records) == sorted([question, reply])
    assert not [t for t in old + [back] if any(t in r["document"] for r in records)]


def test_forget_also_erases_a_turn_being_indexed_at_that_moment(make_world, module_chroma, unique):
    with HoldingProxy(module_chroma.url) as proxy:
        # One worker, so one indexer thread: it finishes the held batch before
        # it takes the next turn, which tells the test when it is done.
        world = make_world(pool_chroma_url=proxy.url, workers=1)
        user = unique("forgetrace")
        converse(world, user, [f"forgettable one {unique('m')}"])
        world.wait_indexed(user, 2)
        # The indexer has checked that no cleanup holds the user and is writing
        # the turn to Chroma when the forget starts.
        proxy.arm(lambda method, path: method == "POST" and path.endswith("/upsert"))
        back = f"forgettable two {unique('m')}"
        world.chat(user, back)
        assert proxy.reached.wait(INDEX_TIMEOUT_S), "the indexer never wrote the turn"

        # The forget takes the lock and then waits for the indexer's write to
        # end: records in a shared shard collection are fenced by that wait.
        proc = world.start_cleanup("forget", user)
        assert poll_until(lambda: world.redis.command("EXISTS", rkeys.user_key(user, "lock")) == 1, INDEX_TIMEOUT_S)
        assert world.redis.command("EXISTS", rkeys.user_key(user, "indexing")) == 1  # so the forget waits
        assert proc.poll() is None, "the forget did not wait for the write in flight"
        proxy.released.set()
        run = finish(proc)
        assert run.returncode == 0, run.stderr[-3000:]
        world.assert_gone_from_live_storage(user, erased=True)
        bystander = unique("bystander")
        world.chat(bystander, f"hello {unique('m')}")
        world.wait_indexed(bystander, 2)

        left = world.records(user)
        assert not left, f"forgotten, yet Chroma holds {len(left)} records of the user again: " \
                         f"{sorted(r['document'] for r in left)}"
        world.assert_gone_from_live_storage(user, erased=True)


# --------------------------------------------------------------------------
# Killed in the middle


@pytest.mark.parametrize("crash_at", (None,) + CRASH_POINTS)
def test_a_run_killed_at_any_step_and_run_again_ends_as_if_never_killed(world, unique, crash_at):
    users = [unique("crash"), unique("crash")]
    for user in users:
        converse(world, user, [f"turn {i} of {user}" for i in range(2)])
    before = world.wait_indexed(users, 4)
    last_seen = {u: activity(world.redis, u) for u in users}
    now_ms = world.far_future()

    if crash_at is not None:
        crashed = world.cleanup(now_ms=now_ms, crash_at=crash_at)
        assert crashed.returncode == CRASH_STATUS, crashed.stderr[-3000:]
        assert [u for u in users if world.redis.command("EXISTS", rkeys.user_key(u, "lock"))], \
            "the crash must leave the first user half done"
    assert_clean_run(world.cleanup(now_ms=now_ms), scanned=2, archived=2, failed=0)

    for user in users:
        check_archive_file(world, user, last_seen[user], before[user])
        world.assert_gone_from_live_storage(user)
    for user in users:
        restore = world.cleanup("restore", user)
        assert restore.returncode == 0, restore.stderr[-3000:]
        assert restore.events("restore_done")[0]["records"] == 4
        assert exact(world.records(user)) == exact(before[user])


def test_the_installed_binary_has_no_crash_hook(world, unique, build_dir):
    # Issue 12: the test hook was in the production binary. The release build
    # ignores it (and says so); only chatd-cleanup-testhooks obeys it.
    user = unique("hook")
    converse(world, user, ["one turn"])
    world.wait_indexed([user], 2)
    world.binary = build_dir / "bin" / "chatd-cleanup"
    run = world.cleanup(now_ms=world.far_future(), crash_at=CRASH_POINTS[0])
    assert_clean_run(run, scanned=1, archived=1, failed=0)
    assert run.events("test_hook_ignored"), run.stderr[-3000:]
    world.assert_gone_from_live_storage(user)


# --------------------------------------------------------------------------
# A user writing while the cleanup works on them


def all_texts(world: World, user: str) -> "tuple[list[str], list[str]]":
    live = [e["content"] for e in recent_list(world.redis, user)] + [r["document"] for r in world.records(user)]
    return live, [r["document"] for r in archived_records(world.archive_root, user)]


def assert_nothing_lost(world: World, user: str, turns) -> None:
    live, archived = all_texts(world, user)
    kept = set(live) | set(archived)
    lost = [(m, r) for m, r in turns if m not in kept or r not in kept]
    assert lost == [], f"{len(lost)} of {len(turns)} answered turns are neither live nor archived: {lost[:3]}"


def wait_stream_drained(world: World, user: str) -> None:
    drained = poll_until(lambda: user not in stream_users(world.redis), INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    assert drained, f"turns of {user} stayed in the index stream"


def test_a_user_writing_while_cleanups_run_loses_nothing(world, unique):
    user = unique("busy")
    turns = converse(world, user, [f"first words {unique('m')}"])
    world.wait_indexed(user, 2)
    now_ms = world.far_future()  # every run treats the user as inactive
    runs = []
    stop = threading.Event()

    def cleanups():
        while not stop.is_set() and len(runs) < 40:
            runs.append(world.cleanup(now_ms=now_ms))

    looper = threading.Thread(target=cleanups)
    looper.start()
    try:
        messages = [f"burst message {i} {unique('m')}" for i in range(16)]
        turns += concurrently(lambda m: (m, world.chat(user, m)), messages, max_workers=2)
    finally:
        stop.set()
        looper.join()
    assert len(runs) >= 1
    for run in runs:
        assert_clean_run(run, failed=0)
    assert sum(r.summary["archived"] + r.summary["returned"] for r in runs) >= 1, "no run met the user"
    wait_stream_drained(world, user)
    assert_nothing_lost(world, user, turns)

    # Restoring merges archive and live memory: every answered turn exactly once.
    restore = world.cleanup("restore", user)
    assert restore.returncode == 0, restore.stderr[-3000:]
    records = world.records(user)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    counts = Counter(r["document"] for r in records if r["metadata"]["role"] == "user")
    assert [m for m, _ in turns if counts[m] != 1] == []


def test_a_user_coming_back_between_export_and_finish_keeps_live_memory(world, unique):
    user = unique("comeback")
    turns = converse(world, user, [f"early words {unique('m')}", f"more early words {unique('m')}"])
    before = world.wait_indexed(user, 4)[user]
    old_seen = activity(world.redis, user)
    # A cut-off the comeback moves the user above, as real time would.
    now_ms = old_seen + 1 + INACTIVE_S * 1000

    # The run is held at the deletion of the collection: the archive is written.
    # Deletes are by id, on the user's shard.
    with HoldingProxy(world.chroma.url, lambda method, path: method == "POST" and path.endswith("/delete")) as proxy:
        proc = world.start_cleanup(now_ms=now_ms, chroma_url=proxy.url)
        try:
            assert proxy.reached.wait(CLEANUP_TIMEOUT_S), "the cleanup never deleted the collection"
            assert len(archive_files(world.archive_root, user)) == 1
            back = f"I am back {unique('m')}"
            turns.append((back, world.chat(user, back)))
        finally:
            proxy.released.set()
            run = finish(proc)
    assert_clean_run(run, scanned=1, archived=0, returned=1, failed=0)

    check_archive_file(world, user, old_seen, before)
    assert activity(world.redis, user) > old_seen, "the user's new activity must stay"
    assert [e["content"] for e in recent_list(world.redis, user)][-2:] == list(turns[-1])
    assert world.redis.command("EXISTS", rkeys.user_key(user, "lock")) == 0
    # The turn made during the run reaches Chroma once the run let go of the user.
    world.wait_indexed(user, 2)
    assert_nothing_lost(world, user, turns)


def test_archiving_leaves_no_collection_behind_when_a_turn_was_being_indexed(make_world, module_chroma, unique):
    with HoldingProxy(module_chroma.url) as proxy:
        world = make_world(pool_chroma_url=proxy.url, workers=1)  # one indexer: see the forget case
        user = unique("archrace")
        turns = converse(world, user, [f"early words {unique('m')}"])
        world.wait_indexed(user, 2)
        # The indexer has checked that no cleanup holds the user and is writing
        # the last turn to Chroma when the cleanup starts.
        proxy.arm(lambda method, path: method == "POST" and path.endswith("/upsert"))
        last = f"last words {unique('m')}"
        turns.append((last, world.chat(user, last)))
        assert proxy.reached.wait(INDEX_TIMEOUT_S), "the indexer never wrote the turn"
        last_seen = activity(world.redis, user)

        # The run takes the lock and waits for the indexer's write to end (see
        # the forget case).
        proc = world.start_cleanup(now_ms=world.far_future())
        assert poll_until(lambda: world.redis.command("EXISTS", rkeys.user_key(user, "lock")) == 1, INDEX_TIMEOUT_S)
        assert world.redis.command("EXISTS", rkeys.user_key(user, "indexing")) == 1
        assert proc.poll() is None, "the run did not wait for the write in flight"
        proxy.released.set()
        assert_clean_run(finish(proc), scanned=1, archived=1, failed=0, records=4)
        bystander = unique("bystander")
        world.chat(bystander, f"hello {unique('m')}")
        world.wait_indexed(bystander, 2)

        assert_nothing_lost(world, user, turns)
        assert len(archived_records(world.archive_root, user)) == 4
        assert [p.name for p in archive_files(world.archive_root, user)] == [f"{last_seen}.json"]
        left = world.records(user)
        assert not left, f"archived, yet Chroma holds {len(left)} records of the user again (a collection " \
                         f"nobody tracks any more): {sorted(r['document'] for r in left)}"
        world.assert_gone_from_live_storage(user)


def test_a_turn_an_indexer_read_before_the_user_was_archived_is_not_written_back(make_world, unique):
    # The indexer reads a turn and lingers for more (up to LINGER_MS) before it
    # checks the user's lock. Frozen in that gap, it wakes only after a cleanup
    # archived the user and let go of the lock: the lock check alone would let
    # it write the turn back into Chroma, for a user who is gone.
    world = make_world(workers=1, pool_env={"CHATD_INDEX_LINGER_MS": LINGER_MS})
    [worker] = world.frontend.pool.worker_pids()
    user = unique("lingered")
    stream = rkeys.user_shard_key(user, "index")
    turns = []
    for attempt in range(FREEZE_ATTEMPTS):
        said = f"words {attempt} {unique('m')}"
        turns.append((said, world.chat(user, said)))
        assert poll_until(lambda: world.redis.command("XPENDING", stream, INDEX_GROUP)[0] > 0, INDEX_TIMEOUT_S, 0.01)
        os.kill(worker, signal.SIGSTOP)
        # Frozen after the read (the turn is still pending) and before the lock
        # check (which raises the marker), unless it was quicker than us.
        if world.redis.command("XPENDING", stream, INDEX_GROUP)[0] > 0 and \
                world.redis.command("EXISTS", rkeys.user_key(user, "indexing")) == 0:
            break
        os.kill(worker, signal.SIGCONT)
        world.wait_indexed(user, 2 * len(turns))
    else:
        pytest.fail(f"the indexer never was frozen before its lock check in {FREEZE_ATTEMPTS} tries")
    try:
        assert_clean_run(world.cleanup(now_ms=world.far_future()), scanned=1, archived=1, failed=0,
                         records=2 * len(turns))
    finally:
        os.kill(worker, signal.SIGCONT)
    assert poll_until(lambda: scrape_metrics(world.url)["chatd_index_skipped_settled_total"] > 0,
                      INDEX_TIMEOUT_S), "the indexer never reported the turn settled by the cleanup"
    # The indexer's pass is over: it wrote nothing and left no marker.
    assert world.records(user) == [], "archived, yet Chroma holds records of the user again"
    world.assert_gone_from_live_storage(user)
    assert_nothing_lost(world, user, turns)


def test_a_user_coming_back_after_a_killed_run_keeps_a_working_memory(world, unique):
    user = unique("crashback")
    turns = converse(world, user, [f"early words {unique('m')}", f"more early words {unique('m')}"])
    world.wait_indexed(user, 4)
    cutoff = activity(world.redis, user) + 1
    now_ms = cutoff + INACTIVE_S * 1000

    crashed = world.cleanup(now_ms=now_ms, crash_at="after_export")
    assert crashed.returncode == CRASH_STATUS, crashed.stderr[-3000:]
    back = f"I am back {unique('m')}"
    turns.append((back, world.chat(user, back)))
    assert activity(world.redis, user) >= cutoff
    # The rerun no longer sees an inactive user; it must still leave them whole.
    assert_clean_run(world.cleanup(now_ms=now_ms), scanned=0, failed=0)
    assert_nothing_lost(world, user, turns)
    assert [e["content"] for e in recent_list(world.redis, user)][-2:] == list(turns[-1])

    def back_indexed():
        return any(r["document"] == back for r in world.records(user))

    assert poll_until(back_indexed, INDEX_TIMEOUT_S, POLL_INTERVAL_S), (
        f"the turn after the killed run was not indexed within {INDEX_TIMEOUT_S} s; "
        f"lock key left: {world.redis.command('EXISTS', rkeys.user_key(user, 'lock')) == 1}, "
        f"lock TTL ms: {world.redis.command('PTTL', rkeys.user_key(user, 'lock'))}")


# --------------------------------------------------------------------------
# Cost


def tracked_users(redis) -> int:
    return sum(redis.command("ZCARD", rkeys.activity(s)) for s in range(rkeys.REDIS_SHARDS))


def command_calls(redis) -> "dict[str, int]":
    text = redis.command("INFO", "commandstats").decode()
    calls = {}
    for line in text.splitlines():
        match = re.match(r"^cmdstat_([^:]+):calls=(\d+),", line)
        if match:
            calls[match.group(1)] = int(match.group(2))
    return calls


def test_cost_grows_with_inactive_users_not_with_tracked_users(world, unique):
    tracked, inactive = 10_000, 100
    real = [unique("real") for _ in range(3)]
    for user in real:
        converse(world, user, [f"real data of {user}"])
    world.wait_indexed(real, 2)
    now = redis_now_ms(world.redis)
    cutoff = now + 1
    assert all(activity(world.redis, u) < cutoff for u in real)
    # Only the activity index knows the others: enough for the cleanup to consider them.
    fake_inactive = [f"idle{i}" for i in range(inactive - len(real))]
    fake_active = [f"busy{i}" for i in range(tracked - inactive)]
    by_shard: "dict[str, list]" = {}
    for i, user in enumerate(fake_inactive):
        by_shard.setdefault(rkeys.activity_of(user), []).extend([now - DAY_MS - i, user])
    for i, user in enumerate(fake_active):
        by_shard.setdefault(rkeys.activity_of(user), []).extend([cutoff + 1000 + i, user])
    for key, args in by_shard.items():
        world.redis.command("ZADD", key, *args)
    assert tracked_users(world.redis) == tracked

    world.redis.command("CONFIG", "RESETSTAT")
    run = world.cleanup(now_ms=cutoff + INACTIVE_S * 1000)
    calls = command_calls(world.redis)
    assert_clean_run(run, scanned=inactive, archived=inactive, failed=0, records=2 * len(real))

    assert tracked_users(world.redis) == tracked - inactive
    for user in real:
        assert len(archive_files(world.archive_root, user)) == 1
        world.assert_gone_from_live_storage(user)
    # Per inactive user: one lock (SET), plus the run's lease. The pool's own
    # background calls (the indexer's blocking reads) are excluded.
    assert calls.get("set", 0) == inactive + 1, calls
    # Three scripts per user (take the lock, check it before the delete,
    # finish), one more check before each archive written, the lease taken
    # and released, and one-off loads.
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    assert 3 * inactive + len(real) + 2 <= scripts <= 3 * inactive + len(real) + 8, calls
    background = {"xreadgroup", "xautoclaim", "xgroup", "xpending", "xlen", "ping", "info", "config|resetstat",
                  "config"}
    cleanup_calls = sum(n for name, n in calls.items() if name not in background)
    # A constant per inactive user (the fencing checks included, and the read
    # of the lease before each lock), nothing per tracked user: 10,000 of them
    # would show.
    assert cleanup_calls <= 17 * inactive, sorted(calls.items())


# --------------------------------------------------------------------------
# Migration from one Chroma collection per user (the layout before shards)

MIGRATE_CRASH_POINTS = ("migrate_after_lock", "migrate_after_upsert", "migrate_after_delete")
EMBEDDING_DIMENSIONS = 256  # CHATD_EMBEDDING_DIMENSIONS default


def write_legacy_user(chroma_url: str, user: str, turns) -> "list[dict]":
    """Writes the user's turns exactly as chatd did before shards: a collection
    "chatd-u-<hex>" of their own (l2, sync_threshold 100, metadata chatd_user),
    records "<turn>:u|a" with metadata {role, ts, user, turn} and the local
    embedding, which the fake model computes too. Returns the records."""
    base = f"{chroma_url}{CHROMA_PREFIX}/collections"
    status, coll = http_json(base, "POST", {"name": legacy_collection_name(user), "get_or_create": True,
                                            "configuration": {"hnsw": {"space": "l2", "sync_threshold": 100}},
                                            "metadata": {"chatd_user": user}}, timeout=CHROMA_HTTP_TIMEOUT_S)
    assert status == 200, coll
    texts = [t for pair in turns for t in pair]
    # The fake model's embedding is chatd's local one (tests/fake_model/README.md).
    vectors = [local_embed(t, EMBEDDING_DIMENSIONS) for t in texts]
    records = []
    for i, (question, answer) in enumerate(turns):
        turn = f"{i:02d}" + "a" * 30
        ts = 1700000000000 + i * 1000
        for role, suffix, text in (("user", "u", question), ("assistant", "a", answer)):
            records.append({"id": f"{turn}:{suffix}", "document": text, "embedding": vectors[len(records)],
                            "metadata": {"role": role, "ts": ts, "user": user, "turn": turn}})
    status, body = http_json(f"{base}/{coll['id']}/upsert", "POST",
                             {"ids": [r["id"] for r in records], "embeddings": [r["embedding"] for r in records],
                              "documents": [r["document"] for r in records],
                              "metadatas": [r["metadata"] for r in records]}, timeout=CHROMA_HTTP_TIMEOUT_S)
    assert status in (200, 201), body
    return records


@pytest.mark.parametrize("crash_at", (None,) + MIGRATE_CRASH_POINTS)
def test_migrate_moves_per_user_collections_to_shards_without_losing_a_message(world, stack, unique, crash_at):
    users = [unique("legacy") for _ in range(3)]
    tags = {u: unique("tag").replace("-", "") for u in users}
    written = {u: write_legacy_user(world.chroma.url, u,
                                    [(f"{tags[u]} old question {i}", f"old answer {i}") for i in range(3)])
               for u in users}
    if crash_at is not None:
        crashed = world.cleanup("migrate", crash_at=crash_at)
        assert crashed.returncode == CRASH_STATUS, crashed.stderr[-3000:]
    run = world.cleanup("migrate")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.events("migrate_done")[-1]["failed"] == 0

    for user in users:
        assert exact(world.records(user)) == exact(written[user]), user  # bit-exact, nothing more
        assert legacy_records(world.chroma.url, user) == []
        assert world.redis.command("HLEN", rkeys.user_key(user, "hot")) == len(written[user])
        assert world.redis.command("EXISTS", rkeys.user_key(user, "lock")) == 0
    assert sum(world.redis.command("SCARD", k) for k in rkeys.all_in_progress()) == 0

    # Idempotent: nothing is left to move.
    again = world.cleanup("migrate")
    assert again.returncode == 0 and again.events("migrate_done")[-1]["users"] == 0
    # And the moved memory is recalled, from the hot set.
    question = f"{tags[users[0]]} which old question did I ask {unique('q')}"
    world.chat(users[0], question)
    prompt = json.dumps(stack.fake.requests(question)[0]["messages"])
    assert f"{tags[users[0]]} old question" in prompt.replace(question, "")


def test_migrate_dry_run_changes_nothing(world, stack, unique):
    user = unique("legacydry")
    written = write_legacy_user(world.chroma.url, user, [("dry question", "dry answer")])
    run = world.cleanup("migrate", "--dry-run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [e["records"] for e in run.events("migrate_would_move") if e["user"] == user] == [2]
    assert exact(legacy_records(world.chroma.url, user)) == exact(written)
    assert world.records(user) == []


def test_forget_archive_and_restore_each_touch_exactly_one_users_records(world, unique):
    # Users that share one shard collection, so a filter gone wrong would show.
    users = []
    while len(users) < 3:
        candidate = unique("sharemate")
        if not users or shard_of(candidate) == shard_of(users[0]):
            users.append(candidate)
    for user in users:
        converse(world, user, [f"first words of {user}", f"second words of {user}"])
    before = {u: exact(r) for u, r in world.wait_indexed(users, 4).items()}
    shard_total = len(shard_records(world.chroma.url, shard_of(users[0])))

    forgotten, archived, bystander = users
    assert world.cleanup("forget", forgotten).returncode == 0
    assert world.records(forgotten) == []
    assert {u: exact(world.records(u)) for u in users[1:]} == {u: before[u] for u in users[1:]}
    assert len(shard_records(world.chroma.url, shard_of(users[0]))) == shard_total - 4

    # Archive everyone still there, then bring back exactly one of them.
    assert_clean_run(world.cleanup(now_ms=world.far_future()), archived=2, failed=0)
    assert world.records(archived) == [] and world.records(bystander) == []
    restored = world.cleanup("restore", archived)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert exact(world.records(archived)) == before[archived]
    assert world.records(bystander) == [] and world.records(forgotten) == []


# --------------------------------------------------------------------------
# Fencing (issue 13): one run at a time, a lock that is owned, forget after a run

ALREADY_RUNNING_STATUS = 3


def lock_value(redis, user: str) -> Optional[bytes]:
    return redis.command("GET", rkeys.user_key(user, "lock"))


def test_a_second_run_is_refused_while_one_runs(world, unique):
    user = unique("lease")
    converse(world, user, [f"words of {user}"])
    before = world.wait_indexed(user, 2)[user]
    seen = activity(world.redis, user)
    now_ms = world.far_future()
    # The first run is held at its delete, the user's archive written.
    with HoldingProxy(world.chroma.url, lambda method, path: method == "POST" and path.endswith("/delete")) as proxy:
        first = world.start_cleanup(now_ms=now_ms, chroma_url=proxy.url)
        try:
            assert proxy.reached.wait(CLEANUP_TIMEOUT_S), "the first run never deleted the user's records"
            second = world.cleanup(now_ms=now_ms)
            assert second.returncode == ALREADY_RUNNING_STATUS, second.stderr[-3000:]
            [refused] = second.events("cleanup_already_running")
            assert "running" in refused["detail"], refused
            assert not second.events("cleanup_summary"), "the refused run must not have looked at any user"
            # Nor did it touch the user the first run holds.
            assert lock_value(world.redis, user).startswith(b"cleanup:")
            assert exact(world.records(user)) == exact(before)
        finally:
            proxy.released.set()
            run = finish(first)
    assert_clean_run(run, scanned=1, archived=1, failed=0)
    check_archive_file(world, user, seen, before)
    world.assert_gone_from_live_storage(user)
    # The lease went with the first run: the next one runs.
    assert_clean_run(world.cleanup(now_ms=now_ms), scanned=0, failed=0)
    assert world.redis.command("EXISTS", "chatd:cleanup:lease") == 0


def test_a_run_whose_lock_expired_and_was_taken_deletes_nothing(world, unique, tmp_path):
    user = unique("fenced")
    turns = converse(world, user, [f"fenced one {unique('m')}", f"fenced two {unique('m')}"])
    before = world.wait_indexed(user, 4)[user]
    seen, keys = activity(world.redis, user), user_keys(world.redis, user)
    intruder = b"cleanup:another-owner"
    # The run is held while it exports the user (a Chroma /get): its lock is
    # taken, nothing written yet. It is then paused (SIGSTOP: no renewal)
    # until its short-lived lock expires, and another owner takes the lock.
    with HoldingProxy(world.chroma.url, lambda method, path: method == "POST" and path.endswith("/get")) as proxy:
        proc = world.start_cleanup(now_ms=world.far_future(), chroma_url=proxy.url,
                                   extra_env={"CHATD_CLEANUP_LOCK_TTL_MS": "1500"})
        try:
            assert proxy.reached.wait(CLEANUP_TIMEOUT_S), "the run never exported the user"
            assert lock_value(world.redis, user).startswith(b"cleanup:")
            proc.send_signal(signal.SIGSTOP)
            assert poll_until(lambda: lock_value(world.redis, user) is None, INDEX_TIMEOUT_S, POLL_INTERVAL_S), \
                "the paused run's lock never expired"
            assert world.redis.command("SET", rkeys.user_key(user, "lock"), intruder, "NX", "PX", 600000) == "OK"
        finally:
            proc.send_signal(signal.SIGCONT)
            proxy.released.set()
            run = finish(proc)
    assert run.returncode == 1, run.stderr[-3000:]
    reasons = {r.get("reason") for r in run.events("cleanup_user_failed") + run.events("cleanup_failed")}
    assert reasons & {"lock_lost", "lease_lost"}, run.stderr[-3000:]
    # Nothing was written or deleted on the lost lock, and the new owner's
    # lock was left alone.
    assert archive_files(world.archive_root, user) == []
    assert exact(world.records(user)) == exact(before)
    assert activity(world.redis, user) == seen
    assert [k for k in user_keys(world.redis, user) if not k.endswith(b":lock")] == keys
    assert [e["content"] for e in recent_list(world.redis, user)][-2:] == list(turns[-1])
    assert lock_value(world.redis, user) == intruder


def test_forget_during_a_run_of_the_same_user_leaves_no_archive(world, unique, tmp_path):
    user = unique("forgetrun")
    converse(world, user, [f"erase me {unique('m')}", f"erase me too {unique('m')}"])
    world.wait_indexed(user, 4)
    log_path = tmp_path / "forget.log"
    # The run has written the user's archive and is held at its delete.
    with HoldingProxy(world.chroma.url, lambda method, path: method == "POST" and path.endswith("/delete")) as proxy:
        run_proc = world.start_cleanup(now_ms=world.far_future(), chroma_url=proxy.url)
        try:
            assert proxy.reached.wait(CLEANUP_TIMEOUT_S), "the run never deleted the user's records"
            assert len(archive_files(world.archive_root, user)) == 1
            with open(log_path, "w") as log:
                forget = world.start_cleanup("forget", user, stderr_file=log)
            # The forget waits for the run's lock instead of listing the
            # archives now (it would miss none here, but would race the run).
            waiting = poll_until(lambda: any(r.get("event") == "cleanup_waiting_for_user"
                                             for r in json_log_records(log_path.read_text())),
                                 INDEX_TIMEOUT_S, POLL_INTERVAL_S)
            assert waiting, log_path.read_text()[-3000:]
            assert forget.poll() is None
            assert lock_value(world.redis, user).startswith(b"cleanup:")
        finally:
            proxy.released.set()
            run = finish(run_proc)
    assert_clean_run(run, scanned=1, archived=1, failed=0)
    forgotten = finish(forget, log_path)
    assert forgotten.returncode == 0, forgotten.stderr[-3000:]
    assert forgotten.events("forget_done")
    # What the run archived meanwhile went too: a restore finds nothing.
    assert not archive_dir_of(world.archive_root, user).exists()
    world.assert_gone_from_live_storage(user, erased=True)
    restore = world.cleanup("restore", user)
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert restore.events("restore_done")[0]["records"] == 0
    assert world.records(user) == []


# --------------------------------------------------------------------------
# Migration of the Redis keys to the sharded layout (chatd-cleanup migrate-keys)


def write_old_layout_user(redis, user: str, ts: int) -> dict:
    """Writes a user as the version before the shards did: per-user keys
    chat:{<user>}:..., a queued turn in the global stream chatd:index (with the
    group the old indexers read it with), a dead letter, the activity index."""
    turn, dead_turn = f"{user}-t1".replace("-", "")[:32], "d" * 32
    old = rkeys.old_user_key
    if redis.command("EXISTS", rkeys.OLD_INDEX_STREAM) == 0:
        redis.command("XGROUP", "CREATE", rkeys.OLD_INDEX_STREAM, INDEX_GROUP, "0", "MKSTREAM")
    recent = [json.dumps({"role": "user", "content": f"old question of {user}", "ts": ts, "id": f"{turn}:u"}),
              json.dumps({"role": "assistant", "content": f"old answer to {user}", "ts": ts, "id": f"{turn}:a"})]
    redis.command("RPUSH", old(user, "recent"), *recent)
    entry = redis.command("XADD", rkeys.OLD_INDEX_STREAM, "*", "user", user, "turn", turn, "ts", str(ts),
                          "u", f"old question of {user}", "a", f"old answer to {user}", "emb", b"").decode()
    redis.command("HSET", old(user, "queued"), turn, entry)
    redis.command("ZADD", old(user, "turns"), 0, f"{ts:015d}:{turn}")
    redis.command("ZADD", old(user, "recorded"), ts, turn)
    redis.command("PEXPIRE", old(user, "recorded"), 600000)
    idem = old(user, "idem:" + "ab" * 32)
    redis.command("HSET", idem, "fp", "fingerprint", "turn", turn, "resp", f"old answer to {user}")
    redis.command("PEXPIRE", idem, 600000)
    redis.command("ZADD", old(user, "idemkeys"), ts + 600000, idem)
    redis.command("HSET", old(user, "rl:fixed"), "w", "1", "n", "1")
    redis.command("ZADD", rkeys.OLD_ACTIVITY, ts, user)
    redis.command("XADD", rkeys.OLD_DEAD_LETTERS, "*", "user", user, "turn", dead_turn, "ts", str(ts),
                  "u", "a dead question", "a", "a dead answer", "reason", "test", "deliveries", "1")
    return {"turn": turn, "entry": entry, "recent": [r.encode() for r in recent], "idem": idem}


def old_layout_keys(redis) -> "list[bytes]":
    found, cursor = [], b"0"
    while True:
        cursor, batch = redis.command("SCAN", cursor, "MATCH", "chat:{*", "COUNT", 1000)
        found.extend(batch)
        if cursor == b"0":
            break
    return found + [k.encode() for k in (rkeys.OLD_INDEX_STREAM, rkeys.OLD_DEAD_LETTERS, rkeys.OLD_ACTIVITY)
                    if redis.command("EXISTS", k) == 1]


def test_migrate_keys_leaves_in_the_old_layout_what_names_no_valid_user(world):
    # The old layout is read back, so every id in it is parsed first: what
    # names no valid user was not written by chatd, and no key is named for it.
    r, bad = world.redis, "not a user"
    r.command("ZADD", rkeys.OLD_ACTIVITY, 1, bad)
    r.command("SADD", rkeys.OLD_IN_PROGRESS, "x}y")
    r.command("XADD", rkeys.OLD_INDEX_STREAM, "*", "user", bad, "turn", "t" * 32, "ts", "1", "u", "q", "a", "a")
    r.command("RPUSH", f"chat:{{{bad}}}:recent", "x")

    run = world.cleanup("migrate-keys")
    assert run.returncode == 0, run.stderr[-3000:]
    [done] = run.events("migrate_keys_done")
    moved = (done["user_keys"], done["stream_entries"], done["dead_letters"], done["activity"], done["in_progress"])
    assert moved == (0, 0, 0, 0, 0), done
    assert r.command("ZSCORE", rkeys.OLD_ACTIVITY, bad) is not None
    assert r.command("SISMEMBER", rkeys.OLD_IN_PROGRESS, "x}y") == 1
    assert r.command("XLEN", rkeys.OLD_INDEX_STREAM) == 1
    assert r.command("EXISTS", f"chat:{{{bad}}}:recent") == 1


def test_migrate_keys_moves_the_old_layout_to_the_shards_and_a_rerun_moves_nothing(make_world, module_chroma,
                                                                                     unique):
    with HoldingProxy(module_chroma.url) as proxy:
        # Nothing is indexed until the moved keys are checked: the queued
        # turns stay in the streams meanwhile.
        proxy.fail_upserts = True
        world = make_world(pool_chroma_url=proxy.url)
        check_migrate_keys(world, proxy, unique)


def check_migrate_keys(world: World, proxy, unique) -> None:
    user, merged = unique("oldkeys"), unique("merged")
    r = world.redis
    ts = redis_now_ms(r) - 1000
    old = write_old_layout_user(r, user, ts)
    # A user who chatted on the new version before the move: the old recent
    # messages go before the new ones.
    write_old_layout_user(r, merged, ts)
    world.chat(merged, "new message after the upgrade")
    assert len(r.command("LRANGE", rkeys.user_key(merged, "recent"), 0, -1)) == 2

    run = world.cleanup("migrate-keys")
    assert run.returncode == 0, run.stderr[-3000:]
    [done] = run.events("migrate_keys_done")
    assert (done["user_keys"], done["stream_entries"], done["dead_letters"], done["activity"]) == (14, 2, 2, 2), done
    assert old_layout_keys(r) == []

    assert r.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1) == old["recent"]
    merged_recent = [json.loads(m)["content"] for m in r.command("LRANGE", rkeys.user_key(merged, "recent"), 0, -1)]
    assert merged_recent[:2] == [f"old question of {merged}", f"old answer to {merged}"]
    assert merged_recent[2] == "new message after the upgrade"
    # The queued turn is in its shard's stream, named by the queued hash: under
    # its old id, unless the shard's stream had newer entries already.
    queued = r.command("HGET", rkeys.user_key(user, "queued"), old["turn"]).decode()
    moved = r.command("XRANGE", rkeys.index_stream_of(user), queued, queued)
    assert len(moved) == 1 and dict(zip(moved[0][1][0::2], moved[0][1][1::2]))[b"turn"] == old["turn"].encode()
    if rkeys.shard_of(user) != rkeys.shard_of(merged):
        assert queued == old["entry"]
    assert r.command("ZSCORE", rkeys.activity_of(user), user) == str(ts).encode()
    assert r.command("PTTL", rkeys.user_key(user, "recorded")) > 0
    # The list of Idempotency-Key hashes names the moved hash.
    new_idem = rkeys.user_key(user, "idem:" + "ab" * 32)
    assert r.command("ZRANGE", rkeys.user_key(user, "idemkeys"), 0, -1) == [new_idem.encode()]
    assert r.command("HGET", new_idem, "turn") == old["turn"].encode()
    dead = [dict(zip(f[0::2], f[1::2])) for _, f in r.command("XRANGE", rkeys.dead_letters_of(user), "-", "+")]
    assert user.encode() in [d[b"user"] for d in dead]

    # The indexers find the moved turns (their group was rewound), and the
    # queued hash empties as they are acknowledged.
    proxy.fail_upserts = False
    world.wait_indexed([user], 2)
    world.wait_indexed([merged], 4)  # the old turn and the new one
    assert poll_until(lambda: r.command("HLEN", rkeys.user_key(user, "queued")) == 0, INDEX_TIMEOUT_S)
    # chatd-cleanup finds the moved user's dead letter and activity: forget erases both.
    erased = world.cleanup("forget", user)
    assert erased.returncode == 0, erased.stderr[-3000:]
    left = [dict(zip(f[0::2], f[1::2]))[b"user"] for _, f in r.command("XRANGE", rkeys.dead_letters_of(user), "-", "+")]
    assert user.encode() not in left
    assert r.command("ZSCORE", rkeys.activity_of(user), user) is None

    again = world.cleanup("migrate-keys")
    assert again.returncode == 0, again.stderr[-3000:]
    [nothing] = again.events("migrate_keys_done")
    assert (nothing["user_keys"], nothing["stream_entries"], nothing["dead_letters"], nothing["activity"]) == \
        (0, 0, 0, 0), nothing
