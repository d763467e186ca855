// All configuration, from environment variables only, validated at start-up.
// docs/configuration.md lists every variable; keep the two in step.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "chatd/rate_limiter.h"
#include "chatd/redis.h"
#include "chatd/status.h"

namespace chatd {

enum class RateAlgorithm { kFixed, kSliding };
enum class EmbedderKind { kLocal, kOpenAI };
enum class AuthMode { kOff, kService, kJwt };

// Auth's variables as they are set; empty counts as unset (an empty secret is
// never what was meant). MakeAuthenticator (auth.h) checks them for the
// configured mode only, so a variable another mode would use cannot stop a
// start.
struct AuthConfig {
  std::optional<std::string> service_tokens;       // CHATD_SERVICE_TOKENS
  std::optional<std::string> service_tokens_file;  // CHATD_SERVICE_TOKENS_FILE
  std::optional<std::string> jwt_algorithm;        // CHATD_JWT_ALGORITHM
  std::optional<std::string> jwt_issuer;           // CHATD_JWT_ISSUER
  std::optional<std::string> jwt_audience;         // CHATD_JWT_AUDIENCE
  std::optional<std::string> jwt_secret;           // CHATD_JWT_SECRET
  std::optional<std::string> jwt_secret_file;      // CHATD_JWT_SECRET_FILE
  std::optional<std::string> jwt_public_key_file;  // CHATD_JWT_PUBLIC_KEY_FILE
  std::optional<std::string> jwt_leeway_s;         // CHATD_JWT_LEEWAY_S
};

struct Config {
  // Pool
  int threads = 8;  // CHATD_THREADS: FastCGI threads per worker process

  // HTTP contract
  size_t max_body_bytes = 64 * 1024;     // CHATD_MAX_BODY_BYTES (nginx client_max_body_size agrees)
  size_t max_message_bytes = 8 * 1024;   // CHATD_MAX_MESSAGE_BYTES (UTF-8 bytes of "message")
  int64_t request_deadline_ms = 30000;   // CHATD_REQUEST_DEADLINE_MS: whole request, retries included

  // Model (OpenAI-compatible)
  std::string openai_base_url = "https://api.openai.com/v1";  // OPENAI_BASE_URL
  std::string openai_api_key;                                  // OPENAI_API_KEY (may be empty for local servers)
  std::string model = "gpt-4o-mini";                           // CHATD_MODEL
  int64_t max_completion_tokens = 512;                         // CHATD_MAX_COMPLETION_TOKENS
  std::string max_tokens_field = "max_completion_tokens";      // CHATD_MAX_TOKENS_FIELD: or max_tokens
  int64_t llm_connect_timeout_ms = 2000;                       // CHATD_LLM_CONNECT_TIMEOUT_MS
  int64_t llm_attempt_timeout_ms = 20000;                      // CHATD_LLM_ATTEMPT_TIMEOUT_MS
  int llm_max_retries = 2;                                     // CHATD_LLM_MAX_RETRIES
  int64_t llm_backoff_base_ms = 500;                           // CHATD_LLM_BACKOFF_BASE_MS
  int64_t llm_backoff_max_ms = 8000;                           // CHATD_LLM_BACKOFF_MAX_MS
  int64_t llm_stream_idle_ms = 10000;  // CHATD_LLM_STREAM_IDLE_MS: longest wait for the next piece of a stream

  // Redis
  std::string redis_host = "127.0.0.1";  // CHATD_REDIS_HOST
  int redis_port = 6379;                 // CHATD_REDIS_PORT
  // Connect and each command. Short next to a model call, but not so short
  // that a burst of thousands of chats on a small machine, where a thread
  // may wait for a core for a few hundred ms, reads as Redis being down.
  int64_t redis_timeout_ms = 1000;       // CHATD_REDIS_TIMEOUT_MS
  // Credentials (AUTH on every new connection). Empty password: no AUTH.
  std::string redis_username;  // CHATD_REDIS_USERNAME: an ACL user; empty = the default user
  std::string redis_password;  // from CHATD_REDIS_PASSWORD_FILE (a secret: never logged)
  // CHATD_REDIS_CLUSTER: seed nodes of a Redis Cluster (host:port,...), used
  // instead of CHATD_REDIS_HOST/PORT; empty = one Redis.
  std::vector<RedisAddress> redis_cluster;

