// The one place the configuration becomes adapters, for both binaries
// (chatd and chatd-cleanup). Built in two places, the copies drifted (the
// cleanup's OpenAI embedder had no connect timeout); here what differs
// between the two is a named choice, and the rest cannot differ.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "chatd/config.h"
#include "chatd/embeddings.h"
#include "chatd/llm.h"
#include "chatd/redis.h"

namespace chatd {

// The long-term store's adapter (src/chroma.h).
class ChromaStore;

// The request path answers within a deadline; the cleanup is a batch that is
// not latency-bound, so it gives Redis and Chroma more patience and waits
// through a Redis restart.
enum class Binary { kChatd, kCleanup };

struct Adapters {
  // Options, not a client: chatd opens several clients with variations
  // (the indexer's, the counters' Redis).
  RedisOptions redis;
  std::unique_ptr<ChromaStore> chroma;
  std::unique_ptr<Embedder> embedder;
  std::unique_ptr<Llm> llm;  // chatd only; null for the cleanup

  // Out of line: ChromaStore is complete only in the sources.
  Adapters();
  Adapters(Adapters&&) noexcept;
  Adapters& operator=(Adapters&&) noexcept;
  ~Adapters();
};

// `chroma_calls`: counted once per Chroma call when not null (metrics.h).
Adapters Wire(const Config& config, Binary binary, std::atomic<uint64_t>* chroma_calls = nullptr);

}  // namespace chatd
