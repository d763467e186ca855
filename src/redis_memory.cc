#include "redis_memory.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>
#include <unordered_set>

#include "chatd/user_id.h"
#include "json_document.h"
#include "hot_record.h"

namespace chatd {

Result<Message> ParseRecentEntry(std::string_view json) {
  auto bad = [] { return Internal("bad_memory_entry", "A stored message is malformed"); };
  LocalJsonDocument doc;
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

RedisShortTermStore::RedisShortTermStore(RedisClient& redis, int recent_messages, int hot_messages,
                                         int64_t recorded_window_ms, int older_by_id_max)
    : redis_(redis),
      recent_messages_(recent_messages),
      hot_messages_(hot_messages),
      recorded_window_ms_(std::to_string(recorded_window_ms)),
      older_by_id_max_(older_by_id_max),
      // Two messages a turn: (hot + max) / 2 turns, rounded up, and one more.
      turns_asked_(static_cast<size_t>((hot_messages + older_by_id_max + 1) / 2) + 1),
      last_turn_rank_(std::to_string(turns_asked_ - 1)) {}

Result<UserMemory> RedisShortTermStore::Read(const UserId& user_id) {
  const ReadKeys keys = KeysToRead(user_id);
  auto replies = redis_.Pipeline(ReadCommands(keys));
  if (!replies.ok()) return replies.status();
  return FromReplies(std::move(*replies));
}

RedisShortTermStore::ReadKeys RedisShortTermStore::KeysToRead(const UserId& user_id) const {
  return ReadKeys{RecentKey(user_id), HotKey(user_id), TombstoneKey(user_id), TurnIndexKey(user_id)};
}

std::vector<std::vector<std::string_view>> RedisShortTermStore::ReadCommands(const ReadKeys& keys) const {
  std::vector<std::vector<std::string_view>> commands = {
      {"LRANGE", keys.recent, "0", "-1"}, {"HVALS", keys.hot}, {"GET", keys.tombstone}};
  // Newest first: members sort by time (TurnIndexMember) under one score.
  if (older_by_id_max_ > 0) commands.push_back({"ZREVRANGE", keys.turns, "0", last_turn_rank_});
  return commands;
}

Result<UserMemory> RedisShortTermStore::FromReplies(std::vector<RedisValue> replies) const {
  const size_t expected = older_by_id_max_ > 0 ? 4 : 3;
  if (replies.size() != expected) return Internal("redis_bad_reply", "internal error: the memory read lost replies");
  const RedisValue& recent = replies[0];
  const RedisValue& hot = replies[1];
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
  for (auto& e : replies[1].elements) {
    if (e.type == RedisValue::Type::kString) out.hot.push_back(std::move(e.str));  // decoded by recall
  }
  out.older_in_long_term = static_cast<int64_t>(hot.elements.size()) >= hot_messages_;
  const RedisValue& tombstone = replies[2];
  if (tombstone.is_error()) return Unavailable("redis_error", "GET failed: " + tombstone.str);
  out.fence = tombstone.str;  // nil: no tombstone, empty
  if (out.older_in_long_term && older_by_id_max_ > 0) ListOlder(replies[3], out);
  return out;
}

void RedisShortTermStore::ListOlder(const RedisValue& turns, UserMemory& out) const {
  // Fewer turns than asked for means the index gave every turn of the user;
  // otherwise older ones may exist beyond it, and recall must search.
  if (turns.type != RedisValue::Type::kArray) return;
  if (turns.elements.size() >= turns_asked_) return;
  std::unordered_set<std::string> hot_ids;
  hot_ids.reserve(out.hot.size());
  HotRecordView view;
  for (const std::string& record : out.hot) {
    if (!ViewHotRecord(record, view)) return;  // cannot tell which are hot: search instead
    hot_ids.insert(MessageId(view.turn_id, view.role));
  }
  std::vector<std::string> ids;
  for (const RedisValue& member : turns.elements) {
    const std::string_view turn_id = TurnOfIndexMember(member.str);
    if (member.type != RedisValue::Type::kString || turn_id.empty()) return;
    for (Role half : {Role::kAssistant, Role::kUser}) {  // newest first: the answer follows the question
      std::string id = MessageId(turn_id, half);
      if (hot_ids.count(id) == 0) ids.push_back(std::move(id));
    }
  }
  if (ids.size() > static_cast<size_t>(older_by_id_max_)) return;
  out.older_ids = std::move(ids);
  out.older_listed = true;
}

Status RedisShortTermStore::RecordTurn(const Turn& turn) {
  Result<RecordTurnCall> call = RecordTurnCall::Make(turn, recent_messages_, recorded_window_ms_);
  if (!call.ok()) return call.status();
  bool sent_first = false;
  Result<RedisValue> reply = call->Run(redis_, &sent_first);
  if (reply.ok()) {
    // An error reply comes before the script writes (OOM, LOADING, BUSY...).
    if (reply->is_error()) return Unavailable("redis_error", "recording the turn failed");
    return RecordReplyStatus(*reply);
  }
  // A transport error may come after the script ran (a timeout waiting for
  // the reply): asking again is safe, because the script is idempotent by turn
  // id, and it is the only way to learn whether the turn landed.
  bool sent_again = false;
  Result<RedisValue> again = call->Run(redis_, &sent_again);
  if (again.ok() && !again->is_error()) return RecordReplyStatus(*again);
  const bool again_wrote_nothing = again.ok() || !sent_again;
  if (!sent_first && again_wrote_nothing) return Unavailable("redis_error", "recording the turn failed");
  return Status(Code::kUnavailable, std::string(kRecordOutcomeUnknown),
                "redis did not confirm the turn: it may or may not be recorded");
}

}  // namespace chatd
