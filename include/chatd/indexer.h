// The background indexer: moves recorded turns from the Redis streams (one
// per shard, IndexStreamKey) into the long-term store, so that a Chroma outage delays
// indexing and loses nothing, and keeps each user's hot set (the latest
// indexed messages, with embeddings, in Redis) for recall in process.
//
// Each worker process runs one indexer thread, a consumer of the group
// "indexers" of every shard's stream. A batch of turns of many users is written with as few store
// calls as the layout allows (one per Chroma shard). An entry is acknowledged
// (and deleted) only after both messages of its turn were written, in the same
// script that adds them to the user's hot set; writes use deterministic ids,
// so an entry indexed twice is still stored once.
//
// Nothing can block it:
//   - a failed batch is retried entry by entry, so one bad turn fails alone;
//   - permanent errors (invalid input, a dimension mismatch) send the entry to
//     the shard's dead-letter stream (DeadLetterKey) at once, never away; so
//     does an entry whose user field is not a valid id (UserId::Parse): only
//     something other than the record script can have written it, and no key
//     of a user can be named for it;
//   - deliveries are counted (the group's own counter): an entry Chroma
//     refused max_deliveries times, while it took other writes (in the same
//     pass or within claim_idle_ms), goes there too; while Chroma is down or
//     refuses every write, nothing is dead-lettered: everything waits;
//   - new turns are read along with the retried ones, so they never queue
//     behind a turn that keeps failing;
//   - failed entries are retried after retry_pause_ms by XCLAIM, which does not
//     touch the entries of other consumers; entries a dead worker left pending
//     are claimed by a live one after claim_idle_ms, and the dead worker's
//     consumer is removed from the group once nothing is pending at it.
//
// Redis stays bounded: each shard's dead-letter stream is trimmed to about
// dead_letter_max entries (the oldest go, counted), and acknowledged entries
// are deleted from the index stream.
//
// Handshake with chatd-cleanup: before writing a user's turns the indexer
// checks the user's cleanup lock and raises the user's "indexing" marker in
// one script; after the write it lowers the marker and acknowledges, again
// only if no lock appeared. The cleanup takes the lock and then waits for the
// marker to clear, so no write can land after its export or its delete, and a
// turn written while the lock was being taken stays pending for later. A turn
// skipped because of the lock does not count as a delivery.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "chatd/embeddings.h"
#include "chatd/memory.h"
#include "chatd/metrics.h"
#include "chatd/redis.h"
#include "chatd/redis_schema.h"
#include "chatd/user_id.h"

namespace chatd {

struct IndexerOptions {
  std::string consumer;          // unique per process: host-pid
  int batch = 256;
  int64_t linger_ms = 100;       // gather arriving turns this long before a write
  int64_t block_ms = 500;        // XREADGROUP BLOCK: also bounds how long Stop() waits
  int64_t claim_idle_ms = 30000;  // another consumer's entry this idle: its worker is dead
  int64_t retry_pause_ms = 1000;  // own failed entries are retried after this
  int max_deliveries = 5;         // then an entry that keeps failing alone is dead-lettered
  int hot_messages = 64;          // bound of each user's hot set
  int64_t backlog_every_ms = 1000;  // how often the backlog gauges are refreshed
  int64_t dead_letter_max = 10000;  // each shard's dead letters are trimmed to about this many (MAXLEN ~)
  // A consumer of the group idle this long with nothing pending belongs to a
  // stopped worker: it is removed (checked every half of it).
  int64_t consumer_gone_ms = 3600000;
  // Lifetime of the "indexing" marker: longer than any one write can take
  // (a few Chroma calls, each bounded by the Chroma timeout).
  int64_t marker_ttl_ms = 10000;
};

// Both messages of each turn, embedded (reusing the request path's embedding
// of the user message when it has the right size), in entry order.
Result<std::vector<StoredMessage>> BuildStoredMessages(const std::vector<IndexEntry>& entries, Embedder& embedder);

// The backlog of the index stream: turns not yet delivered to an indexer,
// turns delivered and not yet acknowledged, and the age of the oldest turn
// still in the stream (acknowledged turns are deleted, so that is the oldest
// one not yet in long-term memory), by Redis's clock.
struct IndexBacklog {
  int64_t waiting = 0;
  int64_t pending = 0;
  int64_t oldest_age_ms = 0;
  // Read in the same round trip, for /api/health and /metrics: the streams'
  // lengths and Redis's memory (used_memory and maxmemory of INFO memory).
  int64_t stream_length = 0;
  int64_t dead_letters = 0;
  int64_t used_memory = 0;
  int64_t maxmemory = 0;
};
Result<IndexBacklog> ReadIndexBacklog(RedisClient& redis);

class Indexer {
 public:
  // `redis` must have a command timeout above block_ms. `metrics` (may be
  // null) gets the indexing counters, the backlog gauges and this process's
  // heartbeat: the loop turns at least every block_ms + retry_pause_ms.
  Indexer(RedisClient& redis, LongTermStore& store, Embedder& embedder, IndexerOptions options, Metrics* metrics);
  ~Indexer();

  void Start();
  void Stop();  // returns once the thread has ended

  // One pass: retry own failed entries and claim dead workers' ones, else
  // read new ones; index them. Returns how many entries were settled
  // (acknowledged or dead-lettered). Public for tests.
  Result<int> RunOnce();

 private:
  struct Outcome;
  Status EnsureGroup();
  Result<std::vector<IndexEntry>> ClaimStale();
  // Up to `count` new entries, waiting up to block_ms for the first (0: not at all).
  Result<std::vector<IndexEntry>> ReadNew(int count, int64_t block_ms);
  // Appends the entries of one XREADGROUP reply of `shard`'s stream.
  Status TakeRead(const RedisValue& reply, int shard, std::vector<IndexEntry>& out);
  // Parses each entry's user, then indexes the entries of valid users and
  // dead-letters the rest. Returns how many entries were settled.
  Result<int> Index(std::vector<IndexEntry>& entries);
  Result<int> IndexUsers(const std::map<UserId, std::vector<const IndexEntry*>>& by_user);
  // Dead-letters entries whose user is not a valid id, and acknowledges and
  // deletes them at the stream they came from (IndexEntry::shard).
  Result<int> DeadLetterMalformed(const std::vector<const IndexEntry*>& malformed);
  // Writes the turns of `entries` (all users) and says for each whether it
  // was written (ok), failed for good, or failed for now.
  std::vector<Status> Write(const std::vector<const IndexEntry*>& entries,
                            std::vector<std::vector<StoredMessage>>& messages);
  Status DeadLetter(const std::vector<std::pair<const IndexEntry*, Status>>& dead);
  void RefreshBacklog();
  // Removes the consumers of stopped workers once nothing is pending at them
  // (their entries were claimed), so dead host-pid names do not pile up.
  void RemoveGoneConsumers();
  void Loop();
  void Count(std::atomic<uint64_t> SharedMetrics::*counter, size_t n);

  RedisClient& redis_;
  LongTermStore& store_;
  Embedder& embedder_;
  IndexerOptions options_;
  Metrics* metrics_;
  std::vector<std::string> streams_;  // every shard's stream, IndexStreamKey(shard)
  int next_block_shard_ = 0;          // the shard the next blocking read waits on
  bool group_ready_ = false;  // only touched by the indexer thread
  int64_t last_claim_ms_ = 0;
  int64_t last_backlog_ms_ = 0;
  int64_t last_consumer_sweep_ms_ = 0;
  int64_t last_write_ok_ms_ = 0;  // when Chroma last took a write of ours

  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace chatd
