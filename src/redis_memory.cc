#include "chatd/redis_memory.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>

#include "chatd/redis_rate_limiter.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// KEYS: recent list, index stream, activity zset, tombstone, turn index,
// queued turns[, the user's leases in flight].
// ARGV: user, turn id, user text, assistant text, max recent, packed embedding,
// the tombstone the chat read when it started[, the lease to release].
// The timestamp comes from Redis so that every worker and host agrees on it.
// Releasing the chat's concurrency lease here saves the chat a round trip.
// Returns the timestamp, or -1 when the erase fence refused the turn.
const RedisScript kRecordTurn(R"lua(
-- The erase fence (DELETE /api/memory, chatd-cleanup forget). A chat that
-- read another tombstone than the current one (none, or an older erase's)
-- started before the user's latest erase: nothing of it may be kept. The
-- tombstone outlives the longest chat, so an expired one fences nobody.
local tombstone = redis.call('GET', KEYS[4])
if tombstone and tombstone ~= ARGV[7] then return -1 end
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local u = cjson.encode({role = 'user', content = ARGV[3], ts = ts, id = ARGV[2] .. ':u'})
local a = cjson.encode({role = 'assistant', content = ARGV[4], ts = ts, id = ARGV[2] .. ':a'})
redis.call('RPUSH', KEYS[1], u, a)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
local entry = redis.call('XADD', KEYS[2], '*', 'user', ARGV[1], 'turn', ARGV[2], 'ts', ts,
                         'u', ARGV[3], 'a', ARGV[4], 'emb', ARGV[6])
redis.call('ZADD', KEYS[3], ts, ARGV[1])
redis.call('ZADD', KEYS[5], 0, string.format('%015d:%s', ts, ARGV[2]))
redis.call('HSET', KEYS[6], ARGV[2], entry)
if KEYS[7] then redis.call('ZREM', KEYS[7], ARGV[8]) end
return ts
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

std::string PackEmbedding(const std::vector<float>& v) {
  static_assert(sizeof(float) == 4);
  std::string out(v.size() * sizeof(float), '\0');
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());  // x86-64 and arm64 are little-endian
  return out;
}

bool UnpackEmbedding(std::string_view bytes, std::vector<float>& out) {
  if (bytes.size() % sizeof(float) != 0) return false;
  out.resize(bytes.size() / sizeof(float));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return true;
}

namespace {

constexpr uint8_t kHotRecordVersion = 1;
constexpr uint8_t kHotRoleUser = 0;
constexpr uint8_t kHotRoleAssistant = 1;

template <typename T>
void AppendLe(std::string& out, T v) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));  // x86-64 and arm64 are little-endian
  out.append(bytes, sizeof(T));
}

template <typename T>
bool ReadLe(std::string_view& in, T& v) {
  if (in.size() < sizeof(T)) return false;
  std::memcpy(&v, in.data(), sizeof(T));
  in.remove_prefix(sizeof(T));
  return true;
}

}  // namespace

std::string PackHotRecord(const StoredMessage& m) {
  std::string out;
  out.reserve(1 + 8 + 1 + 2 + m.turn_id.size() + 4 + m.content.size() + m.embedding.size() * sizeof(float));
  AppendLe<uint8_t>(out, kHotRecordVersion);
  AppendLe<int64_t>(out, m.ts_ms);
  AppendLe<uint8_t>(out, m.role == Role::kUser ? kHotRoleUser : kHotRoleAssistant);
  AppendLe<uint16_t>(out, static_cast<uint16_t>(m.turn_id.size()));  // turn ids are 32 hex characters
  out += m.turn_id;
  AppendLe<uint32_t>(out, static_cast<uint32_t>(m.content.size()));  // messages are bounded far below 4 GiB
  out += m.content;
  out += PackEmbedding(m.embedding);
  return out;
}

