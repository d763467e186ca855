#include "chatd/indexer.h"

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <set>

#include "chatd/clock.h"
#include "chatd/log.h"

namespace chatd {

namespace {

// Per-entry retries stop after this many failures in a row with no success:
// then Chroma is down for everyone, and trying the rest one by one would only
// wait for more timeouts.
constexpr int kProbeFailuresBeforeDown = 2;

// Retrying helps only when something was down or slow; anything else (a
// dimension mismatch, a record Chroma refuses, text that is not UTF-8) would
// fail forever.
bool IsPermanent(const Status& s) {
  if (s.reason() == "dimension_mismatch") return true;
  return s.code() != Code::kUnavailable && s.code() != Code::kDeadlineExceeded;
}

// A transient failure in which Chroma answered (a 5xx, a 429) rather than not
// at all (unreachable, timed out) or the embedder failing. Only such a failure
// can be the entry's fault, and only while Chroma accepts other writes.
bool StoreAnswered(const Status& s) { return s.reason() == "chroma_unavailable"; }

// The value of `field` in INFO's "field:value" lines, 0 if absent.
int64_t InfoField(std::string_view info, std::string_view field) {
  const std::string key = "\n" + std::string(field) + ":";
  const std::string text = "\n" + std::string(info);
  const size_t at = text.find(key);
  if (at == std::string::npos) return 0;
  return std::strtoll(text.c_str() + at + key.size(), nullptr, 10);
}

int64_t StreamIdMs(std::string_view id) {
  return std::strtoll(std::string(id.substr(0, id.find('-'))).c_str(), nullptr, 10);
}

}  // namespace

Result<std::vector<StoredMessage>> BuildStoredMessages(const std::vector<IndexEntry>& entries, Embedder& embedder) {
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

  std::vector<StoredMessage> out;
  out.reserve(2 * entries.size());
  size_t next = 0;
  for (const IndexEntry& e : entries) {
    StoredMessage u{MessageId(e.turn, Role::kUser), e.user, e.turn, Role::kUser, e.user_text, e.ts, {}};
    u.embedding = e.user_embedding.size() == embedder.dimensions() ? e.user_embedding : std::move((*vectors)[next++]);
    StoredMessage a{MessageId(e.turn, Role::kAssistant), e.user, e.turn, Role::kAssistant, e.assistant_text, e.ts,
                    std::move((*vectors)[next++])};
    out.push_back(std::move(u));
    out.push_back(std::move(a));
  }
  return out;
}

Result<IndexBacklog> ReadIndexBacklog(RedisClient& redis) {
  // Four commands per shard, then TIME and INFO, in one round trip.
  constexpr size_t kPerShard = 4;
  std::vector<std::string> streams, dead_keys;
  for (int shard = 0; shard < kRedisShards; ++shard) {
    streams.push_back(IndexStreamKey(shard));
    dead_keys.push_back(DeadLetterKey(shard));
  }
  std::vector<std::vector<std::string_view>> cmds;
  for (int shard = 0; shard < kRedisShards; ++shard) {
    const std::string& stream = streams[static_cast<size_t>(shard)];
    cmds.push_back({"XLEN", stream});
    cmds.push_back({"XPENDING", stream, kIndexGroup});
    cmds.push_back({"XRANGE", stream, "-", "+", "COUNT", "1"});
    cmds.push_back({"XLEN", dead_keys[static_cast<size_t>(shard)]});
  }
  cmds.push_back({"TIME"});
  cmds.push_back({"INFO", "memory"});
  auto replies = redis.Pipeline(cmds);
  if (!replies.ok()) return replies.status();
  const RedisValue& time = (*replies)[kPerShard * kRedisShards];
  const RedisValue& memory = (*replies)[kPerShard * kRedisShards + 1];
  if (time.elements.size() != 2 || memory.type != RedisValue::Type::kString) {
    return Unavailable("redis_error", "reading the index backlog failed");
  }
  const int64_t now_ms = std::strtoll(time.elements[0].str.c_str(), nullptr, 10) * 1000 +
                         std::strtoll(time.elements[1].str.c_str(), nullptr, 10) / 1000;
  IndexBacklog b;
  b.used_memory = InfoField(memory.str, "used_memory");
  b.maxmemory = InfoField(memory.str, "maxmemory");
  for (size_t shard = 0; shard < static_cast<size_t>(kRedisShards); ++shard) {
    const RedisValue& len = (*replies)[kPerShard * shard];
    const RedisValue& pending = (*replies)[kPerShard * shard + 1];
    const RedisValue& first = (*replies)[kPerShard * shard + 2];
    const RedisValue& dead = (*replies)[kPerShard * shard + 3];
    if (len.type != RedisValue::Type::kInteger || dead.type != RedisValue::Type::kInteger) {
      return Unavailable("redis_error", "reading the index backlog failed");
    }
    b.stream_length += len.integer;
    b.dead_letters += dead.integer;
    // No group yet (NOGROUP) means nothing was ever delivered.
    int64_t shard_pending = 0;
    if (!pending.is_error() && !pending.elements.empty()) shard_pending = pending.elements[0].integer;
    b.pending += shard_pending;
    b.waiting += std::max<int64_t>(0, len.integer - shard_pending);
    if (!first.elements.empty() && first.elements[0].elements.size() == 2) {
      b.oldest_age_ms =
          std::max(b.oldest_age_ms, std::max<int64_t>(0, now_ms - StreamIdMs(first.elements[0].elements[0].str)));
    }
  }
  return b;
}

Indexer::Indexer(RedisClient& redis, LongTermStore& store, Embedder& embedder, IndexerOptions options,
                 Metrics* metrics)
    : redis_(redis), store_(store), embedder_(embedder), options_(std::move(options)), metrics_(metrics) {
  for (int shard = 0; shard < kRedisShards; ++shard) streams_.push_back(IndexStreamKey(shard));
}

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
    // Chroma or Redis is down: wait a little (or until stopped); the failed
    // entries are claimed again once they have been idle retry_pause_ms.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(options_.retry_pause_ms), [this] { return stop_.load(); });
  }
}

