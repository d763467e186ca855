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
#include "chatd/user_id.h"

namespace chatd {

// Key suffixes (UserKey(user, suffix) = "chat:{user}:rl:fixed"). One per
// algorithm: the two keep different types, so switching CHATD_RATE_ALGORITHM
// on a live Redis never meets a WRONGTYPE.
inline constexpr std::string_view kFixedWindowKeySuffix = "rl:fixed";   // hash {w, n}
inline constexpr std::string_view kSlidingLogKeySuffix = "rl:sliding";  // sorted set of admissions
// The user's chats in flight: a sorted set of lease ids scored by their expiry
// (ms of Redis time). It lives in the counters' Redis, next to the rate key,
// so one script call both limits the rate and takes a lease.
inline constexpr std::string_view kInflightKeySuffix = "inflight";
inline std::string InflightKey(std::string_view user_id) { return UserKey(user_id, kInflightKeySuffix); }
// The limit of the user-data endpoints (history, export, erase), kept apart
// from the chat's so that reading one's history does not use up chat quota.
inline constexpr std::string_view kDataFixedWindowKeySuffix = "rl:data";

// The per-user cap on chats in flight. max_in_flight 0: no cap.
struct ConcurrencyCap {
  int64_t max_in_flight = 0;
  // How long a lease outlives a worker that died holding it: the longest a
  // chat can legitimately run (the request deadline, plus what may still
  // follow it), so a live chat never loses its slot.
  int64_t lease_ttl_ms = 0;
};

class RedisRateLimiter final : public RateLimiter {
 public:
  // limit requests per window_s seconds. LoadConfig validates both; a limit
  // below 0 is taken as 0 (reject all) and a window below 1 s as 1 s, so a bad
  // value can never reach the script as a division by zero.
  // `key_suffix` names the counter key (UserKey(user, suffix)); empty: the
  // chat's, by algorithm.
  RedisRateLimiter(RedisClient& redis, int64_t limit, int64_t window_s, RateAlgorithm algorithm,
                   ConcurrencyCap cap = {}, std::string_view key_suffix = {});

  // One EVALSHA, which with a cap also checks the user's chats in flight and
  // takes a lease. kUnavailable when Redis cannot be reached or refuses to run
  // scripts (LOADING, OOM, READONLY...); kInvalidArgument for an invalid id.
  // Rejected requests are not counted; the rate is checked first, so a
  // request over both limits is rate_limited.
  Result<RateDecision> Check(std::string_view user_id) override;
  // ZREM of the lease (one round trip).
  Status Release(std::string_view user_id, std::string_view lease_id) override;

  // The one key a user's decisions touch.
  std::string KeyFor(std::string_view user_id) const;

 private:
  RedisClient& redis_;
  const int64_t limit_;
  const int64_t window_s_;
  const RateAlgorithm algorithm_;
  const std::string limit_arg_;
  const std::string window_ms_arg_;
  const ConcurrencyCap cap_;
  const std::string cap_arg_;
  const std::string lease_ttl_ms_arg_;
  const std::string key_suffix_;
};

// The scripts' reply {verdict, remaining, reset_ms, retry_after_ms} as a
// decision; verdict 1 admitted, 0 over the rate, 2 over the concurrency cap.
// Exposed for tests.
Result<RateDecision> RateDecisionFromReply(const RedisValue& reply, int64_t limit, int64_t window_s);

}  // namespace chatd
