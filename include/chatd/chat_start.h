// The start of a chat in one call: the rate limiter's decision and the user's
// memory. When the counters and the memory live in one Redis, an adapter
// (RedisChatStart) sends the limiter's script and the memory read in one
// round trip, so every chat waits for Redis once before the model instead of
// twice. Without one, the chat service asks the limiter and then the store.
#pragma once

#include <optional>

#include "chatd/memory.h"
#include "chatd/rate_limiter.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

struct ChatStart {
  Result<RateDecision> decision = RateDecision{};
  // The memory, read right after the decision was taken; absent when it was
  // not read (a rejection this process remembered answered without Redis).
  // Read whatever the decision: a rejected chat ignores it.
  std::optional<Result<UserMemory>> memory;
};

// Thread-safe: one instance serves all threads of a process.
class ChatStarter {
 public:
  virtual ~ChatStarter() = default;
  virtual ChatStart Start(const UserId& user_id) = 0;
};

}  // namespace chatd