void Indexer::RefreshBacklog() {
  if (metrics_ == nullptr) return;
  const int64_t now = WallMs();
  if (now - last_backlog_ms_ < options_.backlog_every_ms) return;
  last_backlog_ms_ = now;
  auto b = ReadIndexBacklog(redis_);
  if (!b.ok()) return;  // the gauges keep their time stamp, so readers see they are stale
  SharedMetrics& m = metrics_->shared();
  m.index_waiting.store(b->waiting, std::memory_order_relaxed);
  m.index_pending.store(b->pending, std::memory_order_relaxed);
  m.index_oldest_age_ms.store(b->oldest_age_ms, std::memory_order_relaxed);
  m.index_stream_length.store(b->stream_length, std::memory_order_relaxed);
  m.dead_letter_length.store(b->dead_letters, std::memory_order_relaxed);
  m.redis_used_memory.store(b->used_memory, std::memory_order_relaxed);
  m.redis_maxmemory.store(b->maxmemory, std::memory_order_relaxed);
  m.index_backlog_at_ms.store(now, std::memory_order_relaxed);
}

void Indexer::RemoveGoneConsumers() {
  const int64_t now = WallMs();
  if (now - last_consumer_sweep_ms_ < std::max(options_.consumer_gone_ms / 2, options_.backlog_every_ms)) return;
  last_consumer_sweep_ms_ = now;
  int64_t removed = 0;
  for (int shard = 0; shard < kRedisShards; ++shard) {
    auto r = RemoveGoneIndexConsumers(redis_, shard, options_.consumer, options_.consumer_gone_ms);
    // A failed sweep costs nothing but a later one: the next pass tries again.
    if (r.ok() && !r->is_error() && r->integer > 0) removed += r->integer;
  }
  if (removed <= 0) return;
  Count(&SharedMetrics::index_consumers_removed, static_cast<size_t>(removed));
  LogInfo("index_consumers_removed").Int("consumers", removed).Emit();
}