  // Rate limit. Counters may live in a Redis of their own (default: the
  // memory Redis); only then does fail-open keep chats going during an outage
  // of the counter store.
  std::string rate_redis_host;  // CHATD_RATE_REDIS_HOST, default CHATD_REDIS_HOST
  int rate_redis_port = 0;      // CHATD_RATE_REDIS_PORT, default CHATD_REDIS_PORT
  // CHATD_RATE_REDIS_CLUSTER; default CHATD_REDIS_CLUSTER unless
  // CHATD_RATE_REDIS_HOST/PORT name a Redis of its own.
  std::vector<RedisAddress> rate_redis_cluster;
  // Default to the memory Redis's credentials, like the address.
  std::optional<std::string> rate_redis_username;  // CHATD_RATE_REDIS_USERNAME
  std::optional<std::string> rate_redis_password;  // from CHATD_RATE_REDIS_PASSWORD_FILE
  int64_t rate_limit = 30;                           // CHATD_RATE_LIMIT: requests per window
  int64_t rate_window_s = 60;                        // CHATD_RATE_WINDOW_S
  RateAlgorithm rate_algorithm = RateAlgorithm::kFixed;  // CHATD_RATE_ALGORITHM: fixed|sliding
  FailureMode rate_failure_mode = FailureMode::kClosed;  // CHATD_RATE_FAILURE_MODE: closed|open
  // Chats of one user in flight at once, across every worker and host. Each
  // holds a thread for up to the request deadline, so without a cap one user
  // could occupy the whole pool. 0: no cap (no lease is taken at all).
  int64_t max_concurrent_per_user = 4;  // CHATD_MAX_CONCURRENT_PER_USER
  // How long the answer to a request with an Idempotency-Key is replayed to
  // a retry with the same key and body (the IETF draft leaves it to us).
  int64_t idempotency_ttl_s = 24 * 3600;  // CHATD_IDEMPOTENCY_TTL_S
  // The user-data endpoints (/api/history, /api/export, DELETE /api/memory)
  // count against a limit of their own (fixed window), not the chat's.
  int64_t data_rate_limit = 30;    // CHATD_DATA_RATE_LIMIT: requests per window
  int64_t data_rate_window_s = 60;  // CHATD_DATA_RATE_WINDOW_S

  // Memory
  int recent_messages = 4;            // CHATD_RECENT_MESSAGES (even: whole turns)
  int recall_k = 5;                   // CHATD_RECALL_K
  std::string chroma_url = "http://127.0.0.1:8000";  // CHATD_CHROMA_URL
  int64_t chroma_timeout_ms = 1000;   // CHATD_CHROMA_TIMEOUT_MS: per call on the request path
  int chroma_sync_threshold = 1000;   // CHATD_CHROMA_SYNC_THRESHOLD: HNSW persistence for new collections
  int chroma_hnsw_max_neighbors = 8;  // CHATD_CHROMA_HNSW_MAX_NEIGHBORS: HNSW M of new collections
  int chroma_hnsw_ef_construction = 40;  // CHATD_CHROMA_HNSW_EF_CONSTRUCTION: of new collections
  int chroma_shards = 16;             // CHATD_CHROMA_SHARDS: collections the users are spread over
  int recall_hot_messages = 64;       // CHATD_RECALL_HOT_MESSAGES: per-user hot set ranked in process
  int recall_by_id_max = 128;         // CHATD_RECALL_BY_ID_MAX: older messages read by id, not searched
  std::string chroma_tenant = "default_tenant";      // CHATD_CHROMA_TENANT (must exist)
  std::string chroma_database = "default_database";  // CHATD_CHROMA_DATABASE (must exist)
  std::string chroma_token;  // from CHATD_CHROMA_TOKEN_FILE (a secret); empty sends no token
  std::string chroma_token_header = "Authorization";  // CHATD_CHROMA_TOKEN_HEADER: Authorization|X-Chroma-Token
  std::string system_prompt = "You are a helpful assistant.";  // CHATD_SYSTEM_PROMPT
  size_t prompt_budget_bytes = 24 * 1024;  // CHATD_PROMPT_BUDGET_BYTES: memories + recent + new message

