"""Long-term memory at scale (issue 11): users share a fixed number of Chroma
shard collections, each user's newest indexed messages are ranked in process
from a hot set in Redis, and the indexer cannot be blocked by one bad turn or
one dead worker. Each test that bends Chroma runs its own Redis (pools that
share a Redis share the index stream) and reaches Chroma through the
fault-injecting proxy of the harness."""

import json
import os
import signal

import pytest

from harness.chroma_layout import legacy_collection_name, shard_name, shard_of, shard_records, user_records
from harness.chroma_proxy import ChromaProxy
from harness import keys as rkeys
from harness.stack import (Chroma, Redis, concurrently, http_json, http_request, poll_until, post_chat,
                           scrape_metrics)

INDEX_GROUP = "indexers"
HIGH_RATE_LIMIT = "1000"
INDEX_TIMEOUT_S = 45
# Longer than the 5 s the indexer's Redis connection used to wait, whatever the linger.
LONG_LINGER_MS = 6000
POLL_INTERVAL_S = 0.2
EXCERPT_PREAMBLE = "Quoted earlier conversation with this user"


@pytest.fixture
def own_chroma(tmp_path):
    chroma = Chroma(tmp_path / "chroma").start()
    try:
        yield chroma
    finally:
        chroma.stop()


@pytest.fixture
def proxy(own_chroma):
    with ChromaProxy(own_chroma.url) as p:
        yield p


def pool_env(redis, chroma_url, **extra):
    env = {"CHATD_REDIS_PORT": str(redis.port), "CHATD_CHROMA_URL": chroma_url, "CHATD_RATE_LIMIT": HIGH_RATE_LIMIT,
           "CHATD_CHROMA_TIMEOUT_MS": "10000"}
    env.update(extra)
    return env


def chat_ok(url, user, message):
    status, _, body = post_chat(url, user, message)
    assert status == 200, (status, body)
    return body["response"]


def stream_users(redis) -> "list[str]":
    out = []
    for _, fields in rkeys.stream_entries(redis):
        f = {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}
        out.append(f.get("user", b"").decode())
    return out


def dead_letters(redis, user) -> "list[dict]":
    out = []
    for _, fields in redis.command("XRANGE", rkeys.dead_letters_of(user), "-", "+"):
        f = {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}
        if f.get("user", b"").decode() == user:
            out.append(f)
    return out


def wait_indexed(redis, chroma_url, user, expected, shards=16) -> "list[dict]":
    latest = []

    def done():
        latest[:] = user_records(chroma_url, user, shards)
        return len(latest) >= expected and user not in stream_users(redis)

    assert poll_until(done, INDEX_TIMEOUT_S, POLL_INTERVAL_S), \
        f"{user}: {len(latest)} records, expected {expected}; stream users {stream_users(redis)}"
    return list(latest)


def prompt_of(fake, marker) -> "list[dict]":
    found = fake.requests(marker)
    assert len(found) == 1, f"{len(found)} model requests carry {marker!r}"
    return found[0]["messages"]


def excerpts(messages) -> str:
    return " ".join(m["content"] for m in messages if EXCERPT_PREAMBLE in m["content"])


def hot_set(redis, user) -> "list[bytes]":
    return redis.command("HKEYS", rkeys.user_key(user, "hot"))


# --------------------------------------------------------------------------
# The layout


def test_every_user_lands_in_their_shard_and_no_per_user_collection_is_created(stack, unique):
    users = [unique("shard") for _ in range(12)]
    concurrently(lambda u: chat_ok(stack.url, u, f"hello from {u}"), users, max_workers=6)
    for user in users:
        records = wait_indexed(stack.redis, stack.chroma_url, user, 2)
        assert sorted(r["id"].rsplit(":", 1)[1] for r in records) == ["a", "u"]
        assert all(r["raw_id"].startswith(user + "/") for r in records)
        status, _ = stack_collection(stack, legacy_collection_name(user))
        assert status == 404, f"{user} got a collection of their own"
    # Twelve users spread over more than one shard, and each shard holds only
    # records that say whose they are.
    assert len({shard_of(u) for u in users}) > 1
    for shard in {shard_of(u) for u in users}:
        assert all(r["raw_id"].split("/", 1)[0] == r["metadata"]["user"] for r in shard_records(stack.chroma_url, shard))