Status Indexer::EnsureGroup() {
  if (group_ready_) return Status::Ok();
  // From id 0: turns recorded before any indexer existed are indexed too.
  std::vector<std::vector<std::string_view>> cmds;
  for (const std::string& stream : streams_) cmds.push_back({"XGROUP", "CREATE", stream, kIndexGroup, "0", "MKSTREAM"});
  auto replies = redis_.Pipeline(cmds);
  if (!replies.ok()) return replies.status();
  for (const RedisValue& r : *replies) {
    if (r.type == RedisValue::Type::kError && r.str.rfind("BUSYGROUP", 0) != 0) {
      return Unavailable("redis_error", "XGROUP CREATE failed: " + r.str);
    }
  }
  group_ready_ = true;
  return Status::Ok();
}

Result<std::vector<IndexEntry>> Indexer::ClaimStale() {
  // Own entries idle for retry_pause_ms failed earlier; anyone's idle for
  // claim_idle_ms belong to a dead worker. XPENDING tells the delivery counts,
  // and XCLAIM with the same minimum idle time takes each entry once, however
  // many indexers race for it. Two lists per shard, in one round trip.
  const std::string batch = std::to_string(options_.batch);
  const std::string retry_idle = std::to_string(options_.retry_pause_ms);
  const std::string claim_idle = std::to_string(options_.claim_idle_ms);
  std::vector<std::vector<std::string_view>> queries;
  for (const std::string& stream : streams_) {
    queries.push_back({"XPENDING", stream, kIndexGroup, "IDLE", retry_idle, "-", "+", batch, options_.consumer});
    queries.push_back({"XPENDING", stream, kIndexGroup, "IDLE", claim_idle, "-", "+", batch});
  }
  auto lists = redis_.Pipeline(queries);
  if (!lists.ok()) return lists.status();
  std::map<std::string, int64_t> deliveries;  // stream ids are unique per shard; keyed by shard below
  std::vector<std::vector<std::string>> own(streams_.size()), others(streams_.size());
  for (size_t q = 0; q < lists->size(); ++q) {
    const RedisValue& list = (*lists)[q];
    const size_t shard = q / 2;
    if (list.is_error()) {
      if (list.str.rfind("NOGROUP", 0) == 0) group_ready_ = false;
      return Unavailable("redis_error", "XPENDING failed: " + list.str);
    }
    for (const RedisValue& p : list.elements) {
      if (p.elements.size() != 4) continue;
      const std::string& id = p.elements[0].str;
      if (!deliveries.emplace(std::to_string(shard) + "/" + id, p.elements[3].integer).second) continue;
      (p.elements[1].str == options_.consumer ? own : others)[shard].push_back(id);
    }
  }
  std::vector<std::vector<std::string_view>> claims;
  std::vector<size_t> claim_shard;
  size_t claimed_others = 0;
  for (size_t shard = 0; shard < streams_.size(); ++shard) {
    for (int which = 0; which < 2; ++which) {
      const auto& ids = which == 0 ? own[shard] : others[shard];
      if (ids.empty()) continue;
      if (which == 1) claimed_others += ids.size();
      std::vector<std::string_view> argv = {"XCLAIM", streams_[shard], kIndexGroup, options_.consumer,
                                            which == 0 ? retry_idle : claim_idle};
      for (const std::string& id : ids) argv.push_back(id);
      claims.push_back(std::move(argv));
      claim_shard.push_back(shard);
    }
  }
  if (claims.empty()) return std::vector<IndexEntry>{};
  auto claimed = redis_.Pipeline(claims);
  if (!claimed.ok()) return claimed.status();
  std::vector<IndexEntry> entries;
  for (size_t c = 0; c < claimed->size(); ++c) {
    const RedisValue& list = (*claimed)[c];
    if (list.is_error()) return Unavailable("redis_error", "XCLAIM failed: " + list.str);
    // Entries deleted meanwhile (archived or forgotten) are dropped from the
    // pending list by XCLAIM itself and not returned.
    for (IndexEntry& e : ParseIndexEntries(list)) {
      e.deliveries = deliveries[std::to_string(claim_shard[c]) + "/" + e.stream_id] + 1;
      e.shard = static_cast<int>(claim_shard[c]);
      entries.push_back(std::move(e));
    }
  }
  if (claimed_others > 0) Count(&SharedMetrics::index_claimed, claimed_others);
  return entries;
}

