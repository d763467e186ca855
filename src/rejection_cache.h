// A RateLimiter in front of the shared one that answers known rejections
// locally.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "chatd/rate_limiter.h"
#include "chatd/status.h"

namespace chatd {

// Remembers, in this process, the users the shared limiter rejected, until
// their retry-after has passed, and answers their requests without asking
// Redis. That is exact, not an approximation: a rejected request is not
// counted and admissions only age out, so nobody rejected can be admitted
// before retry-after (the local deadline starts after Redis decided, so it
// errs on the side of rejecting). A flood from one limited user then costs no
// Redis call at all. Rejections by the concurrency cap are not remembered: a
// slot frees whenever one of the user's chats ends, which this process cannot
// see. Thread-safe.
class RejectionCache : public RateLimiter {
 public:
  using MonotonicMs = std::function<int64_t()>;
  RejectionCache(RateLimiter& inner, size_t max_users, MonotonicMs now);
  Result<RateDecision> Check(const UserId& user_id) override;
  Status Release(const UserId& user_id, std::string_view lease_id) override;

  // Check in two halves, for a caller that asks the shared limiter itself
  // (RedisChatStart): the remembered rejection of the user, if any, and then
  // what the shared limiter decided.
  std::optional<RateDecision> Remembered(const UserId& user_id);
  void Remember(const UserId& user_id, const Result<RateDecision>& decision);

 private:
  struct Rejection {
    RateDecision decision;
    int64_t decided_ms = 0;
    int64_t until_ms = 0;
  };
  // Lets find() take a string_view without building a std::string.
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };

  RateLimiter& inner_;
  size_t max_users_;
  MonotonicMs now_;
  std::mutex mu_;
  std::unordered_map<std::string, Rejection, Hash, std::equal_to<>> rejected_;  // guarded by mu_
};

// Milliseconds of the steady clock, for RejectionCache.
int64_t SteadyNowMs();

}  // namespace chatd