def stack_collection(stack, name):
    return http_json(f"{stack.chroma_url}/api/v2/tenants/default_tenant/databases/default_database/collections/{name}")


def test_the_shards_chatd_creates_are_built_with_the_configured_hnsw_graph(own_redis, own_chroma, new_pool, unique):
    front = new_pool(pool_env(own_redis, own_chroma.url, CHATD_CHROMA_HNSW_MAX_NEIGHBORS="12",
                              CHATD_CHROMA_HNSW_EF_CONSTRUCTION="60"))
    user = unique("hnsw")
    chat_ok(front.url, user, "hello")
    wait_indexed(own_redis, own_chroma.url, user, 2)
    status, body = http_json(f"{own_chroma.url}/api/v2/tenants/default_tenant/databases/default_database/"
                             f"collections/{shard_name(shard_of(user))}")
    assert status == 200, body
    hnsw = body["configuration_json"]["hnsw"]
    assert (hnsw["max_neighbors"], hnsw["ef_construction"], hnsw["space"]) == (12, 60, "l2")


def test_a_user_without_older_memory_is_recalled_from_the_hot_set_with_no_chroma_query(
        own_redis, proxy, new_pool, stack, unique):
    front = new_pool(pool_env(own_redis, proxy.url))
    user = unique("hot")
    pet = unique("zorblax").replace("-", "")
    chat_ok(front.url, user, f"my cat is called {pet}")
    chat_ok(front.url, user, "tell me about rivers")
    chat_ok(front.url, user, "and about mountains")
    wait_indexed(own_redis, proxy.url, user, 6)
    assert len(hot_set(own_redis, user)) == 6
    queries_before = proxy.count("query")
    question = f"what is my cat called {unique('q')}"
    chat_ok(front.url, user, question)
    # The first turn left the recent window: it came back from the hot set.
    assert pet in excerpts(prompt_of(stack.fake, question))
    assert proxy.count("query") == queries_before == 0
    assert scrape_metrics(front.url).get("chatd_recall_long_term_queries_total") == 0


def test_a_new_user_costs_no_chroma_call_on_the_request_path(own_redis, proxy, new_pool, unique):
    # No indexer can write either: the stream keeps the turns, so every call
    # the proxy sees would come from the request path.
    proxy.fail_upserts = True
    front = new_pool(pool_env(own_redis, proxy.url))
    user = unique("newcomer")
    for i in range(3):
        chat_ok(front.url, user, f"message {i}")
    assert proxy.count("query") == 0
    assert proxy.count("get") == 0


def remember_a_pet_then_chat(front, own_redis, proxy, unique, turns_after):
    """One turn naming a pet, then `turns_after` fillers, all indexed; returns
    (pet, records in Chroma)."""
    user = unique("older")
    pet = unique("quazzle").replace("-", "")
    chat_ok(front.url, user, f"my dog is called {pet}")
    for i in range(turns_after):
        chat_ok(front.url, user, f"filler message number {i}")
    return user, pet, wait_indexed(own_redis, proxy.url, user, 2 * (turns_after + 1))


def test_the_hot_set_keeps_the_newest_messages_and_older_ones_are_read_by_id(
        own_redis, proxy, new_pool, stack, unique):
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_RECALL_HOT_MESSAGES="4"))
    user, pet, records = remember_a_pet_then_chat(front, own_redis, proxy, unique, 3)
    # The two newest turns (both halves of a turn share its time stamp).
    newest = sorted(r["id"] for r in sorted(records, key=lambda r: r["metadata"]["ts"])[-4:])
    assert sorted(k.decode() for k in hot_set(own_redis, user)) == newest
    queries, gets = proxy.count("query"), proxy.count("get")
    question = f"what is my dog called {unique('q')}"
    chat_ok(front.url, user, question)
    assert pet in excerpts(prompt_of(stack.fake, question))
    # Four older messages, under CHATD_RECALL_BY_ID_MAX: read by id, never searched.
    assert proxy.count("query") == queries
    assert proxy.count("get") == gets + 1
    assert scrape_metrics(front.url)["chatd_recall_long_term_queries_total"] >= 1


