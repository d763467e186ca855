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

// KEYS: the user's cleanup lock, the index stream. ARGV: group, then ids.
// Acknowledges only while no cleanup holds the user (see indexer.h).
const RedisScript kAckUnlessLocked(R"lua(
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[2], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[2], unpack(ids))
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
  } else if (!r->elements.empty() && r->elements[0].elements.size() == 2) {
    return ParseIndexEntries(r->elements[0].elements[1]);
  }
  return std::vector<IndexEntry>{};
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
  if (!done.ok()) retry_own_pending_ = true;
  return done;
}

Result<int> Indexer::Index(std::vector<IndexEntry>& entries) {
  std::map<std::string, std::vector<const IndexEntry*>> entries_by_user;
  for (const IndexEntry& e : entries) entries_by_user[e.user].push_back(&e);

  // Users being archived or forgotten right now wait until the cleanup is done.
  std::vector<std::vector<std::string_view>> lock_checks;
  std::vector<std::string> lock_keys;
  lock_keys.reserve(entries_by_user.size());
  for (const auto& [user, list] : entries_by_user) {
    lock_keys.push_back(CleanupLockKey(user));
    lock_checks.push_back({"EXISTS", lock_keys.back()});
  }
  auto locks = redis_.Pipeline(lock_checks);
  if (!locks.ok()) return locks.status();
  std::vector<IndexEntry> ready;
  size_t i = 0;
  for (const auto& [user, list] : entries_by_user) {
    if ((*locks)[i++].integer == 0) {
      for (const IndexEntry* e : list) ready.push_back(*e);
    }
  }
  if (ready.empty()) return 0;

  auto by_user = BuildStoredMessages(ready, embedder_);
  if (!by_user.ok()) return by_user.status();

  int acked = 0;
  Status first_error;
  for (auto& [user, messages] : *by_user) {
    const auto& user_entries = entries_by_user[user];
    Status s = store_.Upsert(user, messages);
    if (!s.ok() && !IsPermanent(s)) {
      if (first_error.ok()) first_error = s;
      continue;  // stays pending; retried later
    }
    if (!s.ok()) {
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
    std::string lock_key = CleanupLockKey(user);
    std::vector<std::string_view> args = {kIndexGroup};
    for (const IndexEntry* e : user_entries) args.push_back(e->stream_id);
    auto r = redis_.Eval(kAckUnlessLocked, {lock_key, kIndexStreamKey}, args);
    if (!r.ok()) return r.status();  // upserted but not acked: harmless, ids are deterministic
    if (r->integer == 0) continue;   // a cleanup started meanwhile: index again after it
    if (s.ok()) Count(&SharedMetrics::turns_indexed, user_entries.size());
    acked += static_cast<int>(user_entries.size());
  }
  if (!first_error.ok()) return first_error;
  return acked;
}

}  // namespace chatd
