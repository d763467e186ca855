"""The Redis key layout as tests see it: the same spelling as
src/redis_schema.cc (docs/memory.md, "Key layout"), so a test that peeks at
Redis names its keys in one place.

Per-user keys live under their shard's hash tag, next to the shard's stream
and activity index: `chatd:{s3}:u:alice:recent`, `chatd:{s3}:index`.
"""

from functools import partial

# kRedisShards in include/chatd/redis_schema.h.
REDIS_SHARDS = 16
INDEX_GROUP = "indexers"
CLEANUP_LEASE_KEY = "chatd:cleanup:lease"

_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619


def shard_of(user: str) -> int:
    """The user's shard: FNV-1a (32 bits) of the id's bytes, modulo the shards."""
    h = _FNV_OFFSET
    for b in user.encode():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h % REDIS_SHARDS


def _tag(shard: int) -> str:
    return f"chatd:{{s{shard}}}"


def user_key(user: str, suffix: str) -> str:
    return f"{_tag(shard_of(user))}:u:{user}:{suffix}"


def user_key_pattern(user: str) -> str:
    """A SCAN pattern that matches every key of the user (ids hold no glob characters)."""
    return f"{_tag(shard_of(user))}:u:{user}:*"


def shard_key(shard: int, name: str) -> str:
    """A key of the shard itself: its stream, dead letters, activity index, in-progress set."""
    return f"{_tag(shard)}:{name}"


def user_shard_key(user: str, name: str) -> str:
    return shard_key(shard_of(user), name)


def every_shard(name: str) -> "list[str]":
    return [shard_key(s, name) for s in range(REDIS_SHARDS)]


INDEX, DEAD_LETTERS, ACTIVITY, IN_PROGRESS = "index", "index:dead", "activity", "cleanup:inprogress"
index_stream, dead_letters = partial(shard_key, name=INDEX), partial(shard_key, name=DEAD_LETTERS)
activity, in_progress = partial(shard_key, name=ACTIVITY), partial(shard_key, name=IN_PROGRESS)
index_stream_of, dead_letters_of = partial(user_shard_key, name=INDEX), partial(user_shard_key, name=DEAD_LETTERS)
activity_of = partial(user_shard_key, name=ACTIVITY)
all_index_streams, all_dead_letters = partial(every_shard, INDEX), partial(every_shard, DEAD_LETTERS)
all_in_progress = partial(every_shard, IN_PROGRESS)


def total_len(redis, keys) -> int:
    """XLEN summed over streams (a missing stream counts 0)."""
    return sum(int(redis.command("XLEN", k) or 0) for k in keys)


# The layout before the shards (what `chatd-cleanup migrate-keys` moves).
OLD_INDEX_STREAM = "chatd:index"
OLD_DEAD_LETTERS = "chatd:index:dead"
OLD_ACTIVITY = "chatd:activity"
OLD_IN_PROGRESS = "chatd:cleanup:inprogress"


def old_user_key(user: str, suffix: str) -> str:
    return f"chat:{{{user}}}:{suffix}"


def pending_total(redis) -> int:
    """Entries delivered to an indexer and not acknowledged, over every shard."""
    return sum(int(redis.command("XPENDING", k, INDEX_GROUP)[0]) for k in all_index_streams())


def stream_entries(redis, streams=None) -> "list[tuple[bytes, list]]":
    """(id, [field, value, ...]) of every entry of the streams (default: every
    shard's index stream)."""
    out = []
    for key in streams if streams is not None else all_index_streams():
        out.extend(redis.command("XRANGE", key, "-", "+") or [])
    return out
