// chatd: one FastCGI worker process. Run under spawn-fcgi + multiwatch, which
// put the listening socket on fd 0 (docs/deployment.md).
//
// Start-up wires the adapters to the chat service, then the main thread waits
// for SIGTERM/SIGINT/SIGUSR1 (multiwatch forwards a stop as SIGUSR1) and stops
// everything gracefully: requests in flight finish, idle threads return at once.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <memory>

#include "chatd/auth.h"
#include "chatd/chat_service.h"
#include "chroma.h"
#include "chatd/cleanup.h"
#include "chatd/config.h"
#include "chatd/embeddings.h"
#include "chatd/fcgi_server.h"
#include "chatd/http_api.h"
#include "chatd/health.h"
#include "http_client.h"
#include "chatd/indexer.h"
#include "chatd/llm.h"
#include "chatd/log.h"
#include "chatd/metrics.h"
#include "chatd/redis.h"
#include "redis_chat_start.h"
#include "redis_idempotency.h"
#include "redis_memory.h"
#include "redis_rate_limiter.h"
#include "chatd/user_data.h"
#include "chatd/wiring.h"
#include "rejection_cache.h"

namespace {

constexpr int kListenFd = 0;  // where spawn-fcgi puts the socket
// The indexer blocks on the stream; its connection needs a longer timeout:
// this much beyond the longest block, which is the linger
// (CHATD_INDEX_LINGER_MS, up to 10 s) or kIndexerBlockMs.
constexpr int64_t kIndexerBlockMs = 500;
constexpr int64_t kIndexerRedisTimeoutMs = 5000;
constexpr int64_t kIndexerMarkerMarginMs = 1000;
// Users over their limit remembered per process (a few MB at most).
constexpr size_t kMaxRememberedRejections = 100000;
// A concurrency lease must outlive the longest live chat: the request deadline
// bounds everything up to the model's answer, and recording the turn may take
// one Redis timeout after it. This margin covers scheduling delays on a busy
// machine; a dead worker's lease frees its slot this long after it was taken.
constexpr int64_t kLeaseMarginMs = 1000;
// Recording a turn is one try and, after a transport error, one more; each
// may wait for a connect and for the reply, both bounded by the Redis timeout.
constexpr int64_t kRecordRedisTimeouts = 4;
// DELETE /api/memory takes the user's cleanup lock, and waits at most half its
// TTL for an indexer to finish writing the user: a request must not wait much
// longer than a chat could.
constexpr int64_t kEraseLockTtlDeadlines = 2;

// A clear line at start-up when Redis refuses us (wrong password, missing
// ACL user), instead of only per-request 503s. Not fatal: exiting would make
// multiwatch respawn and give up, which hides the cause.
void ReportRedisAccess(chatd::RedisClient& redis, const char* role) {
  chatd::Status s = redis.CheckAccess();
  if (!s.ok()) chatd::LogError("redis_access_failed").Str("redis", role).Str("reason", s.reason())
      .Str("detail", s.message()).Emit();
}

std::string ConsumerName() {
  char host[HOST_NAME_MAX + 1] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "host");
  return std::string(host) + "-" + std::to_string(getpid());
}

}  // namespace