Result<std::vector<IndexEntry>> Indexer::ReadNew(int count, int64_t block_ms) {
  // Every shard at once without waiting; then, when nothing came, one shard
  // (in turn) with BLOCK: a read of several streams is one command only on a
  // single Redis, never across a cluster's slots. A turn of another shard
  // waits for the next pass, block_ms at most.
  const int per_shard = std::max(1, (count + kRedisShards - 1) / kRedisShards);
  const std::string batch = std::to_string(per_shard);
  std::vector<std::vector<std::string_view>> reads;
  for (const std::string& stream : streams_) {
    reads.push_back({"XREADGROUP", "GROUP", kIndexGroup, options_.consumer, "COUNT", batch, "STREAMS", stream, ">"});
  }
  auto replies = redis_.Pipeline(reads);
  if (!replies.ok()) return replies.status();
  std::vector<IndexEntry> out;
  for (size_t shard = 0; shard < replies->size(); ++shard) {
    if (Status s = TakeRead((*replies)[shard], static_cast<int>(shard), out); !s.ok()) return s;
  }
  if (!out.empty() || block_ms <= 0) return out;
  const int block_shard = next_block_shard_;
  const std::string& stream = streams_[static_cast<size_t>(block_shard)];
  next_block_shard_ = (next_block_shard_ + 1) % kRedisShards;
  const std::string block = std::to_string(block_ms), all = std::to_string(count);
  Result<RedisValue> r = redis_.Command(
      {"XREADGROUP", "GROUP", kIndexGroup, options_.consumer, "COUNT", all, "BLOCK", block, "STREAMS", stream, ">"});
  if (!r.ok()) return r.status();
  if (Status s = TakeRead(*r, block_shard, out); !s.ok()) return s;
  return out;
}

Status Indexer::TakeRead(const RedisValue& r, int shard, std::vector<IndexEntry>& out) {
  if (r.type == RedisValue::Type::kNil) return Status::Ok();  // nothing new (or BLOCK timed out)
  if (r.type == RedisValue::Type::kError) {
    if (r.str.rfind("NOGROUP", 0) == 0) group_ready_ = false;  // stream deleted (e.g. FLUSHALL)
    return Unavailable("redis_error", "reading the index stream failed: " + r.str);
  }
  // [[stream, [entries]]]
  if (r.elements.empty() || r.elements[0].elements.size() != 2) return Status::Ok();
  for (IndexEntry& e : ParseIndexEntries(r.elements[0].elements[1])) {
    e.shard = shard;
    out.push_back(std::move(e));
  }
  return Status::Ok();
}

Result<int> Indexer::RunOnce() {
  if (Status s = EnsureGroup(); !s.ok()) return s;
  RefreshBacklog();
  RemoveGoneConsumers();
  std::vector<IndexEntry> entries;
  const int64_t now = WallMs();
  if (now - last_claim_ms_ >= options_.retry_pause_ms / 2) {
    last_claim_ms_ = now;
    auto stale = ClaimStale();
    if (!stale.ok()) return stale.status();
    entries = std::move(*stale);
  }
  // New turns ride along with retried ones, so a turn that keeps failing
  // never holds the others back; they wait in BLOCK only when nothing is due.
  if (static_cast<int>(entries.size()) < options_.batch) {
    auto fresh = ReadNew(options_.batch - static_cast<int>(entries.size()), entries.empty() ? options_.block_ms : 0);
    if (!fresh.ok()) return fresh.status();
    for (IndexEntry& e : *fresh) entries.push_back(std::move(e));
  }
  // Chroma's cost is mostly per call, not per record: while turns keep
  // arriving, gather them for up to linger_ms so that a busy indexer writes
  // few large batches instead of many small ones.
  const auto linger_until = SteadyClock::now() + std::chrono::milliseconds(options_.linger_ms);
  while (!entries.empty() && static_cast<int>(entries.size()) < options_.batch && !stop_) {
    const int64_t left =
        std::chrono::duration_cast<std::chrono::milliseconds>(linger_until - SteadyClock::now()).count();
    if (left <= 0) break;
    auto more = ReadNew(options_.batch - static_cast<int>(entries.size()), left);
    if (!more.ok()) return more.status();
    if (more->empty()) break;  // nothing came within the linger
    for (IndexEntry& e : *more) entries.push_back(std::move(e));
  }
  if (entries.empty()) return 0;
  return Index(entries);
}