@pytest.mark.parametrize("by_id_max", ["0", "2"])
def test_a_user_with_more_older_messages_than_the_by_id_bound_is_searched(
        own_redis, proxy, new_pool, stack, unique, by_id_max):
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_RECALL_HOT_MESSAGES="4",
                              CHATD_RECALL_BY_ID_MAX=by_id_max))
    user, pet, _ = remember_a_pet_then_chat(front, own_redis, proxy, unique, 3)
    queries, gets = proxy.count("query"), proxy.count("get")
    question = f"what is my dog called {unique('q')}"
    chat_ok(front.url, user, question)
    assert pet in excerpts(prompt_of(stack.fake, question))
    assert proxy.count("query") == queries + 1
    assert proxy.count("get") == gets


def test_a_chroma_that_answers_a_read_by_id_with_another_users_records_leaks_nothing(
        own_redis, own_chroma, proxy, new_pool, stack, unique):
    # One shard, so both users' records share a collection; a hot set of two
    # messages, so every chat after the first turn reads older ones by id.
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_CHROMA_SHARDS="1", CHATD_RECALL_HOT_MESSAGES="2"))
    alice, bob = unique("alice"), unique("bob")
    code = unique("code").replace("-", "")
    chat_ok(front.url, alice, f"the launch code of the rocket is {code}")
    chat_ok(front.url, alice, "nothing else to say")
    # Three turns: the first is older than both the hot set and the recent
    # messages, so bob's next chat reads it by id.
    for text in ("hello there", "how are you", "fine weather"):
        chat_ok(front.url, bob, text)
    wait_indexed(own_redis, own_chroma.url, alice, 4, shards=1)
    wait_indexed(own_redis, own_chroma.url, bob, 6, shards=1)
    # The store answers bob's read with alice's records of the same turns' shape.
    alice_ids = [r["id"] for r in user_records(own_chroma.url, alice, 1)]
    proxy.rewrite_get_ids = lambda ids: [f"{alice}/{i}" for i in alice_ids]
    question = f"what is the launch code of the rocket {unique('q')}"
    reply = chat_ok(front.url, bob, question)
    prompt = json.dumps(prompt_of(stack.fake, question))
    assert code not in prompt and code not in reply
    assert scrape_metrics(front.url)["chatd_recall_foreign_records_dropped_total"] >= 1


def test_a_chroma_that_ignores_the_user_filter_leaks_nothing(own_redis, own_chroma, proxy, new_pool, stack, unique):
    # One shard, so both users' records share a collection; a hot set of two
    # messages, so every chat after the first turn asks Chroma.
    proxy.strip_where = True
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_CHROMA_SHARDS="1", CHATD_RECALL_HOT_MESSAGES="2",
                              CHATD_RECALL_BY_ID_MAX="0"))
    alice, bob = unique("alice"), unique("bob")
    code = unique("code").replace("-", "")
    chat_ok(front.url, alice, f"the launch code of the rocket is {code}")
    chat_ok(front.url, alice, "nothing else to say")
    chat_ok(front.url, bob, "hello there")
    chat_ok(front.url, bob, "how are you")
    # Read Chroma itself: the proxy would drop our filter too.
    wait_indexed(own_redis, own_chroma.url, alice, 4, shards=1)
    wait_indexed(own_redis, own_chroma.url, bob, 4, shards=1)
    question = f"what is the launch code of the rocket {unique('q')}"
    reply = chat_ok(front.url, bob, question)
    prompt = json.dumps(prompt_of(stack.fake, question))
    assert code not in prompt and code not in reply
    assert proxy.count("query") >= 1
    assert scrape_metrics(front.url)["chatd_recall_foreign_records_dropped_total"] >= 1
    logged = poll_until(lambda: [r for r in front.pool.log_records()
                                 if r.get("event") == "recall_foreign_records" and r.get("user") == bob], 10)
    assert logged


# --------------------------------------------------------------------------
# An indexer that cannot be blocked


