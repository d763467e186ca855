// The per-user rate limiter over Redis: one Lua script per decision, so the
// check and the count are atomic across every worker process, and the time
// comes from Redis (TIME), not from clocks that disagree between machines.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/config.h"
#include "chatd/rate_limiter.h"
#include "chatd/redis.h"

namespace chatd {

// Key suffixes (UserKey(user, suffix) = "chat:{user}:rl:fixed"). One per
// algorithm: the two keep different types, so switching CHATD_RATE_ALGORITHM
// on a live Redis never meets a WRONGTYPE.
inline constexpr std::string_view kFixedWindowKeySuffix = "rl:fixed";   // hash {w, n}
inline constexpr std::string_view kSlidingLogKeySuffix = "rl:sliding";  // sorted set of admissions

class RedisRateLimiter final : public RateLimiter {
 public:
  // limit requests per window_s seconds. LoadConfig validates both; a limit
  // below 0 is taken as 0 (reject all) and a window below 1 s as 1 s, so a bad
  // value can never reach the script as a division by zero.
  RedisRateLimiter(RedisClient& redis, int64_t limit, int64_t window_s, RateAlgorithm algorithm);

  // One EVALSHA. kUnavailable when Redis cannot be reached or refuses to run
  // scripts (LOADING, OOM, READONLY...); kInvalidArgument for an invalid id.
  // Rejected requests are not counted.
  Result<RateDecision> Check(std::string_view user_id) override;

  // The one key a user's decisions touch.
  std::string KeyFor(std::string_view user_id) const;

 private:
  RedisClient& redis_;
  const int64_t limit_;
  const int64_t window_s_;
  const RateAlgorithm algorithm_;
  const std::string limit_arg_;
  const std::string window_ms_arg_;
};

// The scripts' reply {allowed, remaining, reset_ms, retry_after_ms} as a
// decision. Exposed for tests.
Result<RateDecision> RateDecisionFromReply(const RedisValue& reply, int64_t limit, int64_t window_s);

}  // namespace chatd