std::vector<Status> Indexer::Write(const std::vector<const IndexEntry*>& entries,
                                   std::vector<std::vector<StoredMessage>>& messages) {
  const size_t n = entries.size();
  std::vector<Status> result(n);
  messages.assign(n, {});
  // 1. Embeddings: one call for the batch; when it fails, one call per
  // entry, so a text the embedder refuses fails alone.
  std::vector<IndexEntry> copies;
  copies.reserve(n);
  for (const IndexEntry* e : entries) copies.push_back(*e);
  auto all = BuildStoredMessages(copies, embedder_);
  int embed_failures_in_a_row = 0;
  bool any_embedded = false;
  for (size_t i = 0; i < n; ++i) {
    if (all.ok()) {
      messages[i] = {std::move((*all)[2 * i]), std::move((*all)[2 * i + 1])};
      continue;
    }
    // The embedder looks down for everyone: the rest waits too.
    if (!any_embedded && embed_failures_in_a_row >= kProbeFailuresBeforeDown) {
      result[i] = all.status();
      continue;
    }
    auto one = n == 1 ? std::move(all) : BuildStoredMessages({copies[i]}, embedder_);
    if (one.ok()) {
      messages[i] = std::move(*one);
      any_embedded = true;
      embed_failures_in_a_row = 0;
    } else {
      result[i] = one.status();
      ++embed_failures_in_a_row;
    }
  }
  // 2. The store: one call for the batch (one per shard inside it).
  std::vector<StoredMessage> batch;
  std::vector<size_t> in_batch;
  for (size_t i = 0; i < n; ++i) {
    if (!result[i].ok()) continue;
    in_batch.push_back(i);
    for (const StoredMessage& m : messages[i]) batch.push_back(m);
  }
  if (in_batch.empty()) return result;
  Status s = store_.Upsert(batch);
  if (s.ok() || in_batch.size() == 1) {
    for (size_t i : in_batch) result[i] = s;
    return result;
  }
  // 3. The batch failed: entry by entry, so one bad turn cannot hold back the
  // others. Stop probing once Chroma looks down for everyone.
  int failures_in_a_row = 0;
  bool any_written = false;
  for (size_t i : in_batch) {
    if (!any_written && failures_in_a_row >= kProbeFailuresBeforeDown) {
      result[i] = s;
      continue;
    }
    result[i] = store_.Upsert(messages[i]);
    if (result[i].ok()) {
      any_written = true;
      failures_in_a_row = 0;
    } else {
      ++failures_in_a_row;
    }
  }
  return result;
}

Status Indexer::DeadLetter(const std::vector<std::pair<const IndexEntry*, Status>>& dead) {
  if (dead.empty()) return Status::Ok();
  std::vector<std::vector<std::string_view>> cmds;
  std::deque<std::string> backing;  // owns what the commands view
  std::set<int> shards;
  for (const auto& [e, status] : dead) {
    LogError("index_dead_letter")
        .Str("user", e->user)
        .Str("turn", e->turn)
        .Str("reason", status.reason())
        .Int("deliveries", e->deliveries)
        .Emit();
    const int shard = e->shard;  // its own shard's: that of its user, when it has one
    shards.insert(shard);
    cmds.push_back({"XADD", backing.emplace_back(DeadLetterKey(shard)), "*", "user", e->user, "turn", e->turn, "ts",
                    backing.emplace_back(std::to_string(e->ts)), "u", e->user_text, "a", e->assistant_text, "reason",
                    status.reason(), "deliveries", backing.emplace_back(std::to_string(e->deliveries))});
  }
  // Each shard's stream is bounded: past the cap its oldest entries go (each
  // was logged above when it arrived). XTRIM, rather than MAXLEN on each
  // XADD, because it says how many went.
  const std::string& cap = backing.emplace_back(std::to_string(options_.dead_letter_max));
  for (int shard : shards) cmds.push_back({"XTRIM", backing.emplace_back(DeadLetterKey(shard)), "MAXLEN", "~", cap});
  auto r = redis_.Pipeline(cmds);
  if (!r.ok()) return r.status();
  Count(&SharedMetrics::index_dead_lettered, dead.size());
  int64_t trimmed = 0;
  for (size_t i = dead.size(); i < r->size(); ++i) {
    const RedisValue& t = (*r)[i];
    if (t.type == RedisValue::Type::kInteger && t.integer > 0) trimmed += t.integer;
  }
  if (trimmed > 0) {
    Count(&SharedMetrics::dead_letters_trimmed, static_cast<size_t>(trimmed));
    LogWarn("index_dead_letters_trimmed").Int("dropped", trimmed).Int("cap", options_.dead_letter_max).Emit();
  }
  return Status::Ok();
}

