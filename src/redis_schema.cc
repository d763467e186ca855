#include "chatd/redis_schema.h"

#include <algorithm>
#include <cstdlib>
#include <set>

#include "decimal.h"
#include "hot_record.h"
#include "chatd/idempotency.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// Page size when reading the index stream for queued turns.
constexpr int kStreamPage = 1000;
// Turn-index members per ZADD: bounds each command for a user with a long history.
constexpr size_t kTurnIndexChunk = 500;

constexpr std::string_view kIdempotencyKeySuffix = "idem:";

constexpr uint32_t kFnvOffset = 2166136261u;
constexpr uint32_t kFnvPrime = 16777619u;

// "chatd:{s<n>}": the hash tag of the shard, shared by the shard's stream,
// activity index and every key of its users.
std::string ShardPrefix(int shard) { return "chatd:{s" + std::to_string(shard) + "}"; }

// "chatd:{s<n>}:u:<id>:<name>". Ids hold no ':' (UserId::Parse), so the name
// identifies its user, and no '{' or '}', so the shard's tag is the key's.
std::string ShardedUserKey(const UserId& user_id, std::string_view name) {
  std::string key = ShardPrefix(ShardOf(user_id));
  key.append(":u:").append(user_id).append(":").append(name);
  return key;
}

}  // namespace

int ShardOf(const UserId& user_id) {
  uint32_t h = kFnvOffset;
  for (unsigned char c : user_id.str()) {
    h ^= c;
    h *= kFnvPrime;
  }
  return static_cast<int>(h % static_cast<uint32_t>(kRedisShards));
}

std::string IndexStreamKey(int shard) { return ShardPrefix(shard) + ":index"; }
std::string DeadLetterKey(int shard) { return ShardPrefix(shard) + ":index:dead"; }
std::string ActivityKey(int shard) { return ShardPrefix(shard) + ":activity"; }
std::string CleanupInProgressKey(int shard) { return ShardPrefix(shard) + ":cleanup:inprogress"; }

std::string RecentKey(const UserId& user_id) { return ShardedUserKey(user_id, "recent"); }
std::string CleanupLockKey(const UserId& user_id) { return ShardedUserKey(user_id, "lock"); }
std::string IndexingKey(const UserId& user_id) { return ShardedUserKey(user_id, "indexing"); }
std::string HotKey(const UserId& user_id) { return ShardedUserKey(user_id, "hot"); }
std::string HotIndexKey(const UserId& user_id) { return ShardedUserKey(user_id, "hotidx"); }
std::string RecordedTurnsKey(const UserId& user_id) { return ShardedUserKey(user_id, "recorded"); }
std::string TurnIndexKey(const UserId& user_id) { return ShardedUserKey(user_id, "turns"); }
std::string QueuedTurnsKey(const UserId& user_id) { return ShardedUserKey(user_id, "queued"); }
std::string TombstoneKey(const UserId& user_id) { return ShardedUserKey(user_id, "erased"); }
std::string InflightKey(const UserId& user_id) { return ShardedUserKey(user_id, "inflight"); }
std::string IdempotencyKeysKey(const UserId& user_id) { return ShardedUserKey(user_id, "idemkeys"); }

std::string RateKey(const UserId& user_id, RateCounter counter) {
  switch (counter) {
    case RateCounter::kChatFixed:
      return ShardedUserKey(user_id, "rl:fixed");
    case RateCounter::kChatSliding:
      return ShardedUserKey(user_id, "rl:sliding");
    case RateCounter::kData:
      return ShardedUserKey(user_id, "rl:data");
  }
  return ShardedUserKey(user_id, "rl:fixed");
}

Result<std::string> IdempotencyRedisKey(const UserId& user_id, std::string_view key) {
  Result<std::string> digest = Sha256Hex(key);
  if (!digest.ok()) return digest.status();
  return ShardedUserKey(user_id, std::string(kIdempotencyKeySuffix) + *digest);
}

bool IsIdempotencyKeyOf(const UserId& user_id, std::string_view key) {
  const std::string prefix = ShardedUserKey(user_id, kIdempotencyKeySuffix);
  return key.size() > prefix.size() && key.substr(0, prefix.size()) == prefix;
}

std::string TurnIndexMember(int64_t ts_ms, std::string_view turn_id) {
  std::string ts = std::to_string(ts_ms < 0 ? 0 : ts_ms);
  std::string out(ts.size() < kTurnIndexTsDigits ? kTurnIndexTsDigits - ts.size() : 0, '0');
  out.append(ts).append(":").append(turn_id);
  return out;
}

