// Per-user rate limiting. The chat service asks before doing anything else, so a
// rejected request costs one call here and nothing more.
#pragma once

#include <cstdint>
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
};

// Thread-safe: one instance serves all threads of a process.
class RateLimiter {
 public:
  virtual ~RateLimiter() = default;
  // kUnavailable when the shared counter store cannot be reached; the caller
  // applies the configured fail-open/fail-closed policy. Never falls back to
  // per-process counting.
  virtual Result<RateDecision> Check(std::string_view user_id) = 0;
};

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
