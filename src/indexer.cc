#include "chatd/indexer.h"

#include "chatd/clock.h"
#include "chatd/log.h"

namespace chatd {

namespace {

// Retrying helps only when something was down or slow; anything else (a
// dimension mismatch, a record Chroma refuses) would fail forever.
bool IsPermanent(const Status& s) {
  if (s.reason() == "dimension_mismatch") return true;
  return s.code() != Code::kUnavailable && s.code() != Code::kDeadlineExceeded;
}

// KEYS: the user's cleanup lock, the user's indexing marker. ARGV: marker TTL.
// Returns 0 when a cleanup holds the user (do not write), 1 otherwise.
const RedisScript kBeginIndexing(R"lua(
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
)lua");

// KEYS: lock, marker, index stream. ARGV: group, then the ids to acknowledge
// (none after a failed write). Lowers the marker; acknowledges only while no
// cleanup holds the user. Returns the number acknowledged.
const RedisScript kFinishIndexing(R"lua(
if redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
if #ARGV < 2 or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[3], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[3], unpack(ids))
return #ids
)lua");

}  // namespace

Result<std::map<std::string, std::vector<StoredMessage>>> BuildStoredMessages(const std::vector<IndexEntry>& entries,
                                                                             Embedder& embedder) {
  // Embed what the request path did not: every reply, and user messages whose
  // embedding failed there. One batch call for all of them.
  std::vector<std::string> texts;
  for (const IndexEntry& e : entries) {
    if (e.user_embedding.size() != embedder.dimensions()) texts.push_back(e.user_text);
    texts.push_back(e.assistant_text);
  }
  auto vectors = embedder.Embed(texts);
  if (!vectors.ok()) return vectors.status();
  if (vectors->size() != texts.size()) return Unavailable("embedder_error", "the embedder returned a wrong count");

  std::map<std::string, std::vector<StoredMessage>> by_user;
  size_t next = 0;
  for (const IndexEntry& e : entries) {
    StoredMessage u{e.turn + ":u", e.user, e.turn, Role::kUser, e.user_text, e.ts, {}};
    u.embedding = e.user_embedding.size() == embedder.dimensions() ? e.user_embedding : std::move((*vectors)[next++]);
    StoredMessage a{e.turn + ":a", e.user, e.turn, Role::kAssistant, e.assistant_text, e.ts,
                    std::move((*vectors)[next++])};
    auto& list = by_user[e.user];
    list.push_back(std::move(u));
    list.push_back(std::move(a));
  }
  return by_user;
}

Indexer::Indexer(RedisClient& redis, LongTermStore& store, Embedder& embedder, IndexerOptions options,
                 Metrics* metrics)
    : redis_(redis), store_(store), embedder_(embedder), options_(std::move(options)), metrics_(metrics) {}

void Indexer::Count(std::atomic<uint64_t> SharedMetrics::*counter, size_t n) {
  if (metrics_ != nullptr) Metrics::Add(metrics_->shared().*counter, n);
}

Indexer::~Indexer() { Stop(); }

void Indexer::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void Indexer::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Indexer::Loop() {
  while (!stop_) {
    if (metrics_ != nullptr) metrics_->Heartbeat();
    Result<int> done = RunOnce();
    if (done.ok()) continue;
    Count(&SharedMetrics::index_failures, 1);
    LogWarn("index_retry").Str("reason", done.status().reason()).Str("detail", done.status().message()).Emit();
    // Chroma or Redis is down: wait a little (or until stopped), then retry
    // our own pending entries first.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(options_.retry_pause_ms), [this] { return stop_.load(); });
  }
}

Status Indexer::EnsureGroup() {
  if (group_ready_) return Status::Ok();
  // From id 0: turns recorded before any indexer existed are indexed too.
  Result<RedisValue> r = redis_.Command({"XGROUP", "CREATE", kIndexStreamKey, kIndexGroup, "0", "MKSTREAM"});
  if (!r.ok()) return r.status();
  if (r->type == RedisValue::Type::kError && r->str.rfind("BUSYGROUP", 0) != 0) {
    return Unavailable("redis_error", "XGROUP CREATE failed: " + r->str);
  }
  group_ready_ = true;
  return Status::Ok();
}

Result<std::vector<IndexEntry>> Indexer::Read(const std::vector<std::string_view>& command, bool autoclaim) {
  Result<RedisValue> r = redis_.Command(command);
  if (!r.ok()) return r.status();
  if (r->type == RedisValue::Type::kNil) return std::vector<IndexEntry>{};  // BLOCK timed out
  if (r->type == RedisValue::Type::kError) {
    if (r->str.rfind("NOGROUP", 0) == 0) group_ready_ = false;  // stream deleted (e.g. FLUSHALL)
    return Unavailable("redis_error", "reading the index stream failed: " + r->str);
  }
  // XREADGROUP: [[stream, [entries]]]; XAUTOCLAIM: [next-id, [entries], [deleted ids]].
  if (autoclaim) {
    if (r->elements.size() >= 2) return ParseIndexEntries(r->elements[1]);
    return std::vector<IndexEntry>{};
  }
  if (r->elements.empty() || r->elements[0].elements.size() != 2) return std::vector<IndexEntry>{};
  // Our pending entries that someone deleted meanwhile (the cleanup archived
  // or forgot them) only need to leave our pending list.
  std::vector<std::string> deleted;
  std::vector<IndexEntry> entries = ParseIndexEntries(r->elements[0].elements[1], &deleted);
  if (!deleted.empty()) {
    std::vector<std::string_view> ack = {"XACK", kIndexStreamKey, kIndexGroup};
    for (const std::string& id : deleted) ack.push_back(id);
    if (auto a = redis_.Command(ack); !a.ok()) return a.status();
  }
  return entries;
}

Result<int> Indexer::RunOnce() {
  if (Status s = EnsureGroup(); !s.ok()) return s;
  std::string batch = std::to_string(options_.batch);
  std::vector<IndexEntry> entries;

  // Entries a dead consumer left behind.
  int64_t now = WallMs();
  if (now - last_claim_ms_ >= options_.claim_idle_ms / 2) {
    last_claim_ms_ = now;
    std::string idle = std::to_string(options_.claim_idle_ms);
    auto claimed = Read({"XAUTOCLAIM", kIndexStreamKey, kIndexGroup, options_.consumer, idle, "0-0", "COUNT", batch},
                        /*autoclaim=*/true);
    if (!claimed.ok()) return claimed.status();
    entries = std::move(*claimed);
  }
  // Our own pending entries (a previous batch failed), then new ones.
  if (entries.empty() && retry_own_pending_) {
    auto mine = Read({"XREADGROUP", "GROUP", kIndexGroup, options_.consumer, "COUNT", batch, "STREAMS",
                      kIndexStreamKey, "0"},
                     false);
    if (!mine.ok()) return mine.status();
    entries = std::move(*mine);
    if (entries.empty()) retry_own_pending_ = false;
  }
  if (entries.empty()) {
    std::string block = std::to_string(options_.block_ms);
    auto fresh = Read({"XREADGROUP", "GROUP", kIndexGroup, options_.consumer, "COUNT", batch, "BLOCK", block,
                       "STREAMS", kIndexStreamKey, ">"},
                      false);
    if (!fresh.ok()) return fresh.status();
    entries = std::move(*fresh);
  }
  if (entries.empty()) return 0;
  Result<int> done = Index(entries);
  if (!done.ok()) {
    retry_own_pending_ = true;
  } else if (*done < static_cast<int>(entries.size())) {
    // What is left belongs to users a cleanup holds. Re-reading it at once
    // would spin; XAUTOCLAIM brings it back after claim_idle_ms.
    retry_own_pending_ = false;
  }
  return done;
}

Result<int> Indexer::Index(std::vector<IndexEntry>& entries) {
  std::map<std::string, std::vector<const IndexEntry*>> entries_by_user;
  for (const IndexEntry& e : entries) entries_by_user[e.user].push_back(&e);

  auto by_user = BuildStoredMessages(entries, embedder_);
  if (!by_user.ok()) return by_user.status();

  std::string marker_ttl = std::to_string(options_.marker_ttl_ms);
  int acked = 0;
  Status first_error;
  for (auto& [user, messages] : *by_user) {
    const auto& user_entries = entries_by_user[user];
    std::string lock_key = CleanupLockKey(user);
    std::string marker_key = IndexingKey(user);
    auto begin = redis_.Eval(kBeginIndexing, {lock_key, marker_key}, {marker_ttl});
    if (!begin.ok()) return begin.status();
    if (begin->integer == 0) continue;  // being archived or forgotten: stays pending until the cleanup is done

    Status s = store_.Upsert(user, messages);
    bool settled = s.ok() || IsPermanent(s);
    if (!settled && first_error.ok()) first_error = s;  // stays pending; retried later
    if (!s.ok() && settled) {
      // Could never succeed: the whole turn moves to the dead-letter stream.
      LogError("index_dead_letter").Str("user", user).Str("reason", s.reason()).Str("detail", s.message()).Emit();
      std::vector<std::vector<std::string_view>> cmds;
      std::vector<std::string> ts_text;  // backs the string_views below
      ts_text.reserve(user_entries.size());
      for (const IndexEntry* e : user_entries) {
        ts_text.push_back(std::to_string(e->ts));
        cmds.push_back({"XADD", kDeadLetterKey, "*", "user", e->user, "turn", e->turn, "ts", ts_text.back(), "u",
                        e->user_text, "a", e->assistant_text, "reason", s.reason()});
      }
      if (auto r = redis_.Pipeline(cmds); !r.ok()) return r.status();
      Count(&SharedMetrics::index_dead_lettered, user_entries.size());
    }
    std::vector<std::string_view> args = {kIndexGroup};
    if (settled) {
      for (const IndexEntry* e : user_entries) args.push_back(e->stream_id);
    }
    auto r = redis_.Eval(kFinishIndexing, {lock_key, marker_key, kIndexStreamKey}, args);
    if (!r.ok()) return r.status();  // written but not acked: harmless, ids are deterministic
    if (r->integer == 0) continue;   // failed, or a cleanup started meanwhile: index again after it
    if (s.ok()) Count(&SharedMetrics::turns_indexed, user_entries.size());
    acked += static_cast<int>(user_entries.size());
  }
  if (!first_error.ok()) return first_error;
  return acked;
}

}  // namespace chatd
