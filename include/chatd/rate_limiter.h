// Per-user rate limiting. The chat service asks before doing anything else, so a
// rejected request costs one call here and nothing more.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/status.h"

namespace chatd {

struct RateDecision {
  bool allowed = false;
  int64_t limit = 0;           // requests allowed per window
  int64_t remaining = 0;       // left in the current window after this request
  int64_t reset_ms = 0;        // until the window (or the oldest admission) frees quota
  int64_t retry_after_ms = 0;  // when rejected: until the next request could pass
  int64_t window_s = 0;        // for the RateLimit-Policy header
  // Rejected because the user already has the maximum of chats in flight
  // (CHATD_MAX_CONCURRENT_PER_USER), not because of the rate. Such a
  // rejection consumes no quota.
  bool too_many_concurrent = false;
  // When admitted under the concurrency cap: the lease this chat holds, to
  // give back with Release when it ends. Empty when none is held (no cap, or
  // admitted without the store under CHATD_RATE_FAILURE_MODE=open).
  std::string lease_id;
};

// Retry-After of a too_many_concurrent rejection. Nothing tells when one of
// the user's chats will end (a model answer takes from a fraction of a second
// to the whole deadline), so this is the shortest wait the header can express:
// a client that honours it costs one Redis call a second, and gets in about as
// soon as a slot frees.
inline constexpr int64_t kTooManyConcurrentRetryAfterMs = 1000;

// Thread-safe: one instance serves all threads of a process.
class RateLimiter {
 public:
  virtual ~RateLimiter() = default;
  // kUnavailable when the shared counter store cannot be reached; the caller
  // applies the configured fail-open/fail-closed policy. Never falls back to
  // per-process counting.
  virtual Result<RateDecision> Check(std::string_view user_id) = 0;
  // Gives back the concurrency lease of an admission (decision.lease_id).
  // Idempotent. A lease never released (a crash, a failed call) expires by
  // itself after the request deadline plus a margin.
  virtual Status Release(std::string_view user_id, std::string_view lease_id) = 0;
};

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
  Result<RateDecision> Check(std::string_view user_id) override;
  Status Release(std::string_view user_id, std::string_view lease_id) override;

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

// Seconds a rejected client should wait: retry_after_ms rounded up, at least 1
// (a 0 would invite an immediate retry that fails again). For the Retry-After
// header and the "retryAfter" JSON field.
int64_t RetryAfterSeconds(const RateDecision& decision);

// The response headers of a decision (draft-ietf-httpapi-ratelimit-headers-10,
// RFC 6585), in this order:
//   RateLimit-Policy: "default";q=<limit>;w=<window_s>
//   RateLimit: "default";r=<remaining>;t=<seconds to reset, rounded up>
//   Retry-After: <RetryAfterSeconds>        (only when rejected)
std::vector<std::pair<std::string, std::string>> RateLimitHeaders(const RateDecision& decision);

}  // namespace chatd
