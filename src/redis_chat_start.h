// The start of a chat over Redis in one round trip: the rate limiter's
// script, then the memory read, pipelined on one connection. Only for
// counters that live in the memory's Redis (CHATD_RATE_REDIS_* unset).
#pragma once

#include "chatd/chat_start.h"
#include "chatd/redis.h"
#include "redis_memory.h"
#include "redis_rate_limiter.h"
#include "rejection_cache.h"

namespace chatd {

class RedisChatStart final : public ChatStarter {
 public:
  // Borrows everything. `rejections` (may be null) answers a rejection it
  // remembers without Redis, and learns the new ones, as it does for Check.
  RedisChatStart(RedisClient& redis, RedisRateLimiter& limiter, RejectionCache* rejections,
                 RedisShortTermStore& store);

  // One round trip (two after NOSCRIPT); none for a remembered rejection.
  // The memory is read even when the script rejects: the reads ride along for
  // free in Redis's time, and waiting for the verdict before sending them would
  // cost every admitted chat the round trip this saves. A transport failure
  // fails both halves alike.
  ChatStart Start(const UserId& user_id) override;

 private:
  RedisClient& redis_;
  RedisRateLimiter& limiter_;
  RejectionCache* rejections_;
  RedisShortTermStore& store_;
};

}  // namespace chatd
