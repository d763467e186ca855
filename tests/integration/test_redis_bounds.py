"""Redis stays bounded (issue 13, item 5): the dead-letter stream is capped,
consumers of stopped workers leave the index group once their entries were
claimed, and /api/health and /metrics show Redis's memory and the streams'
lengths. Each test has its own Redis, so its streams hold only its entries."""

import re

from harness import keys as rkeys
from harness.chroma_layout import user_records
from harness.stack import http_request, poll_until, post_chat, scrape_metrics

INDEX_GROUP = "indexers"
DEAD_LETTER_CAP = 10
OLD_DEAD_LETTERS = 300
TIMEOUT_S = 45
POLL_S = 0.2


def metric(url: str, name: str):
    return scrape_metrics(url).get(name)


def consumers(redis, stream: str) -> "set[str]":
    return {dict(zip(c[0::2], c[1::2]))[b"name"].decode()
            for c in redis.command("XINFO", "CONSUMERS", stream, INDEX_GROUP)}


def queue_turn(redis, user: str, turn: str, user_text: bytes) -> bytes:
    return redis.command("XADD", rkeys.index_stream_of(user), "*", "user", user, "turn", turn, "ts", "1700000000000",
                         "u", user_text, "a", "a reply")


def test_dead_letters_are_capped_and_what_was_dropped_is_counted(own_redis, stack, new_pool, unique):
    # Text that is not UTF-8 can never be written to Chroma: a dead letter at once.
    user = unique("dead")
    # Each shard's dead letters are capped: the old ones sit in the user's shard.
    dead_key = rkeys.dead_letters_of(user)
    own_redis.command("XGROUP", "CREATE", rkeys.index_stream_of(user), INDEX_GROUP, "0", "MKSTREAM")
    for i in range(OLD_DEAD_LETTERS):
        own_redis.command("XADD", dead_key, "*", "user", "old", "turn", f"old{i}", "reason", "test")
    queue_turn(own_redis, user, "badturn", b"\xff\xfe not utf-8")
    front = new_pool({"CHATD_REDIS_PORT": str(own_redis.port), "CHATD_CHROMA_URL": stack.chroma_url,
                      "CHATD_INDEX_DEAD_LETTER_MAX": str(DEAD_LETTER_CAP)}, workers=1, threads=1)

    def dead_lettered():
        return any(dict(zip(f[0::2], f[1::2])).get(b"turn") == b"badturn"
                   for _, f in own_redis.command("XRANGE", dead_key, "-", "+"))

    assert poll_until(dead_lettered, TIMEOUT_S, POLL_S), "the bad turn never reached the dead letters"
    left = own_redis.command("XLEN", dead_key)
    # MAXLEN ~ trims whole stream nodes: a little above the cap may stay, the
    # bulk of the old ones went, the newest is kept.
    assert DEAD_LETTER_CAP <= left < OLD_DEAD_LETTERS, left
    newest = own_redis.command("XREVRANGE", dead_key, "+", "-", "COUNT", 1)[0][1]
    assert dict(zip(newest[0::2], newest[1::2]))[b"turn"] == b"badturn"
    trimmed = poll_until(lambda: metric(front.url, "chatd_index_dead_letters_trimmed_total"), TIMEOUT_S, POLL_S)
    assert trimmed == OLD_DEAD_LETTERS + 1 - left
    assert poll_until(lambda: metric(front.url, "chatd_index_dead_letters") == left, TIMEOUT_S, POLL_S)


def test_dead_consumers_go_once_claimed_and_health_shows_redis_memory(own_redis, stack, new_pool, unique):
    # A worker that read a turn and died (its entry pending), and one that
    # died with nothing pending.
    user = unique("claimed")
    stream = rkeys.index_stream_of(user)
    own_redis.command("XGROUP", "CREATE", stream, INDEX_GROUP, "0", "MKSTREAM")
    queue_turn(own_redis, user, "claimedturn", b"words of a dead worker")
    own_redis.command("XREADGROUP", "GROUP", INDEX_GROUP, "deadhost-1", "COUNT", 1, "STREAMS", stream, ">")
    own_redis.command("XGROUP", "CREATECONSUMER", stream, INDEX_GROUP, "deadhost-2")
    assert {"deadhost-1", "deadhost-2"} <= consumers(own_redis, stream)
    front = new_pool({"CHATD_REDIS_PORT": str(own_redis.port), "CHATD_CHROMA_URL": stack.chroma_url,
                      "CHATD_INDEX_CONSUMER_GONE_MS": "1000"}, workers=1, threads=1)

    def gone():
        return not ({"deadhost-1", "deadhost-2"} & consumers(own_redis, stream))

    assert poll_until(gone, TIMEOUT_S, POLL_S), consumers(own_redis, stream)
    # The dead worker's turn was claimed and indexed, not dropped with it.
    assert poll_until(lambda: len(user_records(stack.chroma_url, user)) == 2, TIMEOUT_S, POLL_S)
    assert own_redis.command("XLEN", stream) == 0
    assert poll_until(lambda: (metric(front.url, "chatd_index_consumers_removed_total") or 0) >= 2,
                      TIMEOUT_S, POLL_S)

    # Health and metrics show Redis's memory and the streams, refreshed off
    # the request path by the indexer.
    status, _, body = post_chat(front.url, unique("health"), "hello")
    assert status == 200, body

    def fresh_health():
        status, _, body = http_request(front.url, path="/api/health")
        return body if status == 200 and "redisMemory" in body else None

    health = poll_until(fresh_health, TIMEOUT_S, POLL_S)
    assert health, "health never showed Redis's memory"
    info = own_redis.command("INFO", "memory").decode()
    maxmemory = int(re.search(r"^maxmemory:(\d+)", info, re.MULTILINE).group(1))
    assert health["redisMemory"]["usedBytes"] > 0
    assert health["redisMemory"]["maxmemoryBytes"] == maxmemory
    assert health["index"]["deadLetters"] == 0
    assert isinstance(health["index"]["streamLength"], int)
    assert metric(front.url, "chatd_redis_used_memory_bytes") > 0
    assert metric(front.url, "chatd_index_stream_length") is not None
