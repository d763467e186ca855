#include "chatd/config.h"

#include <cerrno>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "secret_file.h"

namespace chatd {

namespace {

// Each Read* leaves the field at its default when the variable is unset and
// records the first error it meets, so LoadConfig reads top to bottom.
class Reader {
 public:
  explicit Reader(const EnvLookup& env) : env_(env) {}

  void Int(const char* name, int64_t& out, int64_t min, int64_t max) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    errno = 0;
    char* end = nullptr;
    long long parsed = std::strtoll(v->c_str(), &end, 10);
    if (v->empty() || errno != 0 || *end != '\0' || parsed < min || parsed > max) {
      Fail(name, "must be a whole number from " + std::to_string(min) + " to " + std::to_string(max) +
                     ", got \"" + *v + "\"");
      return;
    }
    out = parsed;
  }
  void Int(const char* name, int& out, int64_t min, int64_t max) {
    int64_t wide = out;
    Int(name, wide, min, max);
    out = static_cast<int>(wide);
  }
  void Size(const char* name, size_t& out, int64_t min, int64_t max) {
    int64_t wide = static_cast<int64_t>(out);
    Int(name, wide, min, max);
    out = static_cast<size_t>(wide);
  }

  void String(const char* name, std::string& out, bool allow_empty) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    if (v->empty() && !allow_empty) {
      Fail(name, "must not be empty");
      return;
    }
    out = *v;
  }

  void Url(const char* name, std::string& out) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    std::string_view s = *v;
    if (!(s.starts_with("http://") || s.starts_with("https://")) || s.size() < 10) {
      Fail(name, "must be an http:// or https:// URL, got \"" + *v + "\"");
      return;
    }
    while (!s.empty() && s.back() == '/') s.remove_suffix(1);  // we append paths
    out = std::string(s);
  }

  template <typename E>
  void Enum(const char* name, E& out, std::initializer_list<std::pair<std::string_view, E>> choices) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    std::string allowed;
    for (const auto& [word, value] : choices) {
      if (*v == word) {
        out = value;
        return;
      }
      allowed += (allowed.empty() ? "" : ", ") + std::string(word);
    }
    Fail(name, "must be one of " + allowed + ", got \"" + *v + "\"");
  }

  // A secret from the file the variable names (never from the variable
  // itself: the environment leaks into process listings and crash reports).
  // One trailing newline, as editors leave it, is not part of the secret.
  void SecretFile(const char* name, std::string& out) {
    auto path = env_(name);
    if (!path || !status_.ok()) return;
    if (path->empty()) {
      Fail(name, "must not be empty");
      return;
    }
    Result<std::string> text = ReadProtectedFile(*path, name, kSecretForbiddenBits);
    if (!text.ok()) {
      status_ = text.status();
      return;
    }
    std::string secret = std::move(*text);
    if (secret.ends_with('\n')) secret.pop_back();
    if (secret.ends_with('\r')) secret.pop_back();
    // It travels in a protocol line or an HTTP header: a control character
    // there would split it (header injection) or be refused far from here.
    bool printable = !secret.empty();
    for (unsigned char ch : secret) printable = printable && ch >= 0x20 && ch != 0x7f;
    if (!printable) {
      Fail(name, "names a file that is empty or holds control characters (the secret must be one line)");
      return;
    }
    out = std::move(secret);
  }

  // host:port,host:port,... (a host may be an IPv6 address: the port follows
  // the last colon).
  void AddressList(const char* name, std::vector<RedisAddress>& out) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    std::vector<RedisAddress> list;
    std::string_view rest = *v;
    while (true) {
      const size_t comma = rest.find(',');
      std::string_view item = rest.substr(0, comma);
      const size_t colon = item.rfind(':');
      errno = 0;
      char* end = nullptr;
      const std::string port_text(colon == std::string_view::npos ? "" : item.substr(colon + 1));
      const long port = std::strtol(port_text.c_str(), &end, 10);
      if (colon == std::string_view::npos || colon == 0 || port_text.empty() || errno != 0 || *end != '\0' || port < 1 ||
          port > kMaxPortNumber) {
        Fail(name, "must be host:port[,host:port...], got \"" + *v + "\"");
        return;
      }
      list.push_back(RedisAddress{std::string(item.substr(0, colon)), static_cast<int>(port)});
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
    out = std::move(list);
  }

  // A name that becomes one segment of a URL path.
  void PathSegment(const char* name, std::string& out) {
    auto v = env_(name);
    if (!v || !status_.ok()) return;
    bool ok = !v->empty() && v->size() <= kMaxPathSegment;
    for (char ch : *v) {
      ok = ok && ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
                  ch == '-' || ch == '.');
    }
    if (!ok || *v == "." || *v == "..") {
      Fail(name, "must be 1 to " + std::to_string(kMaxPathSegment) + " characters of A-Z a-z 0-9 _ - ., got \"" +
                     *v + "\"");
      return;
    }
    out = *v;
  }

  void Fail(const char* name, const std::string& why) {
    if (status_.ok()) status_ = InvalidArgument("bad_config", std::string(name) + " " + why);
  }

  const Status& status() const { return status_; }

 private:
  static constexpr size_t kMaxPathSegment = 128;
  static constexpr long kMaxPortNumber = 65535;

  const EnvLookup& env_;
  Status status_;
};