Result<int> Indexer::Index(std::vector<IndexEntry>& entries) {
  // A stream entry is data read back: its user is parsed before any key is
  // named for it. The record script writes only parsed ids, so an entry
  // whose user is none can never be indexed, and waits for nothing.
  std::map<UserId, std::vector<const IndexEntry*>> by_user;
  std::vector<const IndexEntry*> malformed;
  for (const IndexEntry& e : entries) {
    if (std::optional<UserId> user = UserId::Parse(e.user)) {
      by_user[std::move(*user)].push_back(&e);
    } else {
      malformed.push_back(&e);
    }
  }
  Result<int> dead = DeadLetterMalformed(malformed);
  if (!dead.ok()) return dead.status();
  if (by_user.empty()) return *dead;
  Result<int> indexed = IndexUsers(by_user);
  if (!indexed.ok()) return indexed.status();
  return *dead + *indexed;
}

Result<int> Indexer::DeadLetterMalformed(const std::vector<const IndexEntry*>& malformed) {
  if (malformed.empty()) return 0;
  const Status invalid = InvalidArgument("invalid_user_id", "the entry's user is not a valid user id");
  std::vector<std::pair<const IndexEntry*, Status>> dead;
  for (const IndexEntry* e : malformed) dead.emplace_back(e, invalid);
  if (Status s = DeadLetter(dead); !s.ok()) return s;
  // Settled where it was read, as FinishIndexing settles the others, but with
  // no lock to respect: no cleanup can hold a user who is no user.
  std::vector<std::vector<std::string_view>> cmds;
  for (const IndexEntry* e : malformed) {
    const std::string& stream = streams_[static_cast<size_t>(e->shard)];
    cmds.push_back({"XACK", stream, kIndexGroup, e->stream_id});
    cmds.push_back({"XDEL", stream, e->stream_id});
  }
  auto settled = redis_.Pipeline(cmds);
  if (!settled.ok()) return settled.status();
  for (const RedisValue& r : *settled) {
    if (r.is_error()) return Unavailable("redis_error", "settling an entry without a valid user failed: " + r.str);
  }
  return static_cast<int>(malformed.size());
}

