// The per-user rate limiter over Redis: one Lua script per decision, so the
// check and the count are atomic across every worker process, and the time
// comes from Redis (TIME), not from clocks that disagree between machines.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/config.h"
#include "chatd/rate_limiter.h"
#include "chatd/redis.h"
#include "chatd/redis_schema.h"

namespace chatd {

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
  // `counter` names the counter key (RateKey); none: the chat's, by algorithm.
  RedisRateLimiter(RedisClient& redis, int64_t limit, int64_t window_s, RateAlgorithm algorithm,
                   ConcurrencyCap cap = {}, std::optional<RateCounter> counter = std::nullopt);

  // One EVALSHA, which with a cap also checks the user's chats in flight and
  // takes a lease. kUnavailable when Redis cannot be reached or refuses to run
  // scripts (LOADING, OOM, READONLY...).
  // Rejected requests are not counted; the rate is checked first, so a
  // request over both limits is rate_limited.
  Result<RateDecision> Check(const UserId& user_id) override;
  // ZREM of the lease (one round trip).
  Status Release(const UserId& user_id, std::string_view lease_id) override;

  // The one key a user's decisions touch.
  std::string KeyFor(const UserId& user_id) const;

  // One decision's script call, for a caller that sends it in a pipeline of
  // its own (RedisChatStart): Check is MakeCall, the script with Args, then
  // Decide.
  struct Call {
    const RedisScript* script = nullptr;
    std::vector<std::string> keys;
    std::string lease;  // with a cap: the lease the call takes when it admits
  };
  Call MakeCall(const UserId& user_id) const;
  // The script's arguments; views of `call` and of this limiter.
  std::vector<std::string_view> Args(const Call& call) const;
  Result<RateDecision> Decide(Call& call, const RedisValue& reply) const;

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
  const RateCounter counter_;
};

// The scripts' reply {verdict, remaining, reset_ms, retry_after_ms} as a
// decision; verdict 1 admitted, 0 over the rate, 2 over the concurrency cap.
// Exposed for tests.
Result<RateDecision> RateDecisionFromReply(const RedisValue& reply, int64_t limit, int64_t window_s);

}  // namespace chatd
