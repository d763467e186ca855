// Per-user rate limiting. The chat service asks before doing anything else, so a
// rejected request costs one call here and nothing more.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/status.h"
#include "chatd/user_id.h"

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

// What a chat does when the limiter cannot answer (CHATD_RATE_FAILURE_MODE):
// refuse it (closed) or let it through unlimited (open).
enum class FailureMode { kClosed, kOpen };

// Thread-safe: one instance serves all threads of a process.
class RateLimiter {
 public:
  virtual ~RateLimiter() = default;
  // kUnavailable when the shared counter store cannot be reached; the caller
  // applies the configured fail-open/fail-closed policy. Never falls back to
  // per-process counting.
  virtual Result<RateDecision> Check(const UserId& user_id) = 0;
  // Gives back the concurrency lease of an admission (decision.lease_id).
  // Idempotent. A lease never released (a crash, a failed call) expires by
  // itself after the request deadline plus a margin.
  virtual Status Release(const UserId& user_id, std::string_view lease_id) = 0;
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
