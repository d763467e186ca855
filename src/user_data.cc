#include "chatd/user_data.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <ctime>
#include <map>
#include <set>

#include "archive.h"
#include "chroma.h"
#include "chatd/clock.h"
#include "decimal.h"
#include "json.h"
#include "chatd/log.h"
#include "hot_record.h"
#include "redis_memory.h"
#include "json_writer.h"

namespace chatd {

namespace {

// Longest turn id a cursor may carry: ours are 32 hex characters; restored
// archives carry the ids they were written with.
constexpr size_t kMaxCursorTurnId = 64;

bool IsCursorTurnChar(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' || c == '_';
}

int64_t MemberTs(std::string_view member) {
  std::optional<int64_t> ts = ParseDecimal(member.substr(0, kTurnIndexTsDigits));
  return ts ? *ts : 0;
}

// RFC 3339 in UTC with milliseconds: "2026-11-28T15:04:05.123Z".
std::string Rfc3339(int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  char out[40];
  std::snprintf(out, sizeof(out), "%s.%03dZ", buf, static_cast<int>(ms % 1000));
  return out;
}

void WriteMessage(JsonWriter& w, const HistoryMessage& m) {
  w.StartObject();
  w.Key("role").String(RoleName(m.role));
  w.Key("content").String(m.content);
  w.Key("at").String(Rfc3339(m.ts_ms));
  w.Key("turnId").String(m.turn_id);
  w.EndObject();
}

Status RedisError(const RedisValue& r, std::string_view what) {
  if (r.is_error()) return Unavailable("memory_unavailable", std::string(what) + " failed: " + r.str);
  return Status::Ok();
}

}  // namespace

std::string FormatCursor(const HistoryCursor& cursor) {
  return MessageId(cursor.member, cursor.role);
}

std::optional<HistoryCursor> ParseCursor(std::string_view text) {
  // <15 digits>:<turn id>:<u|a>
  if (text.size() < kTurnIndexTsDigits + 4 || text[kTurnIndexTsDigits] != ':') return std::nullopt;
  for (size_t i = 0; i < kTurnIndexTsDigits; ++i) {
    if (text[i] < '0' || text[i] > '9') return std::nullopt;
  }
  // The turn index's member and the message's half, as a message id is made.
  const std::optional<TurnAndRole> parts = SplitMessageId(text);
  if (!parts) return std::nullopt;
  std::string_view turn = parts->turn.substr(kTurnIndexTsDigits + 1);
  if (turn.empty() || turn.size() > kMaxCursorTurnId) return std::nullopt;
  for (char c : turn) {
    if (!IsCursorTurnChar(c)) return std::nullopt;
  }
  HistoryCursor c;
  c.member.assign(parts->turn);
  c.role = parts->role;
  return c;
}

UserData::UserData(RedisClient& redis, ChromaStore& chroma, Cleanup& cleanup, std::string archive_dir)
    : redis_(redis), chroma_(chroma), cleanup_(cleanup), archive_dir_(std::move(archive_dir)) {}

Result<int64_t> UserData::RestoreIfArchived(const UserId& user_id) {
  // One stat per request: the common answer (no archive) costs no more.
  struct stat st {};
  const std::string dir = ArchiveUserDir(archive_dir_, user_id);
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return 0;
    return Unavailable("archive_unavailable", "the archive directory cannot be read");
  }
  auto started = SteadyClock::now();
  Result<int64_t> restored = cleanup_.Restore(user_id);
  const double ms = std::chrono::duration<double, std::milli>(SteadyClock::now() - started).count();
  if (!restored.ok()) {
    LogWarn("auto_restore_failed")
        .Str("user", std::string(user_id))
        .Str("reason", restored.status().reason())
        .Str("detail", restored.status().message())
        .Emit();
    return restored;
  }
  LogInfo("auto_restore").Str("user", std::string(user_id)).Int("records", *restored).Num("ms", ms).Emit();
  return restored;
}

