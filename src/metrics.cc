#include "chatd/metrics.h"

#include <cstdio>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "chatd/clock.h"
#include "unique_fd.h"

namespace chatd {

namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<int64_t>::is_always_lock_free,
              "shared-memory counters need address-free (lock-free) atomics");

// Changes whenever SharedMetrics changes, so a stale file is never misread.
constexpr uint64_t kMagic = 0x63686174'64000007ULL;  // "chatd", layout 7

int StatusSlot(int status) {
  for (int i = 0; i < kStatusSlots - 1; ++i) {
    if (kCountedStatuses[i] == status) return i;
  }
  return kStatusSlots - 1;
}

void Observe(Histogram& h, int64_t latency_us) {
  int64_t ms = latency_us / 1000;
  int b = 0;
  while (b < kLatencyBuckets - 1 && ms > kLatencyBucketsMs[b]) ++b;
  h.buckets[b].fetch_add(1, std::memory_order_relaxed);
  h.sum_us.fetch_add(static_cast<uint64_t>(std::max<int64_t>(latency_us, 0)), std::memory_order_relaxed);
  h.count.fetch_add(1, std::memory_order_relaxed);
}

void Line(std::string& out, std::string_view name, std::string_view labels, uint64_t value) {
  out.append(name);
  if (!labels.empty()) out.append("{").append(labels).append("}");
  out.append(" ").append(std::to_string(value)).append("\n");
}

void Help(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out.append("# HELP ").append(name).append(" ").append(help).append("\n");
  out.append("# TYPE ").append(name).append(" ").append(type).append("\n");
}

void Counter(std::string& out, std::string_view name, std::string_view help, const std::atomic<uint64_t>& value) {
  Help(out, name, "counter", help);
  Line(out, name, "", value.load(std::memory_order_relaxed));
}

void Gauge(std::string& out, std::string_view name, std::string_view help, double value) {
  Help(out, name, "gauge", help);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", value);
  out.append(name).append(" ").append(buf).append("\n");
}

void RenderHistogram(std::string& out, std::string_view name, std::string_view help, const Histogram& h) {
  Help(out, name, "histogram", help);
  uint64_t cumulative = 0;
  for (int b = 0; b < kLatencyBuckets; ++b) {
    cumulative += h.buckets[b].load(std::memory_order_relaxed);
    std::string le = b < kLatencyBuckets - 1 ? std::to_string(static_cast<double>(kLatencyBucketsMs[b]) / 1000.0)
                                             : std::string("+Inf");
    if (b < kLatencyBuckets - 1) le.erase(le.find_last_not_of('0') + 1);  // 0.005000 -> 0.005
    if (!le.empty() && le.back() == '.') le.pop_back();
    Line(out, std::string(name) + "_bucket", "le=\"" + le + "\"", cumulative);
  }
  char sum[64];
  std::snprintf(sum, sizeof(sum), "%.6f", static_cast<double>(h.sum_us.load(std::memory_order_relaxed)) / 1e6);
  out.append(name).append("_sum ").append(sum).append("\n");
  Line(out, std::string(name) + "_count", "", h.count.load(std::memory_order_relaxed));
}

}  // namespace

Result<std::unique_ptr<Metrics>> Metrics::Open(const std::string& path) {
  if (path.empty()) {
    auto* local = new (std::nothrow) SharedMetrics();
    if (local == nullptr) return Internal("metrics", "out of memory");
    local->magic.store(kMagic);
    return std::unique_ptr<Metrics>(new Metrics(local, false));
  }
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640));
  if (!fd.valid()) return Unavailable("metrics", "CHATD_METRICS_FILE " + path + ": " + std::strerror(errno));
  struct stat st {};
  // Growing a file to the same size from several workers at once is harmless:
  // new bytes read as zero, which is every counter's start value.
  if (fstat(fd.get(), &st) != 0 || (st.st_size < static_cast<off_t>(sizeof(SharedMetrics)) &&
                                    ftruncate(fd.get(), sizeof(SharedMetrics)) != 0)) {
    return Unavailable("metrics", "CHATD_METRICS_FILE " + path + ": " + std::strerror(errno));
  }
  // The mapping outlives the descriptor.
  void* p = mmap(nullptr, sizeof(SharedMetrics), PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  fd.reset();
  if (p == MAP_FAILED) return Unavailable("metrics", "mmap " + path + ": " + std::strerror(errno));
  auto* m = static_cast<SharedMetrics*>(p);
  uint64_t expected = 0;
  if (!m->magic.compare_exchange_strong(expected, kMagic) && expected != kMagic) {
    munmap(p, sizeof(SharedMetrics));
    return Unavailable("metrics", "CHATD_METRICS_FILE " + path +
                                      " was written by another chatd version; remove it and restart the pool");
  }
  return std::unique_ptr<Metrics>(new Metrics(m, true));
}

