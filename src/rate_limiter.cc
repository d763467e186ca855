#include "chatd/rate_limiter.h"
#include "rejection_cache.h"

#include <algorithm>
#include <chrono>

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

int64_t SteadyNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

RejectionCache::RejectionCache(RateLimiter& inner, size_t max_users, MonotonicMs now)
    : inner_(inner), max_users_(max_users), now_(std::move(now)) {}

Result<RateDecision> RejectionCache::Check(const UserId& user_id) {
  if (std::optional<RateDecision> known = Remembered(user_id)) return *known;
  Result<RateDecision> decision = inner_.Check(user_id);
  Remember(user_id, decision);
  return decision;
}

std::optional<RateDecision> RejectionCache::Remembered(const UserId& user_id) {
  const int64_t now = now_();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = rejected_.find(user_id.str());
  if (it == rejected_.end()) return std::nullopt;
  if (now >= it->second.until_ms) {
    rejected_.erase(it);
    return std::nullopt;
  }
  RateDecision d = it->second.decision;
  int64_t elapsed = now - it->second.decided_ms;
  d.retry_after_ms = it->second.until_ms - now;
  d.reset_ms = std::max<int64_t>(d.reset_ms - elapsed, 0);
  d.remaining = 0;
  return d;
}

void RejectionCache::Remember(const UserId& user_id, const Result<RateDecision>& decision) {
  if (!decision.ok() || decision->allowed || decision->too_many_concurrent || decision->retry_after_ms <= 0) {
    return;
  }
  // The local deadline starts after the shared limiter decided, so it errs on
  // the side of rejecting.
  const int64_t now = now_();
  std::lock_guard<std::mutex> lock(mu_);
  if (rejected_.size() >= max_users_) {
    // Bounded memory: drop what has expired, and everything if that is not enough.
    std::erase_if(rejected_, [now](const auto& kv) { return kv.second.until_ms <= now; });
    if (rejected_.size() >= max_users_) rejected_.clear();
  }
  Rejection r;
  r.decision = *decision;
  r.decided_ms = now;
  r.until_ms = now + decision->retry_after_ms;
  rejected_.insert_or_assign(user_id.str(), r);
}

Status RejectionCache::Release(const UserId& user_id, std::string_view lease_id) {
  return inner_.Release(user_id, lease_id);
}

}  // namespace chatd