Result<int> Indexer::IndexUsers(const std::map<UserId, std::vector<const IndexEntry*>>& by_user) {
  // 1. Lock check and marker, for every user of the batch in one round trip.
  std::vector<BeginIndexingRequest> begins;
  for (const auto& [user, list] : by_user) {
    BeginIndexingRequest& b = begins.emplace_back(BeginIndexingRequest{user, {}});
    for (const IndexEntry* e : list) b.entries.emplace_back(e->stream_id, e->deliveries);
  }
  auto began = BeginIndexing(redis_, options_.consumer, options_.marker_ttl_ms, begins);
  if (!began.ok()) return began.status();
  std::vector<const IndexEntry*> writable;
  std::vector<UserId> users;  // those whose marker we raised
  size_t u = 0;
  for (const auto& [user, list] : by_user) {
    const RedisValue& r = (*began)[u++];
    if (r.is_error()) return Unavailable("redis_error", "beginning to index failed: " + r.str);
    if (r.type == RedisValue::Type::kArray) {
      // Some entries must not be written: older than the user's erase, or
      // settled by someone else since we read them.
      if (r.elements.size() < 2) return Unavailable("redis_error", "beginning to index: malformed reply");
      std::set<std::string> dropped;
      for (size_t i = 2; i < r.elements.size(); ++i) dropped.insert(r.elements[i].str);
      const int64_t listed = static_cast<int64_t>(r.elements.size() - 2);
      const int64_t erased = std::clamp<int64_t>(r.elements[1].integer, 0, listed);
      const int64_t gone = listed - erased;
      if (erased > 0) LogInfo("index_dropped_erased").Str("user", user).Int("turns", erased).Emit();
      if (gone > 0) {
        Count(&SharedMetrics::index_skipped_settled, static_cast<size_t>(gone));
        LogInfo("index_skipped_settled").Str("user", user).Int("turns", gone).Emit();
      }
      if (r.elements[0].integer == 0) continue;
      users.push_back(user);
      for (const IndexEntry* e : list) {
        if (dropped.count(e->stream_id) == 0) writable.push_back(e);
      }
      continue;
    }
    if (r.integer == 0) continue;  // a cleanup holds the user: after it
    users.push_back(user);
    writable.insert(writable.end(), list.begin(), list.end());
  }
  if (writable.empty()) return 0;

  // 2. Embed and write.
  std::vector<std::vector<StoredMessage>> messages;
  std::vector<Status> results = Write(writable, messages);
  const bool any_written = std::any_of(results.begin(), results.end(), [](const Status& s) { return s.ok(); });
  const int64_t now = WallMs();
  if (any_written) last_write_ok_ms_ = now;
  // Chroma takes other writes (in this pass, or recently): a turn it keeps
  // refusing is the turn's problem. While it refuses everything, all waits.
  const bool chroma_writes = any_written || (last_write_ok_ms_ > 0 && now - last_write_ok_ms_ <= options_.claim_idle_ms);

  // 3. Settle: written turns are acknowledged and join the hot set; turns that
  // can never be written go to the dead letters; the rest stays pending.
  std::vector<std::pair<const IndexEntry*, Status>> dead;
  std::map<std::string, std::vector<size_t>> settled_by_user;
  std::set<std::string> in_doubt;  // users with a write that timed out: Chroma may still apply it
  Status first_error;
  for (size_t i = 0; i < writable.size(); ++i) {
    const IndexEntry* e = writable[i];
    const Status& s = results[i];
    if (s.code() == Code::kDeadlineExceeded) in_doubt.insert(e->user);
    if (s.ok()) {
      settled_by_user[e->user].push_back(i);
    } else if (IsPermanent(s) || (StoreAnswered(s) && chroma_writes && e->deliveries >= options_.max_deliveries)) {
      dead.emplace_back(e, s);
      settled_by_user[e->user].push_back(i);
    } else if (first_error.ok()) {
      first_error = s;
    }
  }
  if (Status d = DeadLetter(dead); !d.ok()) return d;

  std::vector<FinishIndexingRequest> finishes;
  size_t acked_total = 0, written_total = 0;
  for (const UserId& user : users) {
    FinishIndexingRequest& f =
        finishes.emplace_back(FinishIndexingRequest{user, in_doubt.count(user.str()) != 0, {}, {}, {}});
    for (size_t i : settled_by_user[user.str()]) {
      f.stream_ids.push_back(writable[i]->stream_id);
      f.turns.push_back(writable[i]->turn);
      if (!results[i].ok()) continue;
      ++written_total;
      for (const StoredMessage& m : messages[i]) f.hot.push_back(&m);
    }
  }
  auto finished = FinishIndexing(redis_, options_.hot_messages, finishes);
  // Written but not acknowledged is harmless: ids are deterministic.
  if (!finished.ok()) return finished.status();
  for (const RedisValue& r : *finished) {
    if (r.is_error()) return Unavailable("redis_error", "finishing the index failed: " + r.str);
    acked_total += static_cast<size_t>(r.integer);
  }
  Count(&SharedMetrics::turns_indexed, std::min(written_total, acked_total));
  if (!any_written && !first_error.ok()) return first_error;
  return static_cast<int>(acked_total);
}

}  // namespace chatd