  // Embeddings
  EmbedderKind embedder = EmbedderKind::kLocal;        // CHATD_EMBEDDER: local|openai
  std::string embedding_model = "text-embedding-3-small";  // CHATD_EMBEDDING_MODEL
  int embedding_dimensions = 256;     // CHATD_EMBEDDING_DIMENSIONS

  // Background indexer (Redis stream -> Chroma)
  int64_t index_claim_idle_ms = 30000;  // CHATD_INDEX_CLAIM_IDLE_MS: take over entries a dead worker left
  int index_batch = 256;                // CHATD_INDEX_BATCH
  int64_t index_linger_ms = 100;        // CHATD_INDEX_LINGER_MS: gather arriving turns before a write
  int64_t index_retry_ms = 1000;        // CHATD_INDEX_RETRY_MS: pause before a failed entry is retried
  int index_max_deliveries = 5;         // CHATD_INDEX_MAX_DELIVERIES: then a turn failing alone is dead-lettered
  int64_t index_lag_degraded_ms = 60000;  // CHATD_INDEX_LAG_DEGRADED_MS: health says degraded past this backlog age
  int64_t index_dead_letter_max = 10000;  // CHATD_INDEX_DEAD_LETTER_MAX: each shard's dead letters keep about this many
  int64_t index_consumer_gone_ms = 3600000;  // CHATD_INDEX_CONSUMER_GONE_MS: idle consumers with nothing pending go

  // Cleanup of inactive users (chatd-cleanup)
  int64_t cleanup_inactive_s = 24 * 3600;                // CHATD_CLEANUP_INACTIVE_S
  std::string archive_dir = "/var/lib/chatd/archive";     // CHATD_ARCHIVE_DIR
  int cleanup_batch = 100;                               // CHATD_CLEANUP_BATCH
  int64_t cleanup_lock_ttl_ms = 10 * 60 * 1000;          // CHATD_CLEANUP_LOCK_TTL_MS (the run's lease too)
  int64_t cleanup_redis_wait_ms = 120000;  // CHATD_CLEANUP_REDIS_WAIT_MS: wait through a Redis restart this long
  int64_t cleanup_now_ms = 0;  // CHATD_CLEANUP_NOW_MS: a pretend clock for tests; 0 = Redis TIME

  // Access control
  // Secure by default: "off" must be asked for (make run does, and says so).
  AuthMode auth_mode = AuthMode::kJwt;  // CHATD_AUTH_MODE: off|service|jwt (details: auth.h)
  AuthConfig auth;                      // the mode's own variables

  // Observability
  std::string metrics_path;             // CHATD_METRICS_FILE: shared counters of the pool
};

// How long an erase's tombstone fences the user's chats that started before
// it: longer than any chat can live (the request deadline bounds everything up
// to the model's answer, one Redis timeout the record after it), plus
// kEraseTombstoneMarginMs for scheduling delays on a busy machine.
inline constexpr int64_t kEraseTombstoneMarginMs = 5000;
inline int64_t EraseTombstoneTtlMs(const Config& c) {
  return c.request_deadline_ms + c.redis_timeout_ms + kEraseTombstoneMarginMs;
}

// Looks a variable up; returns nullopt when unset. Injected so tests need no
// real environment.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
EnvLookup ProcessEnv();

// Auth's variables, unchecked (LoadConfig uses it for Config::auth).
AuthConfig ReadAuthConfig(const EnvLookup& env);

// Reads and validates every variable. The error names the variable and says why.
Result<Config> LoadConfig(const EnvLookup& env);

}  // namespace chatd