Metrics::~Metrics() {
  UnregisterWorker();
  if (mapped_) {
    munmap(m_, sizeof(SharedMetrics));
  } else {
    delete m_;
  }
}

void Metrics::CountRequest(int status, int64_t latency_us) {
  Add(m_->requests[StatusSlot(status)]);
  Observe(m_->request_latency, latency_us);
}

void Metrics::CountModelCall(bool ok, bool timeout, int64_t latency_us) {
  Add(m_->model_calls);
  if (!ok) Add(m_->model_errors);
  if (timeout) Add(m_->model_timeouts);
  Observe(m_->model_latency, latency_us);
}

void Metrics::RegisterWorker() {
  int64_t me = getpid();
  for (int i = 0; i < kMaxWorkerSlots; ++i) {
    int64_t owner = m_->workers[i].pid.load();
    // A slot is free when unowned or when its process is gone (a worker
    // killed with -9 never unregisters).
    bool gone = owner != 0 && owner != me && kill(static_cast<pid_t>(owner), 0) != 0 && errno == ESRCH;
    if ((owner == 0 || gone) && m_->workers[i].pid.compare_exchange_strong(owner, me)) {
      slot_ = i;
      Heartbeat();
      return;
    }
  }
}

void Metrics::Heartbeat() {
  if (slot_ >= 0) m_->workers[slot_].heartbeat_ms.store(WallMs(), std::memory_order_relaxed);
}

void Metrics::UnregisterWorker() {
  if (slot_ < 0) return;
  m_->workers[slot_].heartbeat_ms.store(0);
  m_->workers[slot_].pid.store(0);
  slot_ = -1;
}

int Metrics::WorkersAlive(int64_t max_age_ms) const {
  int64_t now = WallMs();
  int alive = 0;
  for (const auto& w : m_->workers) {
    if (w.pid.load(std::memory_order_relaxed) != 0 &&
        now - w.heartbeat_ms.load(std::memory_order_relaxed) <= max_age_ms) {
      ++alive;
    }
  }
  return alive;
}

