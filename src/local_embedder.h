// The built-in Embedder, for deployments without an embedding model.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "chatd/embeddings.h"
#include "chatd/status.h"

namespace chatd {

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
