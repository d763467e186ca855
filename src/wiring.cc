#include "chatd/wiring.h"

#include <algorithm>
#include <utility>

#include "local_embedder.h"
#include "openai_chat.h"
#include "openai_embedder.h"
#include "wiring_internal.h"

namespace chatd {

namespace {

// The cleanup's patience with Chroma (and the embedding model), and with
// Redis: it is not latency-bound.
constexpr int64_t kCleanupChromaTimeoutMs = 30000;
constexpr int64_t kCleanupRedisTimeoutMs = 5000;

}  // namespace

RedisOptions MakeRedisOptions(const Config& c, Binary binary) {
  RedisOptions o;
  o.host = c.redis_host;
  o.port = c.redis_port;
  o.timeout_ms = c.redis_timeout_ms;
  o.username = c.redis_username;
  o.password = c.redis_password;
  o.cluster_seeds = c.redis_cluster;
  if (binary == Binary::kChatd) {
    // Every request thread may hold a connection at once; keeping that many
    // idle spares a burst of synchronised requests a storm of new connections
    // (which is what made 2,000 chats in flight time out in the capacity
    // benchmark).
    o.max_idle = static_cast<size_t>(c.threads) + 1;
  } else {
    o.timeout_ms = std::max(c.redis_timeout_ms, kCleanupRedisTimeoutMs);
    // A Redis restarting (loading its data) or busy with a long script is
    // waited for, within a bound, rather than failing every user.
    o.transient_wait_ms = c.cleanup_redis_wait_ms;
  }
  return o;
}

ChromaOptions MakeChromaOptions(const Config& c, Binary binary, std::atomic<uint64_t>* calls) {
  ChromaOptions o;
  o.base_url = c.chroma_url;
  o.timeout_ms = binary == Binary::kChatd ? c.chroma_timeout_ms : std::max(c.chroma_timeout_ms, kCleanupChromaTimeoutMs);
  o.hnsw.sync_threshold = c.chroma_sync_threshold;
  o.hnsw.max_neighbors = c.chroma_hnsw_max_neighbors;
  o.hnsw.ef_construction = c.chroma_hnsw_ef_construction;
  o.shards = c.chroma_shards;
  o.tenant = c.chroma_tenant;
  o.database = c.chroma_database;
  o.token = c.chroma_token;
  o.token_header = c.chroma_token_header;
  o.call_counter = calls;
  return o;
}

OpenAIEmbedderOptions MakeOpenAIEmbedderOptions(const Config& c, Binary binary) {
  OpenAIEmbedderOptions o;
  o.base_url = c.openai_base_url;
  o.api_key = c.openai_api_key;
  o.model = c.embedding_model;
  o.dimensions = static_cast<size_t>(c.embedding_dimensions);
  o.connect_timeout_ms = c.llm_connect_timeout_ms;
  // On the request path an embedding is as short as a recall.
  o.timeout_ms = binary == Binary::kChatd ? c.chroma_timeout_ms : kCleanupChromaTimeoutMs;
  return o;
}

OpenAIChatOptions MakeOpenAIChatOptions(const Config& c) {
  OpenAIChatOptions o;
  o.base_url = c.openai_base_url;
  o.api_key = c.openai_api_key;
  o.model = c.model;
  o.max_completion_tokens = c.max_completion_tokens;
  o.max_tokens_field = c.max_tokens_field;
  o.connect_timeout_ms = c.llm_connect_timeout_ms;
  o.attempt_timeout_ms = c.llm_attempt_timeout_ms;
  o.max_retries = c.llm_max_retries;
  o.backoff_base_ms = c.llm_backoff_base_ms;
  o.backoff_max_ms = c.llm_backoff_max_ms;
  o.stream_idle_timeout_ms = c.llm_stream_idle_ms;
  return o;
}

Adapters::Adapters() = default;
Adapters::Adapters(Adapters&&) noexcept = default;
Adapters& Adapters::operator=(Adapters&&) noexcept = default;
Adapters::~Adapters() = default;

Adapters Wire(const Config& config, Binary binary, std::atomic<uint64_t>* chroma_calls) {
  Adapters a;
  a.redis = MakeRedisOptions(config, binary);
  a.chroma = std::make_unique<ChromaStore>(MakeChromaOptions(config, binary, chroma_calls));
  if (config.embedder == EmbedderKind::kLocal) {
    a.embedder = std::make_unique<LocalEmbedder>(static_cast<size_t>(config.embedding_dimensions));
  } else {
    a.embedder = std::make_unique<OpenAIEmbedder>(MakeOpenAIEmbedderOptions(config, binary));
  }
  if (binary == Binary::kChatd) a.llm = std::make_unique<OpenAIChat>(MakeOpenAIChatOptions(config));
  return a;
}

}  // namespace chatd
