#include "chatd/redis_memory.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>
#include <unordered_set>

#include "chatd/redis_idempotency.h"
#include "chatd/redis_rate_limiter.h"
#include "chatd/user_id.h"

namespace chatd {

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

}  // namespace

const char kHotSetAddLua[] = R"lua(
for i = first, #ARGV, 3 do
  redis.call('HSET', hot_key, ARGV[i], ARGV[i + 2])
  redis.call('ZADD', hot_index_key, ARGV[i + 1], ARGV[i])
end
local over = redis.call('ZCARD', hot_index_key) - bound
if over > 0 then
  local oldest = redis.call('ZPOPMIN', hot_index_key, over)
  for i = 1, #oldest, 2 do redis.call('HDEL', hot_key, oldest[i]) end
end
)lua";

namespace {

// KEYS: hot set, hot index. ARGV: bound, then (message id, ts, packed) triples.
const RedisScript kAddToHot(std::string(R"lua(
local hot_key, hot_index_key, bound, first = KEYS[1], KEYS[2], tonumber(ARGV[1]), 2
)lua") + kHotSetAddLua);

}  // namespace

std::string TurnIndexMember(int64_t ts_ms, std::string_view turn_id) {
  std::string ts = std::to_string(ts_ms < 0 ? 0 : ts_ms);
  std::string out(ts.size() < kTurnIndexTsDigits ? kTurnIndexTsDigits - ts.size() : 0, '0');
  out.append(ts).append(":").append(turn_id);
  return out;
}

Status AddToTurnIndex(RedisClient& redis, std::string_view user_id, const std::vector<StoredMessage>& messages) {
  std::set<std::string> members;  // both halves of a turn name it once
  for (const StoredMessage& m : messages) members.insert(TurnIndexMember(m.ts_ms, m.turn_id));
  const std::string key = TurnIndexKey(user_id);
  // Chunks keep each command's size bounded for a user with a long history.
  constexpr size_t kChunk = 500;
  std::vector<std::string_view> cmd;
  for (auto it = members.begin(); it != members.end();) {
    cmd = {"ZADD", key};
    for (size_t n = 0; n < kChunk && it != members.end(); ++n, ++it) {
      cmd.push_back("0");
      cmd.push_back(*it);
    }
    auto r = redis.Command(cmd);
    if (!r.ok()) return r.status();
    if (r->is_error()) return Unavailable("redis_error", "filling the turn index failed: " + r->str);
  }
  return Status::Ok();
}

void AppendHotSetArgs(const StoredMessage& m, std::deque<std::string>& backing, std::vector<std::string_view>& args) {
  args.push_back(m.id);
  args.push_back(backing.emplace_back(std::to_string(m.ts_ms)));
  args.push_back(backing.emplace_back(PackHotRecord(m)));
}

Status AddToHotSet(RedisClient& redis, std::string_view user_id, const std::vector<StoredMessage>& messages,
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

std::string_view RoleName(Role role) { return role == Role::kUser ? "user" : "assistant"; }

Result<Message> ParseRecentEntry(std::string_view json) {
  auto bad = [] { return Internal("bad_memory_entry", "A stored message is malformed"); };
  rapidjson::Document doc;
  doc.Parse<rapidjson::kParseIterativeFlag>(json.data(), json.size());
  if (doc.HasParseError() || !doc.IsObject()) return bad();
  auto role = doc.FindMember("role");
  auto content = doc.FindMember("content");
  auto ts = doc.FindMember("ts");
  auto id = doc.FindMember("id");
  if (role == doc.MemberEnd() || !role->value.IsString() || content == doc.MemberEnd() ||
      !content->value.IsString() || ts == doc.MemberEnd() || !ts->value.IsNumber() || id == doc.MemberEnd() ||
      !id->value.IsString()) {
    return bad();
  }
  Message m;
  std::string_view r(role->value.GetString(), role->value.GetStringLength());
  if (r == "user") {
    m.role = Role::kUser;
  } else if (r == "assistant") {
    m.role = Role::kAssistant;
  } else {
    return bad();
  }
  m.content.assign(content->value.GetString(), content->value.GetStringLength());
  m.ts_ms = static_cast<int64_t>(ts->value.GetDouble());
  m.id.assign(id->value.GetString(), id->value.GetStringLength());
  return m;
}

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

RedisShortTermStore::RedisShortTermStore(RedisClient& redis, int recent_messages, int hot_messages,
                                         int64_t recorded_window_ms, int older_by_id_max)
    : redis_(redis),
      recent_messages_(recent_messages),
      hot_messages_(hot_messages),
      recorded_window_ms_(std::to_string(recorded_window_ms)),
      older_by_id_max_(older_by_id_max),
      // Two messages a turn; ZREVRANGE's stop is inclusive, so this reads
      // (hot + max) / 2 + 1 turns, rounded up.
      turns_to_read_(std::to_string((hot_messages + older_by_id_max + 1) / 2)) {}

Result<UserMemory> RedisShortTermStore::Read(std::string_view user_id) {
  const std::string recent_key = RecentKey(user_id);
  const std::string hot_key = HotKey(user_id);
  const std::string tombstone_key = TombstoneKey(user_id);
  const std::string turns_key = TurnIndexKey(user_id);
  std::vector<std::vector<std::string_view>> commands = {
      {"LRANGE", recent_key, "0", "-1"}, {"HVALS", hot_key}, {"GET", tombstone_key}};
  // Newest first: members sort by time (TurnIndexMember) under one score.
  if (older_by_id_max_ > 0) commands.push_back({"ZREVRANGE", turns_key, "0", turns_to_read_});
  auto replies = redis_.Pipeline(commands);
  if (!replies.ok()) return replies.status();
  const RedisValue& recent = (*replies)[0];
  const RedisValue& hot = (*replies)[1];
  // A Redis still loading its data says so: the caller answers "retry soon".
  if (recent.is_error()) return RedisReplyError(recent.str, "LRANGE");
  if (hot.is_error()) return RedisReplyError(hot.str, "HVALS");
  if (recent.type != RedisValue::Type::kArray || hot.type != RedisValue::Type::kArray) {
    return Unavailable("redis_error", "reading the memory answered oddly");
  }
  UserMemory out;
  out.recent.reserve(recent.elements.size());
  for (const auto& e : recent.elements) {
    if (e.type != RedisValue::Type::kString) continue;
    Result<Message> m = ParseRecentEntry(e.str);
    if (m.ok()) out.recent.push_back(std::move(*m));  // a corrupt entry is skipped, not fatal
  }
  out.hot.reserve(hot.elements.size());
  for (auto& e : (*replies)[1].elements) {
    if (e.type == RedisValue::Type::kString) out.hot.push_back(std::move(e.str));  // decoded by recall
  }
  out.older_in_long_term = static_cast<int64_t>(hot.elements.size()) >= hot_messages_;
  const RedisValue& tombstone = (*replies)[2];
  if (tombstone.is_error()) return Unavailable("redis_error", "GET failed: " + tombstone.str);
  out.fence = tombstone.str;  // nil: no tombstone, empty
  if (out.older_in_long_term && older_by_id_max_ > 0) ListOlder((*replies)[3], out);
  return out;
}

void RedisShortTermStore::ListOlder(const RedisValue& turns, UserMemory& out) const {
  // Fewer turns than asked for means the index gave every turn of the user;
  // otherwise older ones may exist beyond it, and recall must search.
  if (turns.type != RedisValue::Type::kArray) return;
  const size_t asked = static_cast<size_t>((hot_messages_ + older_by_id_max_ + 1) / 2) + 1;
  if (turns.elements.size() >= asked) return;
  std::unordered_set<std::string> hot_ids;
  hot_ids.reserve(out.hot.size());
  HotRecordView view;
  for (const std::string& record : out.hot) {
    if (!ViewHotRecord(record, view)) return;  // cannot tell which are hot: search instead
    std::string id(view.turn_id);
    id.append(view.role == Role::kUser ? ":u" : ":a");
    hot_ids.insert(std::move(id));
  }
  std::vector<std::string> ids;
  for (const RedisValue& member : turns.elements) {
    const std::string_view turn_id = TurnOfIndexMember(member.str);
    if (member.type != RedisValue::Type::kString || turn_id.empty()) return;
    for (const char* half : {":a", ":u"}) {  // newest first: the answer follows the question
      std::string id(turn_id);
      id.append(half);
      if (hot_ids.count(id) == 0) ids.push_back(std::move(id));
    }
  }
  if (ids.size() > static_cast<size_t>(older_by_id_max_)) return;
  out.older_ids = std::move(ids);
  out.older_listed = true;
}

Status RedisShortTermStore::RecordTurn(const Turn& turn) {
  const std::string key = RecentKey(turn.user_id), recorded = RecordedTurnsKey(turn.user_id);
  const std::string inflight = InflightKey(turn.user_id);
  const std::string tombstone = TombstoneKey(turn.user_id), turns = TurnIndexKey(turn.user_id),
                    queued = QueuedTurnsKey(turn.user_id);
  std::string max_recent = std::to_string(recent_messages_);
  std::string packed = PackEmbedding(turn.user_embedding);
  std::vector<std::string_view> keys = {key, kIndexStreamKey, kActivityKey, recorded, inflight, tombstone, turns, queued};
  std::vector<std::string_view> args = {turn.user_id, turn.turn_id, turn.user_message, turn.assistant_message,
                                        max_recent,   packed,       turn.release_lease_id, recorded_window_ms_,
                                        turn.fence};
  std::string idem_key, keep_ms;
  if (turn.idempotency != nullptr) {
    Result<std::string> name = IdempotencyRedisKey(turn.user_id, turn.idempotency->key);
    if (!name.ok()) return name.status();
    idem_key = std::move(*name);
    keep_ms = std::to_string(turn.idempotency->keep_ms);
    keys.push_back(idem_key);
    args.insert(args.end(), {turn.idempotency->token, turn.idempotency->fingerprint, keep_ms});
  }
  bool sent_first = false;
  Result<RedisValue> reply = redis_.Eval(kRecordTurn, keys, args, &sent_first);
  if (reply.ok()) {
    // An error reply comes before the script writes (OOM, LOADING, BUSY...).
    if (reply->is_error()) return Unavailable("redis_error", "recording the turn failed");
    return RecordReplyStatus(*reply);
  }
  // A transport error may come after the script ran (a timeout waiting for
  // the reply): asking again is safe, because the script is idempotent by turn
  // id, and it is the only way to learn whether the turn landed.
  bool sent_again = false;
  Result<RedisValue> again = redis_.Eval(kRecordTurn, keys, args, &sent_again);
  if (again.ok() && !again->is_error()) return RecordReplyStatus(*again);
  const bool again_wrote_nothing = again.ok() || !sent_again;
  if (!sent_first && again_wrote_nothing) return Unavailable("redis_error", "recording the turn failed");
  return Status(Code::kUnavailable, std::string(kRecordOutcomeUnknown),
                "redis did not confirm the turn: it may or may not be recorded");
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

}  // namespace chatd