Result<StoredMessage> UnpackHotRecord(std::string_view in) {
  auto bad = [] { return Internal("bad_hot_record", "a hot-set record is malformed"); };
  uint8_t version = 0, role = 0;
  uint16_t turn_len = 0;
  uint32_t content_len = 0;
  StoredMessage m;
  if (!ReadLe(in, version) || version != kHotRecordVersion || !ReadLe(in, m.ts_ms) || !ReadLe(in, role) ||
      role > kHotRoleAssistant || !ReadLe(in, turn_len) || in.size() < turn_len) {
    return bad();
  }
  m.role = role == kHotRoleUser ? Role::kUser : Role::kAssistant;
  m.turn_id.assign(in.substr(0, turn_len));
  in.remove_prefix(turn_len);
  if (!ReadLe(in, content_len) || in.size() < content_len) return bad();
  m.content.assign(in.substr(0, content_len));
  in.remove_prefix(content_len);
  if (in.empty() || !UnpackEmbedding(in, m.embedding)) return bad();
  m.id = m.turn_id + (m.role == Role::kUser ? ":u" : ":a");
  return m;
}

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

RedisShortTermStore::RedisShortTermStore(RedisClient& redis, int recent_messages, int hot_messages)
    : redis_(redis), recent_messages_(recent_messages), hot_messages_(hot_messages) {}

Result<UserMemory> RedisShortTermStore::Read(std::string_view user_id) {
  const std::string recent_key = RecentKey(user_id);
  const std::string hot_key = HotKey(user_id);
  const std::string tombstone_key = TombstoneKey(user_id);
  auto replies =
      redis_.Pipeline({{"LRANGE", recent_key, "0", "-1"}, {"HVALS", hot_key}, {"GET", tombstone_key}});
  if (!replies.ok()) return replies.status();
  const RedisValue& recent = (*replies)[0];
  const RedisValue& hot = (*replies)[1];
  if (recent.type != RedisValue::Type::kArray) return Unavailable("redis_error", "LRANGE failed: " + recent.str);
  if (hot.type != RedisValue::Type::kArray) return Unavailable("redis_error", "HVALS failed: " + hot.str);
  UserMemory out;
  out.recent.reserve(recent.elements.size());
  for (const auto& e : recent.elements) {
    if (e.type != RedisValue::Type::kString) continue;
    Result<Message> m = ParseRecentEntry(e.str);
    if (m.ok()) out.recent.push_back(std::move(*m));  // a corrupt entry is skipped, not fatal
  }
  out.hot.reserve(hot.elements.size());
  for (const auto& e : hot.elements) {
    Result<StoredMessage> m = UnpackHotRecord(e.str);
    if (!m.ok()) continue;  // likewise: recall loses one candidate, the chat goes on
    m->user_id.assign(user_id);
    out.hot.push_back(std::move(*m));
  }
  out.older_in_long_term = static_cast<int64_t>(hot.elements.size()) >= hot_messages_;
  const RedisValue& tombstone = (*replies)[2];
  if (tombstone.is_error()) return Unavailable("redis_error", "GET failed: " + tombstone.str);
  out.fence = tombstone.str;  // nil: no tombstone, empty
  return out;
}

Status RedisShortTermStore::RecordTurn(const Turn& turn) {
  std::string key = RecentKey(turn.user_id);
  std::string tombstone = TombstoneKey(turn.user_id);
  std::string turns = TurnIndexKey(turn.user_id);
  std::string queued = QueuedTurnsKey(turn.user_id);
  std::string max_recent = std::to_string(recent_messages_);
  std::string packed = PackEmbedding(turn.user_embedding);
  std::vector<std::string_view> keys = {key, kIndexStreamKey, kActivityKey, tombstone, turns, queued};
  std::vector<std::string_view> args = {turn.user_id,           turn.turn_id, turn.user_message,
                                        turn.assistant_message, max_recent,   packed, turn.fence};
  const std::string inflight = turn.release_lease_id.empty() ? std::string() : InflightKey(turn.user_id);
  if (!inflight.empty()) {
    keys.push_back(inflight);
    args.push_back(turn.release_lease_id);
  }
  Result<RedisValue> reply = redis_.Eval(kRecordTurn, keys, args);
  if (!reply.ok()) return reply.status();
  if (reply->type == RedisValue::Type::kError) return Unavailable("redis_error", "recording the turn failed");
  if (reply->type == RedisValue::Type::kInteger && reply->integer < 0) {
    return Status(Code::kConflict, "memory_erased",
                  "The user's memory was erased while this chat was in flight; nothing of it was kept");
  }
  return Status::Ok();
}

}  // namespace chatd
