#include "chatd/rate_limiter.h"

#include <algorithm>

namespace chatd {

namespace {
int64_t CeilSeconds(int64_t ms) { return ms <= 0 ? 0 : (ms + 999) / 1000; }
}  // namespace

int64_t RetryAfterSeconds(const RateDecision& decision) {
  return std::max<int64_t>(1, CeilSeconds(decision.retry_after_ms));
}

std::vector<std::pair<std::string, std::string>> RateLimitHeaders(const RateDecision& decision) {
  std::vector<std::pair<std::string, std::string>> headers;
  headers.reserve(3);
  headers.emplace_back("RateLimit-Policy", "\"default\";q=" + std::to_string(std::max<int64_t>(decision.limit, 0)) +
                                               ";w=" + std::to_string(std::max<int64_t>(decision.window_s, 0)));
  headers.emplace_back("RateLimit", "\"default\";r=" + std::to_string(std::max<int64_t>(decision.remaining, 0)) +
                                        ";t=" + std::to_string(CeilSeconds(decision.reset_ms)));
  if (!decision.allowed) headers.emplace_back("Retry-After", std::to_string(RetryAfterSeconds(decision)));
  return headers;
}

}  // namespace chatd
