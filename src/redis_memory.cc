#include "chatd/redis_memory.h"

#include <rapidjson/document.h>

#include <cstdlib>
#include <cstring>

#include "chatd/redis_rate_limiter.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// KEYS: recent list, index stream, activity zset[, the user's leases in flight].
// ARGV: user, turn id, user text, assistant text, max recent, packed embedding
// [, the lease to release].
// The timestamp comes from Redis so that every worker and host agrees on it.
// Releasing the chat's concurrency lease here saves the chat a round trip.
const RedisScript kRecordTurn(R"lua(
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local u = cjson.encode({role = 'user', content = ARGV[3], ts = ts, id = ARGV[2] .. ':u'})
local a = cjson.encode({role = 'assistant', content = ARGV[4], ts = ts, id = ARGV[2] .. ':a'})
redis.call('RPUSH', KEYS[1], u, a)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
redis.call('XADD', KEYS[2], '*', 'user', ARGV[1], 'turn', ARGV[2], 'ts', ts,
           'u', ARGV[3], 'a', ARGV[4], 'emb', ARGV[6])
redis.call('ZADD', KEYS[3], ts, ARGV[1])
if KEYS[4] then redis.call('ZREM', KEYS[4], ARGV[7]) end
return ts
)lua");

}  // namespace

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

RedisShortTermStore::RedisShortTermStore(RedisClient& redis, int recent_messages)
    : redis_(redis), recent_messages_(recent_messages) {}

Result<std::vector<Message>> RedisShortTermStore::Recent(std::string_view user_id) {
  std::string key = RecentKey(user_id);
  Result<RedisValue> reply = redis_.Command({"LRANGE", key, "0", "-1"});
  if (!reply.ok()) return reply.status();
  if (reply->type != RedisValue::Type::kArray) return Unavailable("redis_error", "LRANGE failed: " + reply->str);
  std::vector<Message> out;
  out.reserve(reply->elements.size());
  for (const auto& e : reply->elements) {
    if (e.type != RedisValue::Type::kString) continue;
    Result<Message> m = ParseRecentEntry(e.str);
    if (m.ok()) out.push_back(std::move(*m));  // a corrupt entry is skipped, not fatal
  }
  return out;
}

Status RedisShortTermStore::RecordTurn(const Turn& turn) {
  std::string key = RecentKey(turn.user_id);
  std::string max_recent = std::to_string(recent_messages_);
  std::string packed = PackEmbedding(turn.user_embedding);
  std::vector<std::string_view> keys = {key, kIndexStreamKey, kActivityKey};
  std::vector<std::string_view> args = {turn.user_id,           turn.turn_id, turn.user_message,
                                        turn.assistant_message, max_recent,   packed};
  const std::string inflight = turn.release_lease_id.empty() ? std::string() : InflightKey(turn.user_id);
  if (!inflight.empty()) {
    keys.push_back(inflight);
    args.push_back(turn.release_lease_id);
  }
  Result<RedisValue> reply = redis_.Eval(kRecordTurn, keys, args);
  if (!reply.ok()) return reply.status();
  if (reply->type == RedisValue::Type::kError) return Unavailable("redis_error", "recording the turn failed");
  return Status::Ok();
}

}  // namespace chatd