int main() {
  using namespace chatd;

  Result<Config> loaded = LoadConfig(ProcessEnv());
  if (!loaded.ok()) {
    std::fprintf(stderr, "chatd: configuration error: %s\n", loaded.status().message().c_str());
    return 2;
  }
  const Config& config = *loaded;

  // hiredis and libcurl write to sockets the peer may have closed.
  signal(SIGPIPE, SIG_IGN);
  // Every thread inherits this mask; only the main thread takes stop signals.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGUSR1);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  InitHttpGlobal();

  Result<std::unique_ptr<Metrics>> metrics = Metrics::Open(config.metrics_path);
  if (!metrics.ok()) {
    std::fprintf(stderr, "chatd: %s\n", metrics.status().message().c_str());
    return 1;
  }
  Adapters adapters = Wire(config, Binary::kChatd, &(*metrics)->shared().chroma_calls);
  const RedisOptions& redis_options = adapters.redis;
  RedisOptions request_redis_options = redis_options;
  request_redis_options.round_trips = &(*metrics)->shared().redis_round_trips;
  RedisClient redis(request_redis_options);
  RedisOptions indexer_redis_options = redis_options;
  indexer_redis_options.timeout_ms =
      kIndexerRedisTimeoutMs + std::max<int64_t>(config.index_linger_ms, kIndexerBlockMs);
  RedisClient indexer_redis(indexer_redis_options);

  std::unique_ptr<RedisClient> rate_redis_own;
  if (config.rate_redis_host != config.redis_host || config.rate_redis_port != config.redis_port ||
      *config.rate_redis_username != config.redis_username || *config.rate_redis_password != config.redis_password ||
      config.rate_redis_cluster != config.redis_cluster) {
    RedisOptions o = request_redis_options;
    o.host = config.rate_redis_host;
    o.port = config.rate_redis_port;
    o.cluster_seeds = config.rate_redis_cluster;
    o.username = *config.rate_redis_username;
    o.password = *config.rate_redis_password;
    rate_redis_own = std::make_unique<RedisClient>(o);
  }
  ReportRedisAccess(redis, "memory");
  if (rate_redis_own) ReportRedisAccess(*rate_redis_own, "counters");
  // The longest a chat can still be recording its turn (the record is sent
  // again once after a transport error): an Idempotency-Key's claim, and a
  // turn's entry in the user's recorded turns, must outlive it, so no retry
  // records twice; and so must the chat's concurrency lease, which the record
  // releases, or the user could briefly run one chat over the cap.
  const int64_t chat_lifetime_ms =
      config.request_deadline_ms + kRecordRedisTimeouts * config.redis_timeout_ms + kLeaseMarginMs;
  // The concurrency leases live with the rate counters: taking one is part of
  // the limiter's script (one round trip for both).
  ConcurrencyCap cap;
  cap.max_in_flight = config.max_concurrent_per_user;
  cap.lease_ttl_ms = chat_lifetime_ms;
  RedisRateLimiter redis_limiter(rate_redis_own ? *rate_redis_own : redis, config.rate_limit, config.rate_window_s,
                                 config.rate_algorithm, cap);
  RejectionCache limiter(redis_limiter, kMaxRememberedRejections, SteadyNowMs);
  RedisShortTermStore recent(redis, config.recent_messages, config.recall_hot_messages, chat_lifetime_ms,
                             config.recall_by_id_max);
  RedisIdempotencyStore idempotency(redis, chat_lifetime_ms);

  ChromaStore& chroma = *adapters.chroma;
  Embedder& embedder = *adapters.embedder;
  Llm& llm = *adapters.llm;

  // The user-data endpoints: the cleanup's erase and restore (shared with
  // chatd-cleanup), limited per user apart from the chat.
  CleanupOptions cleanup_options;
  cleanup_options.archive_dir = config.archive_dir;
  cleanup_options.lock_ttl_ms = kEraseLockTtlDeadlines * config.request_deadline_ms;
  cleanup_options.hot_messages = config.recall_hot_messages;
  cleanup_options.tombstone_ttl_ms = EraseTombstoneTtlMs(config);
  Cleanup cleanup(redis, chroma, embedder, cleanup_options);
  UserData user_data(redis, chroma, cleanup, config.archive_dir);
  RedisRateLimiter data_limiter(rate_redis_own ? *rate_redis_own : redis, config.data_rate_limit,
                                config.data_rate_window_s, RateAlgorithm::kFixed, {}, RateCounter::kData);

  ChatServiceOptions chat_options;
  chat_options.archived = &user_data;
  chat_options.rate_failure_mode = config.rate_failure_mode;
  chat_options.recall_k = static_cast<size_t>(config.recall_k);
  chat_options.system_prompt = config.system_prompt;
  chat_options.prompt_budget_bytes = config.prompt_budget_bytes;
  // When the counters share the memory Redis, recording the turn gives the
  // lease back in the same script; otherwise a ZREM on the counters' Redis.
  chat_options.record_turn_releases_lease = !rate_redis_own;
  // And then the admission and the memory read go in one round trip.
  RedisChatStart chat_start(redis, redis_limiter, &limiter, recent);
  if (!rate_redis_own) chat_options.starter = &chat_start;
  chat_options.idempotency_keep_ms = config.idempotency_ttl_s * 1000;
  ChatService chat(limiter, recent, chroma, embedder, llm, chat_options, &idempotency);
  Result<std::unique_ptr<Authenticator>> auth = MakeAuthenticator(config.auth_mode, config.auth);
  if (!auth.ok()) {
    std::fprintf(stderr, "chatd: configuration error: %s\n", auth.status().message().c_str());
    return 2;
  }
  if (!*auth) {
    LogWarn("auth_off").Str("detail", "CHATD_AUTH_MODE=off: the body's userId is trusted").Emit();
  } else {
    LogInfo("auth").Str("mode", config.auth_mode == AuthMode::kJwt ? "jwt" : "service").Emit();
  }
  (*metrics)->RegisterWorker();
  // OpenAI itself needs a key; a local OpenAI-compatible server may not.
  bool model_configured = !config.openai_api_key.empty() || config.openai_base_url != Config().openai_base_url;
  StackHealthProbe health(redis, rate_redis_own.get(), chroma, model_configured);
  HttpApi api(config, chat, auth->get(), metrics->get(), &health);
  api.EnableUserData(&user_data, &data_limiter);

  IndexerOptions indexer_options;
  indexer_options.consumer = ConsumerName();
  indexer_options.batch = config.index_batch;
  indexer_options.block_ms = kIndexerBlockMs;
  indexer_options.claim_idle_ms = config.index_claim_idle_ms;
  indexer_options.retry_pause_ms = config.index_retry_ms;
  indexer_options.linger_ms = config.index_linger_ms;
  indexer_options.max_deliveries = config.index_max_deliveries;
  indexer_options.dead_letter_max = config.index_dead_letter_max;
  indexer_options.consumer_gone_ms = config.index_consumer_gone_ms;
  indexer_options.hot_messages = config.recall_hot_messages;
  // One pass writes each shard of the batch once (two calls when a shard
  // collection must be found again), then, after a failure, up to one call
  // per entry; each is bounded by the Chroma timeout.
  const int64_t calls_per_pass = 2 * std::min(config.chroma_shards, config.index_batch) + config.index_batch;
  indexer_options.marker_ttl_ms = calls_per_pass * config.chroma_timeout_ms + kIndexerMarkerMarginMs;
  Indexer indexer(indexer_redis, chroma, embedder, indexer_options, metrics->get());

  FcgiServer server(kListenFd, config.threads, config.max_body_bytes,
                    [&api](const HttpRequest& req, RequestContext& ctx, ResponseStream& stream) {
                      return api.Handle(req, ctx, &stream);
                    },
                    metrics->get());
  if (Status s = server.Start(); !s.ok()) {
    std::fprintf(stderr, "chatd: %s\n", s.message().c_str());
    return 1;
  }
  indexer.Start();
  LogInfo("start").Int("threads", config.threads).Emit();

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  LogInfo("stopping").Int("signal", sig).Emit();
  server.Stop();
  server.Join();
  indexer.Stop();
  LogInfo("stopped").Emit();
  return 0;
}
