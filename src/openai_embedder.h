// Embeddings from an OpenAI-compatible POST {base}/embeddings, for deployments
// that prefer a real embedding model over LocalEmbed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/embeddings.h"
#include "chatd/status.h"
#include "local_embedder.h"

namespace chatd {

struct OpenAIEmbedderOptions {
  std::string base_url;  // e.g. "https://api.openai.com/v1", no trailing slash needed
  std::string api_key;   // empty: no Authorization header (local servers)
  std::string model = "text-embedding-3-small";
  size_t dimensions = 256;
  int64_t connect_timeout_ms = 2000;
  int64_t timeout_ms = 5000;
};

// Thread-safe: each call uses the calling thread's HttpClient. Every failure is
// kUnavailable with reason "embedder_unavailable" (or "dimension_mismatch" when
// the model answers vectors of another size); the upstream body never leaks
// into the Status.
class OpenAIEmbedder : public Embedder {
 public:
  explicit OpenAIEmbedder(OpenAIEmbedderOptions options);
  size_t dimensions() const override { return options_.dimensions; }
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& texts) override;

 private:
  OpenAIEmbedderOptions options_;
  std::string url_;
};

// The pieces of OpenAIEmbedder that need no network, exposed for unit tests.
// {"model", "input": [texts], "dimensions"}; kInvalidArgument for invalid UTF-8.
Result<std::string> BuildEmbeddingsRequest(std::string_view model, const std::vector<std::string>& texts,
                                           size_t dimensions);
// Reads data[i].embedding placed by data[i].index; checks that every one of
// `count` inputs got exactly one vector of `dimensions` finite floats, and
// returns them L2-normalised.
Result<std::vector<std::vector<float>>> ParseEmbeddingsResponse(std::string_view body, size_t count,
                                                                size_t dimensions);

}  // namespace chatd