constexpr int64_t kMaxThreads = 1024;
constexpr int64_t kMaxBodyLimit = 16 * 1024 * 1024;
constexpr int64_t kMaxTimeoutMs = 10 * 60 * 1000;
constexpr int64_t kMaxRetries = 5;
constexpr int64_t kMaxRecent = 100;
constexpr int64_t kMaxRecall = 100;
constexpr int64_t kMaxDimensions = 8192;
// The hot set is read whole on every chat: a few hundred records is already
// hundreds of kilobytes per request.
constexpr int64_t kMaxHotMessages = 1000;
// Read by id with their embeddings on every chat of such a user: about 3 KiB
// of JSON per message at 256 dimensions.
constexpr int64_t kMaxRecallById = 1000;
constexpr int64_t kMaxChromaShards = 4096;  // as chroma.h; config does not depend on the adapter
// The HNSW build of new shards. Below these the graph stops being a useful
// index even for filtered search; above, a write costs many times the default.
constexpr int64_t kMinHnswMaxNeighbors = 4;
constexpr int64_t kMaxHnswMaxNeighbors = 64;
constexpr int64_t kMinHnswEfConstruction = 10;
constexpr int64_t kMaxHnswEfConstruction = 1000;
constexpr int64_t kMaxTokens = 1 << 20;
constexpr int64_t kMaxRateLimit = 1'000'000;
constexpr int64_t kMaxWindowS = 24 * 3600;
constexpr int64_t kMaxPort = 65535;
constexpr int64_t kMaxConcurrentPerUser = 100'000;
// Every kept answer holds a reply in Redis: a month is already generous.
constexpr int64_t kMaxIdempotencyTtlS = 30 * 24 * 3600;

}  // namespace

EnvLookup ProcessEnv() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

AuthConfig ReadAuthConfig(const EnvLookup& env) {
  auto get = [&env](const char* name) {
    std::optional<std::string> v = env(name);
    if (v && v->empty()) v.reset();
    return v;
  };
  AuthConfig a;
  a.service_tokens = get("CHATD_SERVICE_TOKENS");
  a.service_tokens_file = get("CHATD_SERVICE_TOKENS_FILE");
  a.jwt_algorithm = get("CHATD_JWT_ALGORITHM");
  a.jwt_issuer = get("CHATD_JWT_ISSUER");
  a.jwt_audience = get("CHATD_JWT_AUDIENCE");
  a.jwt_secret = get("CHATD_JWT_SECRET");
  a.jwt_secret_file = get("CHATD_JWT_SECRET_FILE");
  a.jwt_public_key_file = get("CHATD_JWT_PUBLIC_KEY_FILE");
  a.jwt_leeway_s = get("CHATD_JWT_LEEWAY_S");
  return a;
}

