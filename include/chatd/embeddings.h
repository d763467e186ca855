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

}  // namespace chatd