namespace {

// KEYS: recent list, index stream, activity zset, the user's recorded turns,
// the user's leases in flight, tombstone, turn index, queued turns[, the
// request's idempotency key].
// ARGV: user, turn id, user text, assistant text, max recent, packed embedding,
// the lease to release ('' for none), how long a recorded turn stays listed
// in ms, the tombstone the chat read when it started [, idempotency token,
// request fingerprint, ms to keep the answer].
// The timestamp comes from Redis so that every worker and host agrees on it.
// Releasing the chat's concurrency lease here saves the chat a round trip.
//
// Replies: {'recorded', ts}; {'erased'} when the erase fence refused the turn;
// {'already'} when this turn id was recorded before (the client's first try
// timed out after the script ran: the retry must not record it twice);
// {'key_done', turn, response} when the key holds another request's answer;
// {'key_busy'} when another request holds the key. Only 'recorded' wrote
// anything besides the lease release.
const RedisScript kRecordTurn(R"lua(
if ARGV[7] ~= '' then redis.call('ZREM', KEYS[5], ARGV[7]) end
-- The erase fence (DELETE /api/memory, chatd-cleanup forget). A chat that
-- read another tombstone than the current one (none, or an older erase's)
-- started before the user's latest erase: nothing of it may be kept. The
-- tombstone outlives the longest chat, so an expired one fences nobody.
local tombstone = redis.call('GET', KEYS[6])
if tombstone and tombstone ~= ARGV[9] then return {'erased'} end
-- Idempotent by turn id: a turn stays listed longer than any retry may come.
if redis.call('ZSCORE', KEYS[4], ARGV[2]) then return {'already'} end
-- The key's claim is this request's unless it expired meanwhile and another
-- request took the key; then that request's turn is the one to keep.
if KEYS[9] then
  local held = redis.call('HMGET', KEYS[9], 'tok', 'turn', 'resp')
  if held[2] then return {'key_done', held[2], held[3]} end
  if held[1] and held[1] ~= ARGV[10] then return {'key_busy'} end
end
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local u = cjson.encode({role = 'user', content = ARGV[3], ts = ts, id = ARGV[2] .. ':u'})
local a = cjson.encode({role = 'assistant', content = ARGV[4], ts = ts, id = ARGV[2] .. ':a'})
redis.call('RPUSH', KEYS[1], u, a)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
local entry = redis.call('XADD', KEYS[2], '*', 'user', ARGV[1], 'turn', ARGV[2], 'ts', ts,
                         'u', ARGV[3], 'a', ARGV[4], 'emb', ARGV[6])
redis.call('ZADD', KEYS[3], ts, ARGV[1])
redis.call('ZADD', KEYS[4], ts, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ts - tonumber(ARGV[8]))
redis.call('PEXPIRE', KEYS[4], ARGV[8])
redis.call('ZADD', KEYS[7], 0, string.format('%015d:%s', ts, ARGV[2]))
redis.call('HSET', KEYS[8], ARGV[2], entry)
if KEYS[9] then
  -- The answer replaces the claim, in this same step: a retry replays it.
  redis.call('HSET', KEYS[9], 'fp', ARGV[11], 'turn', ARGV[2], 'resp', ARGV[4])
  redis.call('HDEL', KEYS[9], 'tok')
  redis.call('PEXPIRE', KEYS[9], ARGV[12])
end
return {'recorded', ts}
)lua");

// The Lua that adds records to a hot set and trims it to its newest `bound`,
// shared by every script that fills one, so the set has one definition. It
// expects the locals hot_key, hot_index_key, bound and first (the ARGV index
// of the first (message id, ts, packed record) triple) to be set.
//
// Each redis.call costs Redis a fixed overhead beyond the command's own work,
// so the records go in one HSET and one ZADD, and the trimmed ones in one HDEL,
// not a call per record; in slices, because unpack is bounded by Lua's C
// stack (8,000 values).
const char kHotSetAddLua[] = R"lua(
local records_per_call = 1000
for from = first, #ARGV, 3 * records_per_call do
  local fields, members = {}, {}
  for i = from, math.min(#ARGV, from + 3 * records_per_call - 1), 3 do
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i + 2]
    members[#members + 1] = ARGV[i + 1]
    members[#members + 1] = ARGV[i]
  end
  redis.call('HSET', hot_key, unpack(fields))
  redis.call('ZADD', hot_index_key, unpack(members))
end
local over = redis.call('ZCARD', hot_index_key) - bound
if over > 0 then
  local oldest = redis.call('ZPOPMIN', hot_index_key, over)
  local ids = {}
  for i = 1, #oldest, 2 do
    ids[#ids + 1] = oldest[i]
    if #ids == records_per_call then
      redis.call('HDEL', hot_key, unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then redis.call('HDEL', hot_key, unpack(ids)) end
end
)lua";

// KEYS: hot set, hot index. ARGV: bound, then (message id, ts, packed) triples.
const RedisScript kAddToHot(std::string(R"lua(
local hot_key, hot_index_key, bound, first = KEYS[1], KEYS[2], tonumber(ARGV[1]), 2
)lua") + kHotSetAddLua);

// KEYS: the user's cleanup lock, the user's indexing marker, the index
// stream, the user's erase tombstone.
// ARGV: marker TTL, group, consumer, then (entry id, deliveries) pairs.
// Returns 0 when a cleanup holds the user: do not write; the entries stay
// pending, idle again, and this delivery does not count (RETRYCOUNT undoes it).
// Returns 1 when every entry is to be written, with the marker raised.
// Otherwise returns {go (1/0), erased count, erased ids..., gone ids...}:
//  - erased: entries older than the user's latest erase were recorded by chats
//    the erase fenced (or before it) and must never reach Chroma: they are
//    acknowledged and deleted here;
//  - gone: entries no longer in the stream were settled after this indexer
//    read them, by a cleanup that archived or forgot the user (and has let go
//    of its lock by now) or by another indexer: writing them would put back
//    records of a user who is gone;
//  - go is 0 (no marker) when nothing else is left.
const RedisScript kBeginIndexing(R"lua(
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 4, #ARGV, 2 do
    redis.call('XCLAIM', KEYS[3], ARGV[2], ARGV[3], 0, ARGV[i],
               'RETRYCOUNT', math.max(tonumber(ARGV[i + 1]) - 1, 0), 'JUSTID')
  end
  return 0
end
local tm, tq
local tombstone = redis.call('GET', KEYS[4])
if tombstone then
  tm, tq = string.match(tombstone, '^(%d+)-(%d+)$')
  tm, tq = tonumber(tm), tonumber(tq)
end
local erased, gone, left = {}, {}, 0
for i = 4, #ARGV, 2 do
  local m, q = string.match(ARGV[i], '^(%d+)-(%d+)$')
  m, q = tonumber(m), tonumber(q)
  if tm and (m < tm or (m == tm and q < tq)) then
    redis.call('XACK', KEYS[3], ARGV[2], ARGV[i])
    redis.call('XDEL', KEYS[3], ARGV[i])
    erased[#erased + 1] = ARGV[i]
  elseif #redis.call('XRANGE', KEYS[3], ARGV[i], ARGV[i]) == 0 then
    redis.call('XACK', KEYS[3], ARGV[2], ARGV[i])
    gone[#gone + 1] = ARGV[i]
  else
    left = left + 1
  end
end
if left > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  if #erased + #gone == 0 then return 1 end
end
local out = {left > 0 and 1 or 0, #erased}
for _, id in ipairs(erased) do out[#out + 1] = id end
for _, id in ipairs(gone) do out[#out + 1] = id end
return out
)lua");

// KEYS: lock, marker, index stream, hot set, hot index, queued turns.
// ARGV: group, hot-set bound, keep marker (1/0), n, then n entry ids to
// acknowledge, then their n turn ids (no longer queued), then (message id,
// ts, packed record) triples for the hot set.
// Lowers the marker, unless a write of ours may still land (it timed out
// without an answer: Chroma may yet apply it), in which case the marker stays
// until its TTL, and a cleanup keeps waiting for it. Acknowledges and fills
// the hot set only while no cleanup holds the user (else everything stays
// pending for after the cleanup), and fills it only when every entry was
// still pending. Returns the number acknowledged.
const RedisScript kFinishIndexing(std::string(R"lua(
if ARGV[3] == '0' and redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
local n = tonumber(ARGV[4])
if n == 0 or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ids = {}
for i = 5, 4 + n do ids[#ids + 1] = ARGV[i] end
local turns = {}
for i = 5 + n, 4 + 2 * n do turns[#turns + 1] = ARGV[i] end
local acked = redis.call('XACK', KEYS[3], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[3], unpack(ids))
redis.call('HDEL', KEYS[6], unpack(turns))
-- Entries no longer pending were settled meanwhile by a cleanup that archived
-- or forgot the user and let go of its lock: their messages must not come
-- back into the hot set of a user who is gone.
if acked < n then return acked end
local hot_key, hot_index_key, bound, first = KEYS[4], KEYS[5], tonumber(ARGV[2]), 5 + 2 * n
)lua") + kHotSetAddLua + "return n\n");

// KEYS: index stream. ARGV: group, this consumer, idle bound (ms).
// One script, so that no consumer can be handed an entry between the check
// that nothing is pending at it and its removal (DELCONSUMER drops what is).
const RedisScript kRemoveGoneConsumers(R"lua(
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
)lua");

// KEYS: activity, recent, rl fixed, rl sliding, lock, hot set, hot index,
// index stream, in-progress set, recorded turns, turn index, queued turns.
// ARGV: user, last activity we archived, index group, our lock value, stream
// ids to acknowledge.
// The turn index goes with the rest: restore rebuilds it from the archive.
// Returns 1 when the user was removed, 0 when they came back meanwhile, -1
// (and touches nothing) when the lock is no longer ours.
const RedisScript kFinishArchive(R"lua(
if redis.call('GET', KEYS[5]) ~= ARGV[4] then return -1 end
if #ARGV > 4 then
  local ids = {}
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
  redis.call('XACK', KEYS[8], ARGV[3], unpack(ids))
  redis.call('XDEL', KEYS[8], unpack(ids))
end
redis.call('SREM', KEYS[9], ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[10], KEYS[11], KEYS[12])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
redis.call('DEL', KEYS[5])
return 0
)lua");

// KEYS: lock, in-progress set. ARGV: user, our lock value, lock TTL, our lease
// value ("" when we hold none), the lease's value as read just before ("":
// free).
// Takes the user's lock, when it is free (SET NX, in effect) or left by a
// run or migration that is gone (the lease is free, or ours), and remembers
// the user as in progress, together. Returns 1, or the holder's value.
const RedisScript kTakeLock(R"lua(
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[2] then
  local purpose = string.match(held, '^[^:]*')
  local lease = ARGV[5]
  if (purpose ~= 'cleanup' and purpose ~= 'migrate') or (lease ~= '' and lease ~= ARGV[4]) then return held end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
)lua");

// KEYS: a lock or the lease. ARGV: our value, TTL. Renews it if it is still
// ours: 1; else 0 (expired, or someone else's now).
const RedisScript kRenew(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
)lua");

// KEYS: lease. ARGV: our value, TTL, the value of a holder proved gone ("":
// none). Returns 1, or the live holder's value.
const RedisScript kTakeLease(R"lua(
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] and held ~= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
)lua");

// KEYS: lease. ARGV: our value. Compare-and-delete.
const RedisScript kReleaseLease(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
)lua");

// KEYS: activity, lock, in-progress set. ARGV: user, cut-off.
// A user left in progress by a killed run who is active again (or gone)
// gets their lock back; one still inactive is left for this run to finish.
// The lock of a forget or a restore is its owner's: left alone.
const RedisScript kSettleInProgress(R"lua(
local held = redis.call('GET', KEYS[2])
if held then
  local purpose = string.match(held, '^[^:]*')
  if purpose ~= 'cleanup' and purpose ~= 'migrate' then return 0 end
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
)lua");

// KEYS: activity, recent, rl fixed, rl sliding, lock, hot set, hot index,
// index stream, dead letters, in-progress set, turn index, queued turns,
// tombstone, recorded turns, the list of Idempotency-Key hashes, then those
// hashes.
// ARGV: user, index group, our lock value, tombstone TTL (ms), keep rate
// limits (1/0), then stream ids (index stream) ... "|" ... dead-letter ids.
// -1 (nothing touched) when the lock is not ours. Else leaves the tombstone:
// the id of an entry added to the index stream and deleted at once, so every
// turn recorded before this moment has a smaller id and every later one a
// larger. Returns it.
const RedisScript kForget(R"lua(
if redis.call('GET', KEYS[5]) ~= ARGV[3] then return -1 end
redis.call('SREM', KEYS[10], ARGV[1])
local ids, dead, into = {}, {}, nil
into = ids
for i = 6, #ARGV do
  if ARGV[i] == '|' then into = dead else into[#into + 1] = ARGV[i] end
end
if #ids > 0 then
  redis.call('XACK', KEYS[8], ARGV[2], unpack(ids))
  redis.call('XDEL', KEYS[8], unpack(ids))
end
if #dead > 0 then redis.call('XDEL', KEYS[9], unpack(dead)) end
redis.call('DEL', KEYS[2], KEYS[5], KEYS[6], KEYS[7], KEYS[11], KEYS[12], KEYS[14], KEYS[15])
for i = 16, #KEYS do redis.call('DEL', KEYS[i]) end
if ARGV[5] ~= '1' then redis.call('DEL', KEYS[3], KEYS[4]) end
redis.call('ZREM', KEYS[1], ARGV[1])
local mark = redis.call('XADD', KEYS[8], '*', 'erase', ARGV[1])
redis.call('XDEL', KEYS[8], mark)
redis.call('SET', KEYS[13], mark, 'PX', ARGV[4])
return mark
)lua");

// KEYS: index stream. ARGV: group, tombstone, then stream ids of the user.
// Drops the entries older than the tombstone: turns that chats fenced by the
// erase recorded after its first look at the stream. Returns their ids.
const RedisScript kDropBeforeTombstone(R"lua(
local tm, tq = string.match(ARGV[2], '^(%d+)-(%d+)$')
tm, tq = tonumber(tm), tonumber(tq)
local dropped = {}
for i = 3, #ARGV do
  local m, q = string.match(ARGV[i], '^(%d+)-(%d+)$')
  m, q = tonumber(m), tonumber(q)
  if m < tm or (m == tm and q < tq) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
)lua");

// KEYS: lock, in-progress set. ARGV: user, value. Compare-and-delete of the
// user's lock, and the user is no longer in progress.
const RedisScript kReleaseLock(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
)lua");

// KEYS: lock, in-progress set. ARGV: user, purpose. Releases a lock a killed
// migration left (the caller holds the lease, so its owner is gone).
const RedisScript kReleaseAbandoned(R"lua(
local held = redis.call('GET', KEYS[1])
if not held or string.match(held, '^[^:]*') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
)lua");

// Views of owned strings, for the client's argument lists.
std::vector<std::string_view> Views(const std::vector<std::string>& strings) {
  return std::vector<std::string_view>(strings.begin(), strings.end());
}

Result<RedisValue> CommandOk(RedisClient& redis, const std::vector<std::string_view>& argv, std::string_view what) {
  Result<RedisValue> r = redis.Command(argv);
  if (!r.ok()) return r.status();
  if (r->is_error()) return RedisReplyError(r->str, what);
  return r;
}

Result<RedisValue> EvalOk(RedisClient& redis, const RedisScript& script, const std::vector<std::string_view>& keys,
                          const std::vector<std::string_view>& args, std::string_view what) {
  Result<RedisValue> r = redis.Eval(script, keys, args);
  if (!r.ok()) return r.status();
  if (r->is_error()) return RedisReplyError(r->str, what);
  return r;
}

// The KEYS both removal scripts (archive, forget) start with: activity,
// recent, rl fixed, rl sliding, lock, hot set, hot index, index stream.
std::vector<std::string> RemovalKeys(const UserId& user_id) {
  const int shard = ShardOf(user_id);
  return {ActivityKey(shard), RecentKey(user_id), RateKey(user_id, RateCounter::kChatFixed),
          RateKey(user_id, RateCounter::kChatSliding), CleanupLockKey(user_id), HotKey(user_id),
          HotIndexKey(user_id), IndexStreamKey(shard)};
}

}  // namespace

// ---- The index stream -------------------------------------------------------

std::vector<IndexEntry> ParseIndexEntries(const RedisValue& list, std::vector<std::string>* deleted) {
  std::vector<IndexEntry> out;
  out.reserve(list.elements.size());
  for (const RedisValue& item : list.elements) {
    if (item.elements.size() != 2) continue;
    if (item.elements[1].elements.empty()) {
      if (deleted != nullptr) deleted->push_back(item.elements[0].str);
      continue;
    }
    IndexEntry e;
    e.stream_id = item.elements[0].str;
    const auto& fields = item.elements[1].elements;
    for (size_t i = 0; i + 1 < fields.size(); i += 2) {
      const std::string& k = fields[i].str;
      const std::string& v = fields[i + 1].str;
      if (k == "user") {
        e.user = v;
      } else if (k == "turn") {
        e.turn = v;
      } else if (k == "ts") {
        e.ts = std::strtoll(v.c_str(), nullptr, 10);
      } else if (k == "u") {
        e.user_text = v;
      } else if (k == "a") {
        e.assistant_text = v;
      } else if (k == "emb") {
        UnpackEmbedding(v, e.user_embedding);
      }
    }
    out.push_back(std::move(e));
  }
  return out;
}

Result<std::map<UserId, std::vector<IndexEntry>>> ReadQueuedTurns(RedisClient& redis,
                                                                   const std::vector<UserId>& users) {
  // By shard (only their streams are read), then by the entries' user field.
  std::map<int, std::map<std::string, const UserId*, std::less<>>> wanted;
  for (const UserId& u : users) wanted[ShardOf(u)].emplace(u.str(), &u);
  std::map<UserId, std::vector<IndexEntry>> out;
  const std::string page = std::to_string(kStreamPage);
  for (const auto& [shard, names] : wanted) {
    const std::string stream = IndexStreamKey(shard);
    std::string start = "-";
    for (;;) {
      Result<RedisValue> r = CommandOk(redis, {"XRANGE", stream, start, "+", "COUNT", page}, "XRANGE");
      if (!r.ok()) return r.status();
      for (IndexEntry& e : ParseIndexEntries(*r)) {
        if (auto it = names.find(e.user); it != names.end()) out[*it->second].push_back(std::move(e));
      }
      if (r->elements.size() < static_cast<size_t>(kStreamPage)) break;
      start = "(" + r->elements.back().elements[0].str;  // exclusive: after the last id seen
    }
  }
  return out;
}

Result<std::vector<IndexEntry>> ReadDeadLetters(RedisClient& redis, const UserId& user_id) {
  // Rare: the dead-letter stream is normally empty, and bounded.
  const std::string key = DeadLetterKey(ShardOf(user_id));
  Result<RedisValue> dead = CommandOk(redis, {"XRANGE", key, "-", "+"}, "XRANGE");
  if (!dead.ok()) return dead.status();
  std::vector<IndexEntry> out;
  for (IndexEntry& e : ParseIndexEntries(*dead)) {
    if (e.user == user_id) out.push_back(std::move(e));
  }
  return out;
}

// ---- The record script ------------------------------------------------------

Result<RecordTurnCall> RecordTurnCall::Make(const Turn& turn, int recent_messages,
                                            std::string_view recorded_window_ms) {
  RecordTurnCall call;
  const UserId& user = turn.user_id;
  call.keys_ = {RecentKey(user),   IndexStreamKey(ShardOf(user)), ActivityKey(ShardOf(user)),
                RecordedTurnsKey(user), InflightKey(user),        TombstoneKey(user),
                TurnIndexKey(user), QueuedTurnsKey(user)};
  call.args_ = {turn.user_id.str(),
                turn.turn_id,
                turn.user_message,
                turn.assistant_message,
                std::to_string(recent_messages),
                PackEmbedding(turn.user_embedding),
                turn.release_lease_id,
                std::string(recorded_window_ms),
                turn.fence};
  if (turn.idempotency != nullptr) {
    Result<std::string> name = IdempotencyRedisKey(user, turn.idempotency->key);
    if (!name.ok()) return name.status();
    call.keys_.push_back(std::move(*name));
    call.args_.insert(call.args_.end(), {turn.idempotency->token, turn.idempotency->fingerprint,
                                         std::to_string(turn.idempotency->keep_ms)});
  }
  return call;
}

Result<RedisValue> RecordTurnCall::Run(RedisClient& redis, bool* may_have_run) const {
  return redis.Eval(kRecordTurn, Views(keys_), Views(args_), may_have_run);
}

Status RecordReplyStatus(const RedisValue& reply) {
  const auto& e = reply.elements;
  if (reply.type == RedisValue::Type::kArray && !e.empty()) {
    const std::string& verdict = e[0].str;
    if (verdict == "recorded" || verdict == "already") return Status::Ok();
    if (verdict == "erased") {
      return Status(Code::kConflict, "memory_erased",
                    "The user's memory was erased while this chat was in flight; nothing of it was kept");
    }
    if (verdict == "key_busy") {
      return Status(Code::kConflict, std::string(kKeyInProgress), "another request holds the idempotency key");
    }
    if (verdict == "key_done") {
      return Status(Code::kConflict, std::string(kKeyCompleted), "another request answered the idempotency key");
    }
  }
  return Internal("record_bad_reply", "internal error: unexpected reply from the record-turn script");
}

// ---- Hot set and turn index -------------------------------------------------

void AppendHotSetArgs(const StoredMessage& m, std::deque<std::string>& backing, std::vector<std::string_view>& args) {
  args.push_back(m.id);
  args.push_back(backing.emplace_back(std::to_string(m.ts_ms)));
  args.push_back(backing.emplace_back(PackHotRecord(m)));
}

Status AddToTurnIndex(RedisClient& redis, const UserId& user_id, const std::vector<StoredMessage>& messages) {
  std::set<std::string> members;  // both halves of a turn name it once
  for (const StoredMessage& m : messages) members.insert(TurnIndexMember(m.ts_ms, m.turn_id));
  const std::string key = TurnIndexKey(user_id);
  std::vector<std::string_view> cmd;
  for (auto it = members.begin(); it != members.end();) {
    cmd = {"ZADD", key};
    for (size_t n = 0; n < kTurnIndexChunk && it != members.end(); ++n, ++it) {
      cmd.push_back("0");
      cmd.push_back(*it);
    }
    auto r = redis.Command(cmd);
    if (!r.ok()) return r.status();
    if (r->is_error()) return Unavailable("redis_error", "filling the turn index failed: " + r->str);
  }
  return Status::Ok();
}

Status AddToHotSet(RedisClient& redis, const UserId& user_id, const std::vector<StoredMessage>& messages,
                   int bound) {
  if (messages.empty()) return Status::Ok();
  // Only the newest `bound` can stay: sending more would be trimmed at once.
  std::vector<const StoredMessage*> newest;
  for (const StoredMessage& m : messages) newest.push_back(&m);
  std::sort(newest.begin(), newest.end(),
            [](const StoredMessage* a, const StoredMessage* b) { return a->ts_ms > b->ts_ms; });
  if (newest.size() > static_cast<size_t>(bound)) newest.resize(static_cast<size_t>(bound));
  const std::string hot = HotKey(user_id), index = HotIndexKey(user_id), bound_text = std::to_string(bound);
  std::deque<std::string> backing;
  std::vector<std::string_view> args = {bound_text};
  for (const StoredMessage* m : newest) AppendHotSetArgs(*m, backing, args);
  auto r = redis.Eval(kAddToHot, {hot, index}, args);
  if (!r.ok()) return r.status();
  if (r->is_error()) return Unavailable("redis_error", "filling the hot set failed: " + r->str);
  return Status::Ok();
}

// ---- The indexer's side of the cleanup handshake ----------------------------

Result<std::vector<RedisValue>> BeginIndexing(RedisClient& redis, std::string_view consumer, int64_t marker_ttl_ms,
                                              const std::vector<BeginIndexingRequest>& users) {
  const std::string ttl = std::to_string(marker_ttl_ms);
  std::deque<std::string> backing;  // owns what the calls view
  std::vector<RedisClient::ScriptCall> calls;
  for (const BeginIndexingRequest& u : users) {
    RedisClient::ScriptCall call{{backing.emplace_back(CleanupLockKey(u.user)), backing.emplace_back(IndexingKey(u.user)),
                                  backing.emplace_back(IndexStreamKey(ShardOf(u.user))),
                                  backing.emplace_back(TombstoneKey(u.user))},
                                 {ttl, kIndexGroup, consumer}};
    for (const auto& [id, deliveries] : u.entries) {
      call.args.push_back(id);
      call.args.push_back(backing.emplace_back(std::to_string(deliveries)));
    }
    calls.push_back(std::move(call));
  }
  return redis.EvalMany(kBeginIndexing, calls);
}

Result<std::vector<RedisValue>> FinishIndexing(RedisClient& redis, int hot_bound,
                                               const std::vector<FinishIndexingRequest>& users) {
  const std::string bound = std::to_string(hot_bound);
  std::deque<std::string> backing;
  std::vector<RedisClient::ScriptCall> calls;
  for (const FinishIndexingRequest& u : users) {
    RedisClient::ScriptCall call{{backing.emplace_back(CleanupLockKey(u.user)), backing.emplace_back(IndexingKey(u.user)),
                                  backing.emplace_back(IndexStreamKey(ShardOf(u.user))), backing.emplace_back(HotKey(u.user)),
                                  backing.emplace_back(HotIndexKey(u.user)), backing.emplace_back(QueuedTurnsKey(u.user))},
                                 {kIndexGroup, bound, u.keep_marker ? "1" : "0",
                                  backing.emplace_back(std::to_string(u.stream_ids.size()))}};
    for (const std::string& id : u.stream_ids) call.args.push_back(id);
    for (const std::string& turn : u.turns) call.args.push_back(turn);
    for (const StoredMessage* m : u.hot) AppendHotSetArgs(*m, backing, call.args);
    calls.push_back(std::move(call));
  }
  return redis.EvalMany(kFinishIndexing, calls);
}

Result<RedisValue> RemoveGoneIndexConsumers(RedisClient& redis, int shard, std::string_view consumer,
                                            int64_t idle_ms) {
  const std::string idle = std::to_string(idle_ms), stream = IndexStreamKey(shard);
  return redis.Eval(kRemoveGoneConsumers, {stream}, {kIndexGroup, consumer, idle});
}

// ---- The cleanup's locks ----------------------------------------------------

Result<RedisValue> TakeCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value,
                                   int64_t ttl_ms, std::string_view lease) {
  Result<RedisValue> seen = CommandOk(redis, {"GET", kCleanupLeaseKey}, "lease");
  if (!seen.ok()) return seen.status();
  const std::string lock = CleanupLockKey(user_id), ttl = std::to_string(ttl_ms),
                    in_progress = CleanupInProgressKey(ShardOf(user_id));
  return EvalOk(redis, kTakeLock, {lock, in_progress}, {user_id, value, ttl, lease, seen->str}, "lock");
}

Result<RedisValue> RenewCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value,
                                    int64_t ttl_ms) {
  const std::string lock = CleanupLockKey(user_id), ttl = std::to_string(ttl_ms);
  return EvalOk(redis, kRenew, {lock}, {value, ttl}, "lock check");
}

Result<RedisValue> ReleaseCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value) {
  const std::string lock = CleanupLockKey(user_id), in_progress = CleanupInProgressKey(ShardOf(user_id));
  return EvalOk(redis, kReleaseLock, {lock, in_progress}, {user_id, value}, "release");
}

Result<RedisValue> ReleaseAbandonedLock(RedisClient& redis, const UserId& user_id, std::string_view purpose) {
  const std::string lock = CleanupLockKey(user_id), in_progress = CleanupInProgressKey(ShardOf(user_id));
  return EvalOk(redis, kReleaseAbandoned, {lock, in_progress}, {user_id, purpose}, "release");
}

Result<bool> IndexingInProgress(RedisClient& redis, const UserId& user_id) {
  const std::string marker = IndexingKey(user_id);
  Result<RedisValue> r = CommandOk(redis, {"EXISTS", marker}, "EXISTS");
  if (!r.ok()) return r.status();
  return r->integer != 0;
}

Result<std::vector<std::string>> CleanupInProgressUsers(RedisClient& redis) {
  std::vector<std::string> keys;
  std::vector<std::vector<std::string_view>> cmds;
  for (int shard = 0; shard < kRedisShards; ++shard) keys.push_back(CleanupInProgressKey(shard));
  for (const std::string& k : keys) cmds.push_back({"SMEMBERS", k});
  auto replies = redis.Pipeline(cmds);
  if (!replies.ok()) return replies.status();
  std::vector<std::string> users;
  for (RedisValue& r : *replies) {
    if (r.is_error()) return RedisReplyError(r.str, "SMEMBERS");
    for (RedisValue& u : r.elements) users.push_back(std::move(u.str));
  }
  return users;
}

Result<RedisValue> SettleInProgress(RedisClient& redis, const UserId& user_id, int64_t cutoff_ms) {
  const int shard = ShardOf(user_id);
  const std::string activity = ActivityKey(shard), lock = CleanupLockKey(user_id),
                    in_progress = CleanupInProgressKey(shard), cutoff = std::to_string(cutoff_ms);
  return EvalOk(redis, kSettleInProgress, {activity, lock, in_progress}, {user_id, cutoff}, "settling");
}

Result<RedisValue> TakeCleanupLease(RedisClient& redis, std::string_view value, int64_t ttl_ms, std::string_view gone) {
  const std::string ttl = std::to_string(ttl_ms);
  return EvalOk(redis, kTakeLease, {kCleanupLeaseKey}, {value, ttl, gone}, "lease");
}

Result<RedisValue> RenewCleanupLease(RedisClient& redis, std::string_view value, int64_t ttl_ms) {
  const std::string ttl = std::to_string(ttl_ms);
  return EvalOk(redis, kRenew, {kCleanupLeaseKey}, {value, ttl}, "lease");
}

Result<RedisValue> ReleaseCleanupLease(RedisClient& redis, std::string_view value) {
  return EvalOk(redis, kReleaseLease, {kCleanupLeaseKey}, {value}, "lease");
}

// ---- Activity ---------------------------------------------------------------

Result<RedisValue> InactiveUsersPage(RedisClient& redis, int shard, int64_t before_ms, int64_t offset, int64_t count) {
  const std::string key = ActivityKey(shard);
  const std::string cutoff = "(" + std::to_string(before_ms);  // strictly older than the threshold
  const std::string off = std::to_string(offset), n = std::to_string(count);
  return CommandOk(redis, {"ZRANGE", key, "-inf", cutoff, "BYSCORE", "LIMIT", off, n, "WITHSCORES"},
                   "ZRANGE");
}

Result<RedisValue> TrackedUsersPage(RedisClient& redis, int shard, int64_t offset, int64_t count) {
  const std::string key = ActivityKey(shard), off = std::to_string(offset), n = std::to_string(count);
  return CommandOk(redis, {"ZRANGE", key, "-inf", "+inf", "BYSCORE", "LIMIT", off, n}, "ZRANGE");
}

Result<RedisValue> LastActivity(RedisClient& redis, const UserId& user_id) {
  const std::string key = ActivityKey(ShardOf(user_id));
  return CommandOk(redis, {"ZSCORE", key, user_id}, "reading the activity");
}

Result<RedisValue> TrackActivityIfAbsent(RedisClient& redis, const UserId& user_id, int64_t now_ms) {
  const std::string key = ActivityKey(ShardOf(user_id)), score = std::to_string(now_ms);
  return CommandOk(redis, {"ZADD", key, "NX", score, user_id}, "ZADD");
}

// ---- Archive and erase ------------------------------------------------------

Result<RedisValue> FinishArchive(RedisClient& redis, const UserId& user_id, int64_t last_activity_ms,
                                 std::string_view lock_value, const std::vector<std::string>& stream_ids) {
  std::vector<std::string> keys = RemovalKeys(user_id);
  keys.insert(keys.end(), {CleanupInProgressKey(ShardOf(user_id)), RecordedTurnsKey(user_id), TurnIndexKey(user_id),
                           QueuedTurnsKey(user_id)});
  const std::string score = std::to_string(last_activity_ms);
  std::vector<std::string_view> args = {user_id, score, kIndexGroup, lock_value};
  for (const std::string& id : stream_ids) args.push_back(id);
  return EvalOk(redis, kFinishArchive, Views(keys), args, "finishing the archive");
}

Result<UserFootprint> ReadUserFootprint(RedisClient& redis, const UserId& user_id) {
  const std::string recent = RecentKey(user_id), turns = TurnIndexKey(user_id), hot = HotKey(user_id),
                    idem_list = IdempotencyKeysKey(user_id);
  auto held = redis.Pipeline(
      {{"LRANGE", recent, "0", "-1"}, {"ZRANGE", turns, "0", "-1"}, {"HKEYS", hot}, {"ZRANGE", idem_list, "0", "-1"}});
  if (!held.ok()) return held.status();
  for (const RedisValue& r : *held) {
    if (r.is_error()) return Unavailable("redis_error", "reading the user's keys failed: " + r.str);
  }
  UserFootprint out{std::move((*held)[0]), std::move((*held)[1]), std::move((*held)[2]), {}};
  // The Idempotency-Key answers hold reply texts: they go too. Only names
  // under the user's own prefix, whatever the list says.
  for (RedisValue& e : (*held)[3].elements) {
    if (IsIdempotencyKeyOf(user_id, e.str)) out.idempotency_keys.push_back(std::move(e.str));
  }
  return out;
}

Result<RedisValue> ForgetUser(RedisClient& redis, const UserId& user_id, std::string_view lock_value,
                              int64_t tombstone_ttl_ms, bool keep_rate_limits,
                              const std::vector<std::string>& stream_ids, const std::vector<std::string>& dead_ids,
                              const std::vector<std::string>& idempotency_keys) {
  std::vector<std::string> keys = RemovalKeys(user_id);
  keys.insert(keys.end(), {DeadLetterKey(ShardOf(user_id)), CleanupInProgressKey(ShardOf(user_id)), TurnIndexKey(user_id),
                           QueuedTurnsKey(user_id), TombstoneKey(user_id), RecordedTurnsKey(user_id),
                           IdempotencyKeysKey(user_id)});
  keys.insert(keys.end(), idempotency_keys.begin(), idempotency_keys.end());
  const std::string ttl = std::to_string(tombstone_ttl_ms);
  std::vector<std::string_view> args = {user_id, kIndexGroup, lock_value, ttl, keep_rate_limits ? "1" : "0"};
  for (const std::string& id : stream_ids) args.push_back(id);
  args.push_back("|");
  for (const std::string& id : dead_ids) args.push_back(id);
  return EvalOk(redis, kForget, Views(keys), args, "forget");
}

Result<RedisValue> DropBeforeTombstone(RedisClient& redis, const UserId& user_id, std::string_view tombstone,
                                       const std::vector<std::string>& stream_ids) {
  std::vector<std::string_view> args = {kIndexGroup, tombstone};
  for (const std::string& id : stream_ids) args.push_back(id);
  const std::string stream = IndexStreamKey(ShardOf(user_id));
  return EvalOk(redis, kDropBeforeTombstone, {stream}, args, "dropping fenced turns");
}

// ---- Moving a deployment from the layout before the shards -----------------

namespace {

constexpr std::string_view kOldIndexStreamKey = "chatd:index";
constexpr std::string_view kOldDeadLetterKey = "chatd:index:dead";
constexpr std::string_view kOldActivityKey = "chatd:activity";
constexpr std::string_view kOldInProgressKey = "chatd:cleanup:inprogress";
constexpr std::string_view kOldUserKeyPattern = "chat:{*}:*";
constexpr std::string_view kOldUserKeyStart = "chat:{";
constexpr std::string_view kOldUserKeyTagEnd = "}:";
constexpr int kMigrateScanCount = 1000;

// KEYS: the old key, its new name. ARGV: the user's old key prefix, the new.
// Moves one key. When the new key exists already (written by the new version
// since the upgrade), lists and hashes are merged into it (the old messages
// before the new ones; fields the new key holds win), sorted sets merged, and
// the old string or set, older, goes. Members naming the user's old keys (the
// list of Idempotency-Key hashes) are renamed with them. Returns 0 when the
// old key is gone already.
const RedisScript kMigrateUserKey(R"lua(
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return 0 end
local fresh = redis.call('EXISTS', KEYS[2]) == 0
if fresh and t ~= 'zset' then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
if t == 'zset' then
  local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #items, 2 do
    local m = items[i]
    if string.sub(m, 1, #ARGV[1]) == ARGV[1] then m = ARGV[2] .. string.sub(m, #ARGV[1] + 1) end
    redis.call('ZADD', KEYS[2], 'NX', items[i + 1], m)
  end
  if fresh then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
elseif t == 'hash' then
  local items = redis.call('HGETALL', KEYS[1])
  for i = 1, #items, 2 do redis.call('HSETNX', KEYS[2], items[i], items[i + 1]) end
elseif t == 'list' then
  local items = redis.call('LRANGE', KEYS[1], 0, -1)
  for i = #items, 1, -1 do redis.call('LPUSH', KEYS[2], items[i]) end
end
redis.call('DEL', KEYS[1])
return 1
)lua");

// KEYS: the old stream, the new, the user's queued turns. ARGV: entry id, turn
// id ('' for a dead letter). Moves one entry, under its own id when the new
// stream allows it (its last id is lower), else under a new one, which the
// queued-turn hash then names. Returns 0 when the entry is gone already.
const RedisScript kMigrateEntry(R"lua(
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local ok, id = pcall(redis.call, 'XADD', KEYS[2], ARGV[1], unpack(e[1][2]))
if not ok then id = redis.call('XADD', KEYS[2], '*', unpack(e[1][2])) end
if id ~= ARGV[1] and ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[2], id)
end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
)lua");

// KEYS: the old activity index, the shard's. ARGV: user. The later activity
// wins. Returns 0 when the user is gone already.
const RedisScript kMigrateActivity(R"lua(
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZADD', KEYS[2], 'GT', score, ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
)lua");

// KEYS: the old in-progress set, the shard's. ARGV: user.
const RedisScript kMigrateInProgress(R"lua(
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
)lua");

Result<int64_t> EvalCount(RedisClient& redis, const RedisScript& script, const std::vector<std::string_view>& keys,
                          const std::vector<std::string_view>& args, bool dry_run) {
  if (dry_run) return 1;
  Result<RedisValue> r = EvalOk(redis, script, keys, args, "moving a key");
  if (!r.ok()) return r.status();
  return r->integer;
}

// The per-user keys of the old layout.
Status MigrateUserKeys(RedisClient& redis, bool dry_run, KeyMigrationSummary& sum) {
  const std::string count = std::to_string(kMigrateScanCount);
  std::string cursor = "0";
  do {
    Result<RedisValue> page =
        CommandOk(redis, {"SCAN", cursor, "MATCH", kOldUserKeyPattern, "COUNT", count}, "SCAN");
    if (!page.ok()) return page.status();
    if (page->elements.size() != 2) return Unavailable("redis_error", "SCAN answered oddly");
    cursor = page->elements[0].str;
    for (const RedisValue& k : page->elements[1].elements) {
      const std::string& old_key = k.str;
      const size_t tag_end = old_key.find(kOldUserKeyTagEnd);
      if (old_key.rfind(kOldUserKeyStart, 0) != 0 || tag_end == std::string::npos) continue;
      const std::optional<UserId> user =
          UserId::Parse(std::string_view(old_key).substr(kOldUserKeyStart.size(), tag_end - kOldUserKeyStart.size()));
      if (!user) continue;  // not ours: chatd never wrote it
      const std::string name = old_key.substr(tag_end + kOldUserKeyTagEnd.size());
      const std::string new_key = ShardedUserKey(*user, name);
      const std::string old_prefix = UserKey(*user, ""), new_prefix = ShardedUserKey(*user, "");
      Result<int64_t> moved = EvalCount(redis, kMigrateUserKey, {old_key, new_key}, {old_prefix, new_prefix}, dry_run);
      if (!moved.ok()) return moved.status();
      sum.user_keys += *moved;
    }
  } while (cursor != "0");
  return Status::Ok();
}

// The entries of an old stream (queued turns or dead letters) to their
// shards' streams. Adds the shards that received any to `touched`.
Status MigrateStream(RedisClient& redis, std::string_view old_stream, bool dead, bool dry_run, int64_t& moved,
                     std::set<int>& touched) {
  const std::string page = std::to_string(kStreamPage);
  std::string start = "-";
  for (;;) {
    Result<RedisValue> r = CommandOk(redis, {"XRANGE", old_stream, start, "+", "COUNT", page}, "XRANGE");
    if (!r.ok()) return r.status();
    for (const IndexEntry& e : ParseIndexEntries(*r)) {
      const std::optional<UserId> user = UserId::Parse(e.user);
      if (!user) continue;  // not a turn (an erase mark is deleted as it is made)
      const int shard = ShardOf(*user);
      const std::string to = dead ? DeadLetterKey(shard) : IndexStreamKey(shard), queued = QueuedTurnsKey(*user);
      Result<int64_t> n = EvalCount(redis, kMigrateEntry, {old_stream, to, queued},
                                    {e.stream_id, dead ? std::string_view() : std::string_view(e.turn)}, dry_run);
      if (!n.ok()) return n.status();
      moved += *n;
      if (*n > 0) touched.insert(shard);
    }
    if (r->elements.size() < static_cast<size_t>(kStreamPage)) return Status::Ok();
    start = "(" + r->elements.back().elements[0].str;
  }
}

// Every member of an old global set (activity or in progress) to its shard's.
Status MigrateMembers(RedisClient& redis, std::string_view old_key, bool activity, bool dry_run, int64_t& moved) {
  const std::string count = std::to_string(kMigrateScanCount);
  std::string cursor = "0";
  do {
    Result<RedisValue> page = CommandOk(
        redis, {activity ? "ZSCAN" : "SSCAN", old_key, cursor, "COUNT", count}, activity ? "ZSCAN" : "SSCAN");
    if (!page.ok()) return page.status();
    if (page->elements.size() != 2) return Unavailable("redis_error", "SCAN answered oddly");
    cursor = page->elements[0].str;
    const auto& items = page->elements[1].elements;
    for (size_t i = 0; i < items.size(); i += activity ? 2 : 1) {
      // Only our scripts wrote these, with parsed ids: a member that is no
      // id is not ours, and stays behind in the old set.
      const std::optional<UserId> user = UserId::Parse(items[i].str);
      if (!user) continue;
      const int shard = ShardOf(*user);
      const std::string to = activity ? ActivityKey(shard) : CleanupInProgressKey(shard);
      Result<int64_t> n =
          EvalCount(redis, activity ? kMigrateActivity : kMigrateInProgress, {old_key, to}, {*user}, dry_run);
      if (!n.ok()) return n.status();
      moved += *n;
    }
  } while (cursor != "0");
  return Status::Ok();
}

}  // namespace

Result<KeyMigrationSummary> MigrateKeysToShards(RedisClient& redis, bool dry_run) {
  KeyMigrationSummary sum;
  // The user's keys first: a moved turn's queued-turn hash is then in place
  // for the entry's move to update.
  if (Status s = MigrateUserKeys(redis, dry_run, sum); !s.ok()) return s;
  std::set<int> touched;
  if (Status s = MigrateStream(redis, kOldIndexStreamKey, false, dry_run, sum.stream_entries, touched); !s.ok()) {
    return s;
  }
  std::set<int> dead_touched;
  if (Status s = MigrateStream(redis, kOldDeadLetterKey, true, dry_run, sum.dead_letters, dead_touched); !s.ok()) {
    return s;
  }
  if (Status s = MigrateMembers(redis, kOldActivityKey, true, dry_run, sum.activity); !s.ok()) return s;
  if (Status s = MigrateMembers(redis, kOldInProgressKey, false, dry_run, sum.in_progress); !s.ok()) return s;
  if (dry_run) return sum;
  // Moved turns may sit below what a shard's group delivered already: from 0,
  // the group hands out every turn still in the stream (acknowledged ones are
  // deleted), so none is skipped.
  for (int shard : touched) {
    const std::string stream = IndexStreamKey(shard);
    Result<RedisValue> made = redis.Command({"XGROUP", "CREATE", stream, kIndexGroup, "0", "MKSTREAM"});
    if (!made.ok()) return made.status();
    if (made->is_error()) {
      if (made->str.rfind("BUSYGROUP", 0) != 0) return RedisReplyError(made->str, "XGROUP CREATE");
      if (auto set = CommandOk(redis, {"XGROUP", "SETID", stream, kIndexGroup, "0"}, "XGROUP SETID"); !set.ok()) {
        return set.status();
      }
    }
  }
  // The emptied old streams go, with their group.
  for (std::string_view old : {kOldIndexStreamKey, kOldDeadLetterKey}) {
    Result<RedisValue> len = CommandOk(redis, {"XLEN", old}, "XLEN");
    if (!len.ok()) return len.status();
    if (len->integer == 0) {
      if (auto del = CommandOk(redis, {"DEL", old}, "DEL"); !del.ok()) return del.status();
    }
  }
  return sum;
}

}  // namespace chatd