def test_a_turn_that_can_never_be_written_is_dead_lettered_at_once_and_the_rest_are_indexed(
        own_redis, own_chroma, new_pool, unique):
    front = new_pool(pool_env(own_redis, own_chroma.url), workers=1)
    user = unique("poison")
    chat_ok(front.url, user, "a good turn before")
    wait_indexed(own_redis, own_chroma.url, user, 2)
    # Text that is not UTF-8 can never go into Chroma's JSON: what a bug
    # upstream could leave in the stream. Queued right between good turns.
    bad_turn = "f" * 32
    own_redis.command("XADD", rkeys.index_stream_of(user), "*", "user", user, "turn", bad_turn, "ts", "1700000000000",
                      "u", b"broken \xff\xfe text", "a", "a reply", "emb", b"")
    chat_ok(front.url, user, "a good turn after")
    records = wait_indexed(own_redis, own_chroma.url, user, 4)
    assert all(not r["id"].startswith(bad_turn) for r in records)
    dead = poll_until(lambda: dead_letters(own_redis, user), INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    assert dead and len(dead) == 1, dead
    assert dead[0]["turn"].decode() == bad_turn
    assert dead[0]["reason"] == b"invalid_utf8"
    assert dead[0]["deliveries"] == b"1"  # permanent: at once, not after retries


def test_a_turn_chroma_keeps_refusing_goes_to_the_dead_letters_after_max_deliveries(
        own_redis, proxy, new_pool, unique):
    marker = unique("refused").replace("-", "")
    proxy.fail_marker = marker
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_INDEX_MAX_DELIVERIES="3", CHATD_INDEX_RETRY_MS="200"),
                     workers=1)
    user, other = unique("refused"), unique("bystander")
    chat_ok(front.url, user, f"this one is refused {marker}")
    chat_ok(front.url, other, "this one is fine")
    chat_ok(front.url, user, "and this one too")
    # The good turns are not held back by the bad one.
    wait_indexed(own_redis, proxy.url, other, 2)
    dead = poll_until(lambda: dead_letters(own_redis, user), INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    assert dead and len(dead) == 1, dead
    assert marker.encode() in dead[0]["u"]
    assert dead[0]["deliveries"] == b"3"
    assert dead[0]["reason"] == b"chroma_unavailable"
    records = wait_indexed(own_redis, proxy.url, user, 2)
    assert [r for r in records if marker in r["document"]] == []
    assert rkeys.pending_total(own_redis) == 0
    assert scrape_metrics(front.url)["chatd_index_dead_lettered_total"] == 1


def test_chroma_down_for_everyone_dead_letters_nothing(own_redis, tmp_path, new_pool, unique):
    # Nothing listens there: every write fails without an answer.
    down = Chroma(tmp_path / "down")  # never started: its port is free
    front = new_pool(pool_env(own_redis, down.url, CHATD_INDEX_MAX_DELIVERIES="1",
                              CHATD_INDEX_RETRY_MS="100"), workers=1)
    user = unique("patient")
    for i in range(3):
        chat_ok(front.url, user, f"waiting turn {i}")
    # Well past one delivery each: still waiting, none dead.
    assert poll_until(lambda: scrape_metrics(front.url).get("chatd_index_failures_total", 0) >= 5, INDEX_TIMEOUT_S)
    assert dead_letters(own_redis, user) == []
    assert stream_users(own_redis).count(user) == 3


# Larger than the hot-set script's slice of 1,000 records per HSET/ZADD, and
# within one indexer batch (CHATD_INDEX_BATCH at its maximum).
BIG_BATCH_TURNS = 600
BIG_HOT_SET = 1000


def test_one_users_batch_larger_than_a_script_slice_fills_the_hot_set_with_its_newest(
        own_redis, stack, new_pool, unique):
    user = unique("prolific")
    stream = rkeys.index_stream_of(user)
    own_redis.command("XGROUP", "CREATE", stream, INDEX_GROUP, "0", "MKSTREAM")
    base_ts = 1700000000000
    for i in range(BIG_BATCH_TURNS):
        own_redis.command("XADD", stream, "*", "user", user, "turn", f"{i:032x}", "ts", str(base_ts + i),
                          "u", f"question {i}", "a", f"answer {i}")
    front = new_pool(pool_env(own_redis, stack.chroma_url, CHATD_INDEX_BATCH="1000",
                              CHATD_RECALL_HOT_MESSAGES=str(BIG_HOT_SET)), workers=1, threads=1)
    records = wait_indexed(own_redis, stack.chroma_url, user, 2 * BIG_BATCH_TURNS)
    assert len(records) == 2 * BIG_BATCH_TURNS
    # One batch held every turn (all were queued before the pool started), so
    # one script call added 1,200 records in two slices and trimmed to 1,000.
    newest = sorted(r["id"] for r in sorted(records, key=lambda r: r["metadata"]["ts"])[-BIG_HOT_SET:])
    assert sorted(k.decode() for k in hot_set(own_redis, user)) == newest
    index = own_redis.command("ZRANGE", rkeys.user_key(user, "hotidx"), 0, -1)
    assert sorted(m.decode() for m in index) == newest
    assert rkeys.pending_total(own_redis) == 0
    assert scrape_metrics(front.url)["chatd_index_dead_lettered_total"] == 0


def test_an_indexer_lingering_longer_than_its_usual_redis_timeout_still_indexes(own_redis, stack, new_pool, unique):
    # While turns arrive, the indexer's read blocks for up to the linger; the
    # configuration allows 10 s. Its Redis connection must wait longer than
    # that, or every lingering read times out and nothing is ever written.
    front = new_pool(pool_env(own_redis, stack.chroma_url, CHATD_INDEX_LINGER_MS=str(LONG_LINGER_MS)), workers=1)
    user = unique("patient")
    chat_ok(front.url, user, f"a message worth keeping {unique('m')}")
    wait_indexed(own_redis, stack.chroma_url, user, 2)
    assert not [r for r in front.pool.log_records() if r.get("event") == "index_retry"]


def test_a_dead_workers_turns_are_taken_over_by_a_live_worker(own_redis, own_chroma, proxy, new_pool, unique):
    proxy.fail_upserts = True  # the first pool can read turns but never finish them
    first = new_pool(pool_env(own_redis, proxy.url), workers=1)
    [victim] = first.pool.worker_pids()
    user = unique("orphan")
    for i in range(3):
        chat_ok(first.url, user, f"orphaned turn {i}")

    def pending_at_victim():
        summary = own_redis.command("XPENDING", rkeys.index_stream_of(user), INDEX_GROUP)
        owners = {name.decode(): int(n) for name, n in (summary[3] or [])}
        return sum(n for name, n in owners.items() if name.endswith(f"-{victim}")) == 3

    assert poll_until(pending_at_victim, INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    os.kill(victim, signal.SIGKILL)
    first.stop()
    second = new_pool(pool_env(own_redis, own_chroma.url, CHATD_INDEX_CLAIM_IDLE_MS="1000"), workers=1)
    records = wait_indexed(own_redis, own_chroma.url, user, 6)
    assert sorted(r["document"] for r in records if r["metadata"]["role"] == "user") == \
        [f"orphaned turn {i}" for i in range(3)]
    assert rkeys.pending_total(own_redis) == 0
    assert scrape_metrics(second.url)["chatd_index_claimed_total"] == 3


def test_metrics_and_health_show_the_backlog(own_redis, proxy, new_pool, unique):
    proxy.fail_upserts = True
    front = new_pool(pool_env(own_redis, proxy.url, CHATD_INDEX_LAG_DEGRADED_MS="500"), workers=1)
    user = unique("lag")
    for i in range(2):
        chat_ok(front.url, user, f"stuck turn {i}")

    def lagging():
        status, _, body = http_request(front.url, "GET", "/api/health")
        return body if status == 200 and body.get("status") == "degraded" else None

    health = poll_until(lagging, INDEX_TIMEOUT_S, POLL_INTERVAL_S)
    assert health, "health never said degraded while turns waited"
    assert health["index"]["oldestAgeMs"] > 500
    assert health["index"]["waiting"] + health["index"]["pending"] == 2
    m = scrape_metrics(front.url)
    assert m["chatd_index_waiting"] + m["chatd_index_pending"] == 2
    assert m["chatd_index_oldest_age_seconds"] > 0.5
    proxy.fail_upserts = False
    assert poll_until(lambda: http_request(front.url, "GET", "/api/health")[2].get("status") == "ok",
                      INDEX_TIMEOUT_S, POLL_INTERVAL_S)
