// Text embeddings for long-term recall.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

namespace chatd {

// Thread-safe.
class Embedder {
 public:
  virtual ~Embedder() = default;
  virtual size_t dimensions() const = 0;
  // One L2-normalised vector per input, in order.
  virtual Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& texts) = 0;
};

// The built-in embedder: signed feature hashing of lower-cased words and
// character trigrams into `dimensions` buckets, L2-normalised. Deterministic,
// dependency-free and microseconds per message; good enough to recall a message
// that shares words with the question. docs/memory.md describes the algorithm
// exactly; tests/fake_model implements the same one for its /embeddings.
std::vector<float> LocalEmbed(std::string_view text, size_t dimensions);

class LocalEmbedder : public Embedder {
 public:
  explicit LocalEmbedder(size_t dimensions) : dimensions_(dimensions) {}
  size_t dimensions() const override { return dimensions_; }
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& texts) override;

 private:
  size_t dimensions_;
};

}  // namespace chatd
