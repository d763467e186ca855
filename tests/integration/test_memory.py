"""Per-user memory through the real stack (issue 4): the recent turns word for
word in the prompt, older turns recalled from Chroma, isolation between users
(also users whose ids differ only in case or punctuation), concurrent turns of
one user, and the durability of the index stream when Chroma, a worker, the
model or Redis fails.

Every test uses its own users and message markers (fixture `unique`). The tests
that stop Chroma or Redis run their own (harness classes) behind their own
pool: pools that share a Redis share the index stream, so a pool on its own
Chroma must also have its own Redis, or the session pool's indexers would move
its turns into the session's Chroma.
"""

import datetime
import json
import os
import re
import signal
from collections import Counter

import pytest

from harness.chroma_layout import user_records
from harness import keys as rkeys
from harness.stack import (
    Chroma, Redis, concurrently, free_port, http_json, poll_until, post_chat, scrape_metrics)

RECENT_MESSAGES = 4  # CHATD_RECENT_MESSAGES default: two whole turns
CHROMA_PREFIX = "/api/v2/tenants/default_tenant/databases/default_database"
INDEX_GROUP = "indexers"
EXCERPT_PREAMBLE = "Quoted earlier conversation with this user"
EXCERPT_END = "End of quoted earlier conversation."
MEMORY_LINE_RE = re.compile(r"^\[(\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC)\] (user|assistant): (.*)$")


def quoted_lines(content: str) -> "list[str]":
    """The excerpt lines of the quoted-memory user message, without its preamble
    and end line (neither ever appears in the middle: continuations are indented)."""
    lines = content.split("\n")
    assert lines[-1] == EXCERPT_END, lines[-1]
    return lines[1:-1]
# Bounds of the polls; far above what indexing takes on an idle machine. The
# claim case adds CHATD_INDEX_CLAIM_IDLE_MS (2 s in tests) before a new worker
# may take the dead one's entries.
INDEX_TIMEOUT_S = 45
LOG_TIMEOUT_S = 10
RESPAWN_TIMEOUT_S = 15
RECOVERY_TIMEOUT_S = 20
POLL_INTERVAL_S = 0.2
CHROMA_HTTP_TIMEOUT_S = 30
# A pool that sends more than the default 30 requests a minute for one user.
HIGH_RATE_LIMIT = "1000"
# Tests that check what recall brings back use a pool this patient with Chroma,
# so that a slow query on a loaded machine is not mistaken for an outage.
PATIENT_CHROMA_TIMEOUT_MS = "10000"


# --------------------------------------------------------------------------
# What Redis, Chroma and the fake model hold


def chroma_records(chroma_url: str, user: str) -> "list[dict]":
    """Every record of the user in Chroma, as {id, document, metadata, embedding}."""
    return user_records(chroma_url, user)


def recent_list(redis, user: str) -> "list[dict]":
    return [json.loads(raw) for raw in redis.command("LRANGE", rkeys.user_key(user, "recent"), 0, -1)]


def stream_entries(redis) -> "list[tuple[str, dict]]":
    """(id, {field: bytes}) of every entry still in the shards' streams."""
    entries = []
    for entry_id, fields in rkeys.stream_entries(redis):
        entries.append((entry_id.decode(), {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}))
    return entries


def queued_turns(redis, user: str) -> "list[dict]":
    return [f for _, f in stream_entries(redis) if f.get("user") == user.encode()]