Result<Config> LoadConfig(const EnvLookup& env) {
  Config c;
  Reader r(env);

  r.Int("CHATD_THREADS", c.threads, 1, kMaxThreads);

  r.Size("CHATD_MAX_BODY_BYTES", c.max_body_bytes, 64, kMaxBodyLimit);
  r.Size("CHATD_MAX_MESSAGE_BYTES", c.max_message_bytes, 1, kMaxBodyLimit);
  r.Int("CHATD_REQUEST_DEADLINE_MS", c.request_deadline_ms, 100, kMaxTimeoutMs);

  r.Url("OPENAI_BASE_URL", c.openai_base_url);
  r.String("OPENAI_API_KEY", c.openai_api_key, /*allow_empty=*/true);
  r.String("CHATD_MODEL", c.model, false);
  r.Int("CHATD_MAX_COMPLETION_TOKENS", c.max_completion_tokens, 1, kMaxTokens);
  r.Enum("CHATD_MAX_TOKENS_FIELD", c.max_tokens_field,
         {{"max_completion_tokens", std::string("max_completion_tokens")}, {"max_tokens", std::string("max_tokens")}});
  r.Int("CHATD_LLM_CONNECT_TIMEOUT_MS", c.llm_connect_timeout_ms, 10, kMaxTimeoutMs);
  r.Int("CHATD_LLM_ATTEMPT_TIMEOUT_MS", c.llm_attempt_timeout_ms, 10, kMaxTimeoutMs);
  r.Int("CHATD_LLM_MAX_RETRIES", c.llm_max_retries, 0, kMaxRetries);
  r.Int("CHATD_LLM_BACKOFF_BASE_MS", c.llm_backoff_base_ms, 0, kMaxTimeoutMs);
  r.Int("CHATD_LLM_BACKOFF_MAX_MS", c.llm_backoff_max_ms, 0, kMaxTimeoutMs);
  r.Int("CHATD_LLM_STREAM_IDLE_MS", c.llm_stream_idle_ms, 10, kMaxTimeoutMs);

  r.String("CHATD_REDIS_HOST", c.redis_host, false);
  r.Int("CHATD_REDIS_PORT", c.redis_port, 1, kMaxPort);
  r.Int("CHATD_REDIS_TIMEOUT_MS", c.redis_timeout_ms, 1, kMaxTimeoutMs);
  r.String("CHATD_REDIS_USERNAME", c.redis_username, false);
  r.SecretFile("CHATD_REDIS_PASSWORD_FILE", c.redis_password);
  r.AddressList("CHATD_REDIS_CLUSTER", c.redis_cluster);

  r.String("CHATD_RATE_REDIS_HOST", c.rate_redis_host, false);
  r.Int("CHATD_RATE_REDIS_PORT", c.rate_redis_port, 1, kMaxPort);
  std::string rate_username, rate_password;
  r.String("CHATD_RATE_REDIS_USERNAME", rate_username, false);
  r.SecretFile("CHATD_RATE_REDIS_PASSWORD_FILE", rate_password);
  r.AddressList("CHATD_RATE_REDIS_CLUSTER", c.rate_redis_cluster);
  if (!rate_username.empty()) c.rate_redis_username = std::move(rate_username);
  if (!rate_password.empty()) c.rate_redis_password = std::move(rate_password);
  r.Int("CHATD_RATE_LIMIT", c.rate_limit, 1, kMaxRateLimit);
  r.Int("CHATD_RATE_WINDOW_S", c.rate_window_s, 1, kMaxWindowS);
  r.Int("CHATD_DATA_RATE_LIMIT", c.data_rate_limit, 1, kMaxRateLimit);
  r.Int("CHATD_DATA_RATE_WINDOW_S", c.data_rate_window_s, 1, kMaxWindowS);
  r.Enum("CHATD_RATE_ALGORITHM", c.rate_algorithm,
         {{"fixed", RateAlgorithm::kFixed}, {"sliding", RateAlgorithm::kSliding}});
  r.Enum("CHATD_RATE_FAILURE_MODE", c.rate_failure_mode,
         {{"closed", FailureMode::kClosed}, {"open", FailureMode::kOpen}});
  r.Int("CHATD_MAX_CONCURRENT_PER_USER", c.max_concurrent_per_user, 0, kMaxConcurrentPerUser);
  r.Int("CHATD_IDEMPOTENCY_TTL_S", c.idempotency_ttl_s, 1, kMaxIdempotencyTtlS);

  r.Int("CHATD_RECENT_MESSAGES", c.recent_messages, 2, kMaxRecent);
  r.Int("CHATD_RECALL_K", c.recall_k, 0, kMaxRecall);
  r.Url("CHATD_CHROMA_URL", c.chroma_url);
  r.Int("CHATD_CHROMA_TIMEOUT_MS", c.chroma_timeout_ms, 10, kMaxTimeoutMs);
  r.Int("CHATD_CHROMA_SYNC_THRESHOLD", c.chroma_sync_threshold, 2, 1'000'000);
  r.Int("CHATD_CHROMA_HNSW_MAX_NEIGHBORS", c.chroma_hnsw_max_neighbors, kMinHnswMaxNeighbors, kMaxHnswMaxNeighbors);
  r.Int("CHATD_CHROMA_HNSW_EF_CONSTRUCTION", c.chroma_hnsw_ef_construction, kMinHnswEfConstruction,
        kMaxHnswEfConstruction);
  r.Int("CHATD_CHROMA_SHARDS", c.chroma_shards, 1, kMaxChromaShards);
  r.Int("CHATD_RECALL_HOT_MESSAGES", c.recall_hot_messages, 1, kMaxHotMessages);
  r.Int("CHATD_RECALL_BY_ID_MAX", c.recall_by_id_max, 0, kMaxRecallById);
  r.PathSegment("CHATD_CHROMA_TENANT", c.chroma_tenant);
  r.PathSegment("CHATD_CHROMA_DATABASE", c.chroma_database);
  r.SecretFile("CHATD_CHROMA_TOKEN_FILE", c.chroma_token);
  r.Enum("CHATD_CHROMA_TOKEN_HEADER", c.chroma_token_header,
         {{"Authorization", std::string("Authorization")}, {"X-Chroma-Token", std::string("X-Chroma-Token")}});
  r.String("CHATD_SYSTEM_PROMPT", c.system_prompt, /*allow_empty=*/true);
  r.Size("CHATD_PROMPT_BUDGET_BYTES", c.prompt_budget_bytes, 256, kMaxBodyLimit);

  r.Enum("CHATD_EMBEDDER", c.embedder, {{"local", EmbedderKind::kLocal}, {"openai", EmbedderKind::kOpenAI}});
  r.String("CHATD_EMBEDDING_MODEL", c.embedding_model, false);
  r.Int("CHATD_EMBEDDING_DIMENSIONS", c.embedding_dimensions, 8, kMaxDimensions);

  r.Int("CHATD_INDEX_CLAIM_IDLE_MS", c.index_claim_idle_ms, 100, kMaxTimeoutMs);
  r.Int("CHATD_INDEX_BATCH", c.index_batch, 1, 1000);
  r.Int("CHATD_INDEX_LINGER_MS", c.index_linger_ms, 0, 10000);
  r.Int("CHATD_INDEX_RETRY_MS", c.index_retry_ms, 10, kMaxTimeoutMs);
  r.Int("CHATD_INDEX_MAX_DELIVERIES", c.index_max_deliveries, 1, 1000);
  r.Int("CHATD_INDEX_LAG_DEGRADED_MS", c.index_lag_degraded_ms, 100, kMaxTimeoutMs);
  r.Int("CHATD_INDEX_DEAD_LETTER_MAX", c.index_dead_letter_max, 1, 100000000);
  r.Int("CHATD_INDEX_CONSUMER_GONE_MS", c.index_consumer_gone_ms, 1000, 30 * 24 * 3600 * 1000LL);

  r.Int("CHATD_CLEANUP_INACTIVE_S", c.cleanup_inactive_s, 0, 10 * 365 * 24 * 3600LL);
  r.String("CHATD_ARCHIVE_DIR", c.archive_dir, false);
  r.Int("CHATD_CLEANUP_BATCH", c.cleanup_batch, 1, 10000);
  r.Int("CHATD_CLEANUP_LOCK_TTL_MS", c.cleanup_lock_ttl_ms, 1000, 24 * 3600 * 1000LL);
  r.Int("CHATD_CLEANUP_REDIS_WAIT_MS", c.cleanup_redis_wait_ms, 0, 24 * 3600 * 1000LL);
  r.Int("CHATD_CLEANUP_NOW_MS", c.cleanup_now_ms, 0, std::numeric_limits<int64_t>::max() / 2);

  r.Enum("CHATD_AUTH_MODE", c.auth_mode,
         {{"off", AuthMode::kOff}, {"service", AuthMode::kService}, {"jwt", AuthMode::kJwt}});
  c.auth = ReadAuthConfig(env);

  r.String("CHATD_METRICS_FILE", c.metrics_path, /*allow_empty=*/true);

  if (!r.status().ok()) return r.status();
  // Counters follow the memory store unless given a store of their own.
  const bool own_rate_redis = !c.rate_redis_host.empty() || c.rate_redis_port != 0;
  if (c.rate_redis_cluster.empty() && !own_rate_redis) c.rate_redis_cluster = c.redis_cluster;
  if (!c.rate_redis_cluster.empty() && own_rate_redis) {
    return InvalidArgument("bad_config", "CHATD_RATE_REDIS_CLUSTER and CHATD_RATE_REDIS_HOST/PORT name two "
                                         "counter stores: set one");
  }
  if (c.rate_redis_host.empty()) c.rate_redis_host = c.redis_host;
  if (c.rate_redis_port == 0) c.rate_redis_port = c.redis_port;
  if (!c.rate_redis_username) c.rate_redis_username = c.redis_username;
  if (!c.rate_redis_password) c.rate_redis_password = c.redis_password;

  // Cross-field rules.
  if (!c.redis_username.empty() && c.redis_password.empty()) {
    return InvalidArgument("bad_config", "CHATD_REDIS_USERNAME needs CHATD_REDIS_PASSWORD_FILE: an ACL user "
                                         "authenticates with a password");
  }
  if (!c.rate_redis_username->empty() && c.rate_redis_password->empty()) {
    return InvalidArgument("bad_config", "CHATD_RATE_REDIS_USERNAME needs CHATD_RATE_REDIS_PASSWORD_FILE (or "
                                         "CHATD_REDIS_PASSWORD_FILE)");
  }
  if (c.recent_messages % 2 != 0) {
    return InvalidArgument("bad_config", "CHATD_RECENT_MESSAGES must be even: the recent list holds whole turns");
  }
  if (c.max_message_bytes > c.max_body_bytes) {
    return InvalidArgument("bad_config", "CHATD_MAX_MESSAGE_BYTES must not exceed CHATD_MAX_BODY_BYTES");
  }
  if (c.max_message_bytes >= c.prompt_budget_bytes) {
    return InvalidArgument("bad_config",
                           "CHATD_PROMPT_BUDGET_BYTES must exceed CHATD_MAX_MESSAGE_BYTES: the new message "
                           "always fits");
  }
  if (c.llm_backoff_base_ms > c.llm_backoff_max_ms) {
    return InvalidArgument("bad_config", "CHATD_LLM_BACKOFF_BASE_MS must not exceed CHATD_LLM_BACKOFF_MAX_MS");
  }
  return c;
}

}  // namespace chatd