Result<std::vector<HistoryMessage>> UserData::Fetch(const UserId& user_id,
                                                    const std::vector<std::pair<std::string, Role>>& slots) {
  std::vector<HistoryMessage> out;
  if (slots.empty()) return out;
  const std::string recent_key = RecentKey(user_id), hot_key = HotKey(user_id), queued_key = QueuedTurnsKey(user_id);
  std::vector<std::string> ids, turns;
  std::set<std::string> seen_turns;
  for (const auto& [member, role] : slots) {
    std::string turn(TurnOfIndexMember(member));
    ids.push_back(MessageId(turn, role));
    if (seen_turns.insert(turn).second) turns.push_back(turn);
  }
  std::vector<std::string_view> hmget_hot = {"HMGET", hot_key}, hmget_queued = {"HMGET", queued_key};
  for (const std::string& id : ids) hmget_hot.push_back(id);
  for (const std::string& t : turns) hmget_queued.push_back(t);
  auto replies = redis_.Pipeline({{"LRANGE", recent_key, "0", "-1"}, hmget_hot, hmget_queued});
  if (!replies.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly");
  for (const RedisValue& r : *replies) {
    if (Status s = RedisError(r, "reading the history"); !s.ok()) return s;
  }

  std::map<std::string, std::string> found;  // message id -> content
  for (const RedisValue& e : (*replies)[0].elements) {
    Result<Message> m = ParseRecentEntry(e.str);
    if (m.ok()) found[m->id] = std::move(m->content);
  }
  const RedisValue& hot = (*replies)[1];
  for (size_t i = 0; i < hot.elements.size() && i < ids.size(); ++i) {
    if (hot.elements[i].type != RedisValue::Type::kString) continue;
    Result<StoredMessage> m = UnpackHotRecord(hot.elements[i].str);
    if (m.ok() && m->id == ids[i]) found.emplace(ids[i], std::move(m->content));
  }
  // Turns still waiting for the indexer: their stream entries, by id.
  const RedisValue& queued = (*replies)[2];
  const std::string stream = IndexStreamKey(ShardOf(user_id));
  std::vector<std::vector<std::string_view>> xranges;
  for (size_t i = 0; i < queued.elements.size() && i < turns.size(); ++i) {
    if (queued.elements[i].type != RedisValue::Type::kString) continue;
    const std::string& entry = queued.elements[i].str;
    xranges.push_back({"XRANGE", stream, entry, entry});
  }
  if (!xranges.empty()) {
    auto entries = redis_.Pipeline(xranges);
    if (!entries.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly");
    for (const RedisValue& r : *entries) {
      if (r.is_error()) continue;  // indexed meanwhile and gone: Chroma has it
      for (const IndexEntry& e : ParseIndexEntries(r)) {
        if (e.user != user_id) continue;  // never another user's, whatever the hash said
        found.emplace(MessageId(e.turn, Role::kUser), e.user_text);
        found.emplace(MessageId(e.turn, Role::kAssistant), e.assistant_text);
      }
    }
  }
  // The rest from Chroma, in one call by id.
  std::vector<std::string> missing;
  for (const std::string& id : ids) {
    if (found.count(id) == 0) missing.push_back(id);
  }
  if (!missing.empty()) {
    auto records = chroma_.GetMessages(user_id, missing);
    if (!records.ok()) {
      return Unavailable("long_term_memory_unavailable", "Long-term memory is unavailable; try again shortly");
    }
    for (StoredMessage& m : *records) found.emplace(m.id, std::move(m.content));
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    auto it = found.find(ids[i]);
    if (it == found.end()) {
      // A dead-lettered turn, or one erased meanwhile: nowhere to read it from.
      LogWarn("history_message_missing").Str("user", std::string(user_id)).Str("message", ids[i]).Emit();
      continue;
    }
    HistoryMessage m;
    m.role = slots[i].second;
    m.content = std::move(it->second);
    m.ts_ms = MemberTs(slots[i].first);
    m.turn_id.assign(TurnOfIndexMember(slots[i].first));
    out.push_back(std::move(m));
  }
  return out;
}

Result<HistoryPage> UserData::History(const UserId& user_id, int limit, const std::optional<HistoryCursor>& before) {
  limit = std::clamp(limit, 1, kHistoryMaxLimit);
  std::vector<std::pair<std::string, Role>> slots;  // newest first
  std::string max = "+";
  if (before) {
    // The cursor's turn still has its user half to give.
    if (before->role == Role::kAssistant) slots.emplace_back(before->member, Role::kUser);
    max = "(" + before->member;
  }
  // Enough turns to fill the page and to know whether anything is older.
  const std::string want = std::to_string(limit / 2 + 2);
  auto turns = redis_.Command({"ZRANGE", TurnIndexKey(user_id), max, "-", "BYLEX", "REV", "LIMIT", "0", want});
  if (!turns.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly");
  if (Status s = RedisError(*turns, "reading the turn index"); !s.ok()) return s;
  for (const RedisValue& m : turns->elements) {
    slots.emplace_back(m.str, Role::kAssistant);
    slots.emplace_back(m.str, Role::kUser);
  }
  HistoryPage page;
  const bool more = slots.size() > static_cast<size_t>(limit);
  if (more) slots.resize(static_cast<size_t>(limit));
  auto messages = Fetch(user_id, slots);
  if (!messages.ok()) return messages.status();
  page.messages = std::move(*messages);
  std::reverse(page.messages.begin(), page.messages.end());
  if (more) page.next = FormatCursor({slots.back().first, slots.back().second});
  return page;
}

Status UserData::Export(const UserId& user, int64_t restored,
                        const std::function<bool(std::string_view)>& write) {
  auto activity = LastActivity(redis_, user);
  if (!activity.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly");
  auto archives = ListArchives(archive_dir_, user);
  if (!archives.ok()) return Unavailable("archive_unavailable", "the archive directory cannot be read");

  std::string out;
  JsonWriter w(out);
  w.StartObject().Key("userId").String(user).Key("exportedAt").String(Rfc3339(WallMs()));
  w.Key("activity").StartObject().Key("lastActiveAt");
  std::optional<int64_t> last = activity->type == RedisValue::Type::kString ? ParseDecimal(activity->str)
                                                                              : std::nullopt;
  if (last) {
    w.String(Rfc3339(*last));
  } else {
    w.Null();
  }
  w.EndObject();
  w.Key("archive").StartObject().Key("archived").Bool(!archives->empty());
  w.Key("files").Int(static_cast<int64_t>(archives->size())).Key("restoredRecords").Int(restored).EndObject();
  w.Key("messages").StartArray();

  // Oldest first, a page of turns at a time.
  const std::string key = TurnIndexKey(user), page_turns = std::to_string(kExportPageTurns);
  std::string min = "-";
  for (;;) {
    auto turns = redis_.Command({"ZRANGE", key, min, "+", "BYLEX", "LIMIT", "0", page_turns});
    if (!turns.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable");
    if (Status s = RedisError(*turns, "reading the turn index"); !s.ok()) return s;
    std::vector<std::pair<std::string, Role>> slots;
    for (const RedisValue& m : turns->elements) {
      slots.emplace_back(m.str, Role::kUser);
      slots.emplace_back(m.str, Role::kAssistant);
    }
    auto messages = Fetch(user, slots);
    if (!messages.ok()) return messages.status();
    for (const HistoryMessage& m : *messages) WriteMessage(w, m);
    if (turns->elements.size() < static_cast<size_t>(kExportPageTurns)) break;
    if (!write(out)) return Status(Code::kUnavailable, "client_gone", "the client went away");
    out.clear();
    min = "(" + turns->elements.back().str;
  }
  w.EndArray().EndObject();
  if (!write(out)) return Status(Code::kUnavailable, "client_gone", "the client went away");
  return Status::Ok();
}

Result<int64_t> UserData::Erase(const UserId& user_id) { return cleanup_.Forget(user_id, /*keep_rate_limits=*/true); }

std::string HistoryBody(const HistoryPage& page) {
  std::string out;
  JsonWriter w(out);
  w.StartObject().Key("messages").StartArray();
  for (const HistoryMessage& m : page.messages) WriteMessage(w, m);
  w.EndArray().Key("next");
  if (page.next) {
    w.String(*page.next);
  } else {
    w.Null();
  }
  w.EndObject();
  return out;
}

}  // namespace chatd