def wait_indexed(redis, chroma_url: str, users, expected: int) -> "dict[str, list[dict]]":
    """Polls until each user's collection holds at least `expected` records and
    no turn of theirs waits in the stream; returns the records by user."""
    users = [users] if isinstance(users, str) else list(users)
    latest = {}

    def done():
        for user in users:
            latest[user] = chroma_records(chroma_url, user)
        queued = {f.get("user", b"").decode() for _, f in stream_entries(redis)}
        return all(len(latest[u]) >= expected and u not in queued for u in users)

    indexed = poll_until(done, INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    counts = {u: len(r) for u, r in latest.items()}
    assert indexed, f"not indexed within {INDEX_TIMEOUT_S} s: {counts} records (expected {expected} each), " \
                    f"{len(stream_entries(redis))} entries in the stream"
    return dict(latest)


def recorded_prompt(fake, marker: str) -> "list[dict]":
    """The messages of the one model request whose last user message holds `marker`."""
    found = fake.requests(marker)
    assert len(found) == 1, f"{len(found)} model requests carry {marker!r}"
    return found[0]["messages"]


def excerpt_lines(messages) -> "list[tuple[str, str, str]]":
    """(time, role, text) of the recalled-memory lines of a prompt; [] when it has none."""
    excerpts = [m for m in messages if m["role"] == "user" and m["content"].startswith(EXCERPT_PREAMBLE)]
    assert len(excerpts) <= 1, excerpts
    if not excerpts:
        return []
    lines = []
    for line in quoted_lines(excerpts[0]["content"]):
        match = MEMORY_LINE_RE.match(line)
        assert match, f"malformed memory line {line!r}"
        lines.append(match.groups())
    return lines


def utc_minute(ts_ms: int) -> str:
    return datetime.datetime.fromtimestamp(ts_ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def chat_ok(url: str, user: str, message: str) -> str:
    status, _, body = post_chat(url, user, message)
    assert status == 200, f"{user}: expected 200, got {status}: {body!r}"
    assert f"last_user={message}" in body["response"], body
    return body["response"]


def check_turns_stored_once(records, turns):
    """`turns` is [(user message, reply)]: each is in `records` exactly once, as
    the two halves of one turn, and nothing else is."""
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids: {[i for i, n in Counter(ids).items() if n > 1]}"
    assert len(records) == 2 * len(turns), f"{len(records)} records for {len(turns)} turns"
    by_id = {r["id"]: r for r in records}
    user_docs = Counter(r["document"] for r in records if r["metadata"]["role"] == "user")
    for message, reply in turns:
        assert user_docs[message] == 1, f"{message!r} is stored {user_docs[message]} times"
        record = next(r for r in records if r["metadata"]["role"] == "user" and r["document"] == message)
        turn = record["metadata"]["turn"]
        assert record["id"] == f"{turn}:u"
        answer = by_id.get(f"{turn}:a")
        assert answer is not None, f"the reply to {message!r} is missing"
        assert answer["document"] == reply
        assert answer["metadata"]["role"] == "assistant" and answer["metadata"]["turn"] == turn
        assert answer["metadata"]["ts"] == record["metadata"]["ts"]
    # What Chroma holds: the ids say each record's turn and role, so the
    # metadata is only what chatd filters on (user) or cannot derive.
    assert all(r["stored_keys"] == ["text", "ts", "user"] for r in records), \
        sorted({tuple(r["stored_keys"]) for r in records})


def own_pool_env(redis, chroma=None, **extra):
    env = {"CHATD_REDIS_PORT": str(redis.port), "CHATD_RATE_LIMIT": HIGH_RATE_LIMIT}
    if chroma is not None:
        env["CHATD_CHROMA_URL"] = chroma.url
    env.update(extra)
    return env


@pytest.fixture
def patient_url(new_pool):
    """A pool on the session's Redis and Chroma that waits long for Chroma."""
    return new_pool({"CHATD_CHROMA_TIMEOUT_MS": PATIENT_CHROMA_TIMEOUT_MS}).url


@pytest.fixture
def own_chroma(tmp_path):
    """A Chroma on a fixed free port, not started: the test starts and stops it."""
    chroma = Chroma(tmp_path, port=free_port())
    try:
        yield chroma
    finally:
        chroma.stop()


# --------------------------------------------------------------------------
# Short-term and long-term memory in the prompt


def test_recent_turns_verbatim_then_older_ones_recalled_from_long_term_memory(stack, patient_url, unique):
    user = unique("mem")
    first = f"my favourite colour is turquoise {unique('m')}"
    second = f"I also enjoy long walks by the sea {unique('m')}"
    third = f"tell me a fun fact about volcanoes {unique('m')}"
    turns = []
    for message in (first, second):
        turns.append((message, chat_ok(patient_url, user, message)))
    turns.append((third, chat_ok(patient_url, user, third)))

    prompt = recorded_prompt(stack.fake, third)
    assert [m for m in prompt if m["role"] != "system"] == [
        {"role": "user", "content": first}, {"role": "assistant", "content": turns[0][1]},
        {"role": "user", "content": second}, {"role": "assistant", "content": turns[1][1]},
        {"role": "user", "content": third}]
    # Both earlier turns are in the recent list, so recall must not repeat them.
    assert excerpt_lines(prompt) == []

    # At least one more turn, then until the first message has left the recent list.
    for i in range(RECENT_MESSAGES):
        filler = f"filler number {i} about planets and orbits {unique('m')}"
        turns.append((filler, chat_ok(patient_url, user, filler)))
        if all(e["content"] != first for e in recent_list(stack.redis, user)):
            break
    recent = recent_list(stack.redis, user)
    assert len(recent) == RECENT_MESSAGES
    assert all(first not in e["content"] for e in recent)

    records = wait_indexed(stack.redis, stack.chroma_url, user, 2 * len(turns))[user]
    check_turns_stored_once(records, turns)
    first_record = next(r for r in records if r["document"] == first)

    question = f"what is my favourite colour? {unique('m')}"
    chat_ok(patient_url, user, question)
    prompt = recorded_prompt(stack.fake, question)
    assert prompt[0]["role"] == "system" and not prompt[0]["content"].startswith(EXCERPT_PREAMBLE)
    # Quoted at user level (issue 12): stored text never speaks as the system.
    assert all(first not in m["content"] for m in prompt if m["role"] == "system")
    assert prompt[1]["role"] == "user" and prompt[1]["content"].startswith(EXCERPT_PREAMBLE), prompt[1]
    assert prompt[-1] == {"role": "user", "content": question}
    lines = excerpt_lines(prompt)
    assert (utc_minute(first_record["metadata"]["ts"]), "user", first) in lines, lines
    # The recent messages follow, oldest first, and none of them is also recalled.
    conversation = prompt[2:-1]
    assert conversation == [{"role": e["role"], "content": e["content"]} for e in recent]
    assert all(first not in m["content"] for m in conversation)
    recalled_texts = {text for _, _, text in lines}
    assert recalled_texts.isdisjoint({m["content"] for m in conversation})


def test_twenty_users_at_once_never_see_each_others_secrets(stack, patient_url, unique):
    count = 20
    users = [unique(f"iso{i}") for i in range(count)]
    secrets = [f"secret{unique('s').replace('-', '')}" for _ in range(count)]
    sent = []  # (user index, message, reply)

    def say(i, message):
        return i, message, chat_ok(patient_url, users[i], message)

    phases = [
        lambda i: f"please keep my secret, it is {secrets[i]} {unique('m')}",
        lambda i: f"now something else: how do bees make honey {unique('m')}",
        lambda i: f"and how far away is the moon {unique('m')}",
    ]
    for phase in phases:
        sent += concurrently(say, [(i, phase(i)) for i in range(count)], max_workers=count)
    # The secret has left the recent list: only recall can bring it back now.
    for i in range(count):
        assert all(secrets[i] not in e["content"] for e in recent_list(stack.redis, users[i]))
    records = wait_indexed(stack.redis, stack.chroma_url, users, 2 * len(phases))
    questions = concurrently(say, [(i, f"what secrets do you know {unique('m')}") for i in range(count)],
                             max_workers=count)
    sent += questions

    for i, message, reply in sent:
        prompt_text = json.dumps(recorded_prompt(stack.fake, message))
        others = [s for j, s in enumerate(secrets) if j != i]
        assert not [s for s in others if s in reply], f"{users[i]} got another user's secret in a reply"
        assert not [s for s in others if s in prompt_text], f"{users[i]}'s prompt holds another user's secret"
    for i, message, _ in questions:
        recalled = " ".join(text for _, _, text in excerpt_lines(recorded_prompt(stack.fake, message)))
        assert secrets[i] in recalled, f"{users[i]}'s own secret was not recalled"
    for i, user in enumerate(users):
        assert len(records[user]) == 2 * len(phases)
        assert all(r["metadata"]["user"] == user for r in records[user])
        stored = " ".join(r["document"] for r in records[user])
        assert not [s for j, s in enumerate(secrets) if j != i and s in stored]


def test_twenty_concurrent_messages_of_one_user_are_stored_as_whole_turns_exactly_once(stack, unique):
    user, count = unique("burst"), 20
    messages = [f"concurrent message {i} {unique('m')}" for i in range(count)]
    replies = dict(zip(messages, concurrently(chat_ok, [(stack.url, user, m) for m in messages], max_workers=count)))

    recent = recent_list(stack.redis, user)
    assert len(recent) == RECENT_MESSAGES, recent
    turn_ids = []
    for question, answer in zip(recent[0::2], recent[1::2]):
        assert question["role"] == "user" and answer["role"] == "assistant", recent
        turn = question["id"].removesuffix(":u")
        assert question["id"] == f"{turn}:u" and answer["id"] == f"{turn}:a", recent
        assert question["content"] in replies
        assert answer["content"] == replies[question["content"]]
        turn_ids.append(turn)
    assert len(set(turn_ids)) == len(turn_ids)

    records = wait_indexed(stack.redis, stack.chroma_url, user, 2 * count)[user]
    check_turns_stored_once(records, list(replies.items()))
    assert all(r["metadata"]["user"] == user for r in records)


# --------------------------------------------------------------------------
# Failures: nothing recorded is lost, nothing unanswered is recorded


def test_chroma_outage_degrades_recall_and_every_turn_is_indexed_once_it_is_back(
        own_redis, own_chroma, stack, new_pool, unique):
    own_chroma.start()
    # A hot set of one message is full once the first turn is indexed, so the
    # chats of the outage ask Chroma for older memories, and find it down.
    frontend = new_pool(own_pool_env(own_redis, own_chroma, CHATD_RECALL_HOT_MESSAGES="1"), workers=2, threads=2)
    user = unique("outage")
    before = f"a message before the outage {unique('m')}"
    turns = [(before, chat_ok(frontend.url, user, before))]
    wait_indexed(own_redis, own_chroma.url, user, 2)

    own_chroma.stop()
    during = [f"message {i} while chroma is down {unique('m')}" for i in range(4)]
    for message in during:
        turns.append((message, chat_ok(frontend.url, user, message)))
    # Short-term memory still works: the last prompt holds the turn before it.
    last_prompt = recorded_prompt(stack.fake, during[-1])
    assert {"role": "user", "content": during[-2]} in last_prompt
    degraded = poll_until(lambda: [r for r in frontend.pool.log_records()
                                   if r.get("event") == "recall_degraded" and r.get("user") == user],
                          LOG_TIMEOUT_S)
    assert degraded, "no recall_degraded line while Chroma was down"
    assert len(queued_turns(own_redis, user)) == len(during), "the outage's turns must wait in the stream"

    own_chroma.start()
    records = wait_indexed(own_redis, own_chroma.url, user, 2 * len(turns))[user]
    check_turns_stored_once(records, turns)


def test_turns_left_pending_by_a_killed_worker_are_claimed_and_indexed_once(
        own_redis, own_chroma, new_pool, unique):
    # Chroma is down from the start: the worker's indexer reads the turns, fails
    # to index them and keeps them pending under its own consumer name.
    frontend = new_pool(own_pool_env(own_redis, own_chroma), workers=1, threads=2)
    pool = frontend.pool
    [victim] = pool.worker_pids()
    user = unique("claim")
    turns = []
    for i in range(3):
        message = f"pending turn {i} {unique('m')}"
        turns.append((message, chat_ok(frontend.url, user, message)))

    def victim_holds_pending_turns():
        # While its first batch keeps failing, the indexer retries that batch and
        # leaves newer turns unread in the stream: at least one is pending.
        summary = own_redis.command("XPENDING", rkeys.index_stream_of(user), INDEX_GROUP)
        owners = {name.decode(): int(n) for name, n in (summary[3] or [])}
        return [name for name, n in owners.items() if name.endswith(f"-{victim}") and n >= 1]

    assert poll_until(victim_holds_pending_turns, INDEX_TIMEOUT_S, POLL_INTERVAL_S), \
        f"no turn became pending under the worker: {own_redis.command('XPENDING', rkeys.index_stream_of(user), INDEX_GROUP)}"
    assert len(queued_turns(own_redis, user)) == len(turns)

    os.kill(victim, signal.SIGKILL)
    replaced = poll_until(lambda: (lambda pids: pids if len(pids) == 1 and victim not in pids else None)(
        pool.worker_pids()), RESPAWN_TIMEOUT_S)
    assert replaced, f"multiwatch did not replace the killed worker: {pool.worker_pids()}"
    own_chroma.start()

    records = wait_indexed(own_redis, own_chroma.url, user, 2 * len(turns))[user]
    check_turns_stored_once(records, turns)
    assert rkeys.pending_total(own_redis) == 0, "entries still pending"


def test_a_chat_waits_for_redis_twice_when_counters_and_memory_share_it(stack, new_pool, unique, tmp_path):
    # Shared: the limiter's script and the memory read go in one round trip,
    # the record of the turn in another. Apart (CHATD_RATE_REDIS_*), the
    # admission and the read cannot share one: three.
    counters = Redis(tmp_path).start()
    try:
        # No cap apart (0 turns it off), or releasing the lease there would be
        # a fourth round trip; shared, the record releases it.
        shared = new_pool({"CHATD_RATE_LIMIT": HIGH_RATE_LIMIT})
        apart = new_pool({"CHATD_RATE_LIMIT": HIGH_RATE_LIMIT, "CHATD_RATE_REDIS_HOST": counters.host,
                          "CHATD_RATE_REDIS_PORT": str(counters.port), "CHATD_MAX_CONCURRENT_PER_USER": "0"})
        for front, expected in ((shared, 2), (apart, 3)):
            user = unique("trips")
            first = f"first of {user}, remembered by the second"
            chat_ok(front.url, user, first)
            before = scrape_metrics(front.url)["chatd_redis_round_trips_total"]
            chat_ok(front.url, user, f"second of {user}")
            after = scrape_metrics(front.url)["chatd_redis_round_trips_total"]
            assert after - before == expected, (expected, after - before)
            # And the second chat saw the first: the memory read rode along.
            prompt = recorded_prompt(stack.fake, f"second of {user}")
            assert any(m["role"] == "user" and m["content"] == first for m in prompt), prompt
    finally:
        counters.stop()


def test_a_failed_model_call_stores_nothing(stack, unique):
    user = unique("fail")
    marker = f"unanswered{unique('x').replace('-', '')}"
    before = f"a first question {unique('m')}"
    turns = [(before, chat_ok(stack.url, user, before))]
    status, headers, body = post_chat(stack.url, user, f"{marker} please #fake:status=400")
    assert status == 502, body
    assert headers.get("content-type", "").startswith("application/json")
    assert isinstance(body, dict) and body.get("code") == "model_error", body
    after = f"a later question {unique('m')}"
    turns.append((after, chat_ok(stack.url, user, after)))

    assert marker not in json.dumps(recorded_prompt(stack.fake, after))
    recent = recent_list(stack.redis, user)
    assert [e["content"] for e in recent] == [before, turns[0][1], after, turns[1][1]]
    assert all(marker.encode() not in b"".join(f.values()) for _, f in stream_entries(stack.redis))
    # The later turn is indexed, so a record of the failed one would be there by now.
    records = wait_indexed(stack.redis, stack.chroma_url, user, 2 * len(turns))[user]
    check_turns_stored_once(records, turns)
    assert all(marker not in r["document"] for r in records)


# Ids that a careless mapping would merge: by case folding, by replacing
# punctuation, or by truncating to Chroma's old 63-character name limit.
COLLIDING_IDS = [
    "Ab", "ab", "AB", "aB",
    "a.b", "a_b", "a-b", "a..b", "a@b", ".ab", "ab.",
    "x", "x" * 64, "x" * 63 + "y", "x" * 63,
]


def test_users_whose_ids_differ_only_in_case_or_punctuation_are_kept_apart(stack, patient_url, unique):
    # Fixed ids, used only here: the session's Redis and Chroma start empty.
    tags = {user: unique("tag").replace("-", "") for user in COLLIDING_IDS}
    secrets = {user: f"secret{unique('s').replace('-', '')}" for user in COLLIDING_IDS}
    scripts = {user: [f"{tags[user]} remember my secret {secrets[user]}",
                      f"{tags[user]} tell me about rivers",
                      f"{tags[user]} and about mountains"] for user in COLLIDING_IDS}

    def converse(user):
        return [(m, chat_ok(patient_url, user, m)) for m in scripts[user]]

    turns = dict(zip(COLLIDING_IDS, concurrently(converse, COLLIDING_IDS, max_workers=8)))
    records = wait_indexed(stack.redis, stack.chroma_url, COLLIDING_IDS, 6)
    questions = {user: f"{tags[user]} which secret did I tell you" for user in COLLIDING_IDS}
    concurrently(chat_ok, [(patient_url, u, q) for u, q in questions.items()], max_workers=8)

    for user in COLLIDING_IDS:
        foreign = [tags[o] for o in COLLIDING_IDS if o != user] + [secrets[o] for o in COLLIDING_IDS if o != user]
        recent = recent_list(stack.redis, user)
        assert len(recent) == RECENT_MESSAGES
        assert all(tags[user] in e["content"] for e in recent), (user, recent)
        assert not [f for f in foreign if any(f in e["content"] for e in recent)], (user, recent)
        check_turns_stored_once(records[user], turns[user])
        assert all(r["metadata"]["user"] == user for r in records[user])
        assert not [f for f in foreign if any(f in r["document"] for r in records[user])], user
        prompt = recorded_prompt(stack.fake, questions[user])
        assert secrets[user] in " ".join(text for _, _, text in excerpt_lines(prompt)), user
        assert not [f for f in foreign if f in json.dumps(prompt)], user


def test_redis_outage_is_503_memory_unavailable_and_recovers_without_restart(
        own_redis, stack, new_pool, unique):
    # Fail-open rate limiting lets the request reach the memory step, which has
    # no degraded mode without Redis (fail-closed would answer
    # rate_limiter_unavailable first; test_rate_limit.py covers that).
    frontend = new_pool(own_pool_env(own_redis, CHATD_RATE_FAILURE_MODE="open"), workers=2, threads=2)
    user = unique("redisdown")
    before = f"before the outage {unique('m')}"
    chat_ok(frontend.url, user, before)
    workers = sorted(frontend.pool.worker_pids())

    own_redis.stop()
    try:
        marker = unique("m")
        results = concurrently(post_chat, [(frontend.url, user, f"during the outage {marker} {i}")
                                           for i in range(8)], max_workers=4)
        for status, headers, body in results:
            assert status == 503, body
            assert headers.get("content-type", "").startswith("application/json")
            assert isinstance(body, dict) and body.get("code") == "memory_unavailable", body
            assert isinstance(body.get("error"), str) and body["error"], body
        assert sorted(frontend.pool.worker_pids()) == workers, "a worker crashed during the outage"
    finally:
        if not own_redis.running():
            own_redis.start()

    after = f"after the outage {unique('m')}"
    recovered = poll_until(lambda: post_chat(frontend.url, user, after)[0] == 200, RECOVERY_TIMEOUT_S)
    assert recovered, "no 200 after Redis came back"
    assert sorted(frontend.pool.worker_pids()) == workers, "a worker was restarted"
    contents = [e["content"] for e in recent_list(own_redis, user)]
    assert contents[0] == before and contents[2] == after, contents
    assert not [c for c in contents if marker in c], "a turn answered 503 was recorded"
