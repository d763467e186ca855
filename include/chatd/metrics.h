// Pool-wide metrics. Every worker process of the pool maps the same file
// (CHATD_METRICS_FILE, on tmpfs under /run in production) and updates lock-free
// atomic counters in it, so whichever worker takes a /metrics scrape reports
// the whole pool, not just itself. Workers also keep a heartbeat slot, which
// gives "workers alive" without asking multiwatch.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "chatd/status.h"

namespace chatd {

inline constexpr int kMaxWorkerSlots = 256;
// The index backlog gauges are published by the indexers every second or so;
// older than this, no indexer is alive to vouch for them and they are left out.
inline constexpr int64_t kBacklogFreshMs = 10000;
// Upper bounds (ms) of the latency histogram buckets; +Inf is implicit.
inline constexpr int64_t kLatencyBucketsMs[] = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000};
inline constexpr int kLatencyBuckets = sizeof(kLatencyBucketsMs) / sizeof(kLatencyBucketsMs[0]) + 1;
// HTTP statuses we count one by one; anything else lands in "other".
inline constexpr int kCountedStatuses[] = {200, 400, 401, 403, 404, 405, 413, 415, 429, 500, 502, 503, 504};
inline constexpr int kStatusSlots = sizeof(kCountedStatuses) / sizeof(kCountedStatuses[0]) + 1;

struct Histogram {
  std::atomic<uint64_t> buckets[kLatencyBuckets];  // not cumulative; rendered cumulative
  std::atomic<uint64_t> sum_us;
  std::atomic<uint64_t> count;
};

// The shared layout. Only atomics that are lock-free (hence address-free) may
// live here; metrics.cc checks it at compile time.
struct SharedMetrics {
  std::atomic<uint64_t> magic;
  std::atomic<uint64_t> requests[kStatusSlots];
  Histogram request_latency;
  std::atomic<uint64_t> rate_limited;
  std::atomic<uint64_t> rate_limiter_failed_open;
  std::atomic<uint64_t> auth_failures;
  std::atomic<uint64_t> model_calls;
  std::atomic<uint64_t> model_errors;
  std::atomic<uint64_t> model_timeouts;
  Histogram model_latency;
  std::atomic<uint64_t> recall_degraded;
  std::atomic<uint64_t> chroma_calls;
  std::atomic<uint64_t> turns_indexed;
  std::atomic<uint64_t> index_failures;
  std::atomic<uint64_t> index_dead_lettered;
  std::atomic<uint64_t> index_claimed;            // entries taken over from a dead worker
  std::atomic<uint64_t> index_skipped_settled;    // read, then settled by someone else first
  std::atomic<uint64_t> recall_long_term_queries; // recalls that needed the long-term store
  std::atomic<uint64_t> recall_foreign_dropped;   // records of another user that recall dropped
  std::atomic<uint64_t> prompt_tokens;            // as the model reported them (usage)
  std::atomic<uint64_t> completion_tokens;
  std::atomic<uint64_t> chat_streams;             // chats answered as server-sent events
  std::atomic<uint64_t> chat_streams_client_gone; // ... whose client left before the end
  // The index stream's backlog, refreshed by the indexers (ReadIndexBacklog)
  // about once a second; index_backlog_at_ms says when, so a reader can tell
  // a stale figure (no indexer alive) from a fresh one.
  std::atomic<int64_t> index_waiting;
  std::atomic<int64_t> index_pending;
  std::atomic<int64_t> index_oldest_age_ms;
  std::atomic<int64_t> index_backlog_at_ms;
  // Refreshed with the backlog, off the request path: the index stream's and
  // the dead-letter stream's lengths, and Redis's memory (INFO memory).
  std::atomic<int64_t> index_stream_length;
  std::atomic<int64_t> dead_letter_length;
  std::atomic<int64_t> redis_used_memory;
  std::atomic<int64_t> redis_maxmemory;  // 0: no limit set
  std::atomic<uint64_t> dead_letters_trimmed;  // dropped past CHATD_INDEX_DEAD_LETTER_MAX
  std::atomic<uint64_t> index_consumers_removed;  // dead workers' consumers removed from the group
  std::atomic<uint64_t> redis_round_trips;  // by the request path's clients (RedisOptions::round_trips)
  struct Worker {
    std::atomic<int64_t> pid;
    std::atomic<int64_t> heartbeat_ms;
  } workers[kMaxWorkerSlots];
};

class Metrics {
 public:
  // Maps `path` (created if missing). An empty path gives process-local
  // metrics, for tests and for a single process.
  static Result<std::unique_ptr<Metrics>> Open(const std::string& path);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  SharedMetrics& shared() { return *m_; }

  void CountRequest(int status, int64_t latency_us);
  void CountModelCall(bool ok, bool timeout, int64_t latency_us);
  static void Add(std::atomic<uint64_t>& counter, uint64_t n = 1) { counter.fetch_add(n, std::memory_order_relaxed); }

  // Claims a worker slot (or takes over one whose process is gone) and marks
  // this process alive; call Heartbeat at least every few seconds.
  void RegisterWorker();
  void Heartbeat();
  void UnregisterWorker();
  // Workers whose heartbeat is younger than `max_age_ms`.
  int WorkersAlive(int64_t max_age_ms) const;

  // Prometheus text exposition of the shared counters, plus `extra` lines.
  std::string RenderPrometheus(std::string_view extra) const;

 private:
  Metrics(SharedMetrics* m, bool mapped) : m_(m), mapped_(mapped) {}
  SharedMetrics* m_;
  bool mapped_;
  int slot_ = -1;
};

}  // namespace chatd