std::string Metrics::RenderPrometheus(std::string_view extra) const {
  std::string out;
  out.reserve(4096);
  Help(out, "chatd_requests_total", "counter", "HTTP requests answered by the pool, by status.");
  for (int i = 0; i < kStatusSlots; ++i) {
    std::string code = i < kStatusSlots - 1 ? std::to_string(kCountedStatuses[i]) : "other";
    Line(out, "chatd_requests_total", "status=\"" + code + "\"", m_->requests[i].load(std::memory_order_relaxed));
  }
  RenderHistogram(out, "chatd_request_duration_seconds", "Time from request to reply, in the pool.",
                  m_->request_latency);
  Counter(out, "chatd_rate_limited_total", "Requests refused by the rate limit (429).", m_->rate_limited);
  Counter(out, "chatd_rate_limiter_failed_open_total", "Requests admitted because the limiter was down.", m_->rate_limiter_failed_open);
  Counter(out, "chatd_auth_failures_total", "Requests refused for missing or bad credentials.", m_->auth_failures);
  Counter(out, "chatd_model_calls_total", "Chat completions asked of the model (retries included).", m_->model_calls);
  Counter(out, "chatd_model_errors_total", "Model calls that ended in an error (502 or 504).", m_->model_errors);
  Counter(out, "chatd_model_timeouts_total", "Model calls that ran out of time (504).", m_->model_timeouts);
  RenderHistogram(out, "chatd_model_duration_seconds", "Time spent waiting on the model per request.",
                  m_->model_latency);
  Counter(out, "chatd_model_prompt_tokens_total", "Prompt tokens the model reported using (usage).", m_->prompt_tokens);
  Counter(out, "chatd_model_completion_tokens_total", "Completion tokens the model reported writing (usage), streams included.", m_->completion_tokens);
  Counter(out, "chatd_chat_streams_total", "Chats asked for as server-sent events.", m_->chat_streams);
  Counter(out, "chatd_chat_streams_client_gone_total", "Streamed chats whose client left before the end; the model was cut off.", m_->chat_streams_client_gone);
  Counter(out, "chatd_recall_degraded_total", "Chats answered without long-term recall (Chroma or embedder down).", m_->recall_degraded);
  Counter(out, "chatd_chroma_calls_total", "HTTP calls to Chroma (request path and indexer).", m_->chroma_calls);
  Counter(out, "chatd_redis_round_trips_total",
          "Round trips to Redis of the request path: chats, the user-data endpoints and health checks, not the "
          "indexer.",
          m_->redis_round_trips);
  Counter(out, "chatd_turns_indexed_total", "Turns moved from Redis into Chroma by the indexers.", m_->turns_indexed);
  Counter(out, "chatd_index_failures_total", "Indexer batches that failed and will be retried.", m_->index_failures);
  Counter(out, "chatd_index_dead_lettered_total", "Turns that could not be indexed and went to the dead letters (chatd:{s<n>}:index:dead).", m_->index_dead_lettered);
  Counter(out, "chatd_index_claimed_total", "Index entries taken over from a worker that stopped.", m_->index_claimed);
  Counter(out, "chatd_index_skipped_settled_total", "Turns an indexer read but did not write: a cleanup archived or forgot the user, or another indexer wrote them, first.", m_->index_skipped_settled);
  Counter(out, "chatd_index_dead_letters_trimmed_total", "Oldest dead letters dropped to keep each shard's within CHATD_INDEX_DEAD_LETTER_MAX.", m_->dead_letters_trimmed);
  Counter(out, "chatd_index_consumers_removed_total", "Consumers of stopped workers removed from the index group once nothing was pending at them.", m_->index_consumers_removed);
  Counter(out, "chatd_recall_long_term_queries_total", "Recalls that asked Chroma for messages older than the hot set.", m_->recall_long_term_queries);
  Counter(out, "chatd_recall_foreign_records_dropped_total", "Records of another user that Chroma returned and recall dropped.", m_->recall_foreign_dropped);
  if (WallMs() - m_->index_backlog_at_ms.load(std::memory_order_relaxed) <= kBacklogFreshMs) {
    Gauge(out, "chatd_index_waiting", "Recorded turns no indexer has read yet.", m_->index_waiting.load(std::memory_order_relaxed));
    Gauge(out, "chatd_index_pending", "Turns an indexer read and has not written yet (failed ones included).", m_->index_pending.load(std::memory_order_relaxed));
    Gauge(out, "chatd_index_oldest_age_seconds", "Age of the oldest turn not yet in long-term memory.", m_->index_oldest_age_ms.load(std::memory_order_relaxed) / 1000.0);
    Gauge(out, "chatd_index_stream_length", "Entries in the index streams chatd:{s<n>}:index, summed over the shards.", static_cast<double>(m_->index_stream_length.load(std::memory_order_relaxed)));
    Gauge(out, "chatd_index_dead_letters", "Entries in the dead-letter streams chatd:{s<n>}:index:dead, summed over the shards.", static_cast<double>(m_->dead_letter_length.load(std::memory_order_relaxed)));
    Gauge(out, "chatd_redis_used_memory_bytes", "Memory Redis uses (INFO memory used_memory).", static_cast<double>(m_->redis_used_memory.load(std::memory_order_relaxed)));
    Gauge(out, "chatd_redis_maxmemory_bytes", "Redis's maxmemory (0: no limit set).", static_cast<double>(m_->redis_maxmemory.load(std::memory_order_relaxed)));
  }
  out.append(extra);
  return out;
}

}  // namespace chatd
