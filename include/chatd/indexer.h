// The background indexer: moves recorded turns from the Redis stream
// (chatd:index) into the long-term store, so that a Chroma outage delays
// indexing and loses nothing.
//
// Each worker process runs one indexer thread, a consumer of the group
// "indexers". An entry is acknowledged (and deleted) only after both messages
// of its turn were upserted; upserts use deterministic ids, so an entry indexed
// twice (a crash between upsert and ack) is still stored once. Entries a dead
// worker left pending are taken over with XAUTOCLAIM after claim_idle_ms.
// Entries that can never be indexed (e.g. the collection has another
// dimension) go to the dead-letter stream chatd:index:dead, never away.
//
// Handshake with chatd-cleanup: before writing a user's turns the indexer
// checks the user's cleanup lock and raises the user's "indexing" marker in
// one script; after the write it lowers the marker and acknowledges, again
// only if no lock appeared. The cleanup takes the lock and then waits for the
// marker to clear, so no write can land after its export or its delete, and a
// turn written while the lock was being taken stays pending for later.
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
#include "chatd/redis_memory.h"

namespace chatd {

struct IndexerOptions {
  std::string consumer;          // unique per process: host-pid
  int batch = 64;
  int64_t block_ms = 500;        // XREADGROUP BLOCK: also bounds how long Stop() waits
  int64_t claim_idle_ms = 30000;
  int64_t retry_pause_ms = 1000;  // after a failed batch (Chroma down)
  // Lifetime of the "indexing" marker: longer than any one Upsert can take
  // (a few Chroma calls, each bounded by the Chroma timeout).
  int64_t marker_ttl_ms = 10000;
};

// Both messages of each turn, embedded (reusing the request path's embedding
// of the user message when it has the right size), grouped by user.
Result<std::map<std::string, std::vector<StoredMessage>>> BuildStoredMessages(const std::vector<IndexEntry>& entries,
                                                                             Embedder& embedder);

class Indexer {
 public:
  // `redis` must have a command timeout above block_ms. `metrics` (may be
  // null) gets the indexing counters and this process's heartbeat: the loop
  // turns at least every block_ms + retry_pause_ms.
  Indexer(RedisClient& redis, LongTermStore& store, Embedder& embedder, IndexerOptions options, Metrics* metrics);
  ~Indexer();

  void Start();
  void Stop();  // returns once the thread has ended

  // One pass: claim stale entries, retry own pending ones, read new ones, index
  // them. Returns how many entries were acknowledged. Public for tests.
  Result<int> RunOnce();

 private:
  Status EnsureGroup();
  Result<std::vector<IndexEntry>> Read(const std::vector<std::string_view>& command, bool autoclaim);
  Result<int> Index(std::vector<IndexEntry>& entries);
  void Loop();
  void Count(std::atomic<uint64_t> SharedMetrics::*counter, size_t n);

  RedisClient& redis_;
  LongTermStore& store_;
  Embedder& embedder_;
  IndexerOptions options_;
  Metrics* metrics_;
  bool group_ready_ = false;  // only touched by the indexer thread
  bool retry_own_pending_ = true;
  int64_t last_claim_ms_ = 0;

  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace chatd
