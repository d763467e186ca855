#include "chatd/health.h"


namespace chatd {

namespace {
constexpr std::chrono::milliseconds kCacheFor{1000};

bool Pings(RedisClient& redis) {
  Result<RedisValue> r = redis.Command({"PING"});
  return r.ok() && r->str == "PONG";
}
}  // namespace

StackHealthProbe::StackHealthProbe(RedisClient& redis, RedisClient* rate_redis, ChromaStore& chroma,
                                   bool model_configured)
    : redis_(redis), rate_redis_(rate_redis), chroma_(chroma), model_configured_(model_configured) {}

std::vector<DependencyState> StackHealthProbe::Check() {
  std::lock_guard<std::mutex> lock(mu_);
  auto now = std::chrono::steady_clock::now();
  if (!cached_.empty() && now - checked_at_ < kCacheFor) return cached_;
  std::vector<DependencyState> out;
  bool redis_ok = Pings(redis_);
  out.push_back({"redis", redis_ok ? "ok" : "down", redis_ok});
  if (rate_redis_ != nullptr) {
    bool ok = Pings(*rate_redis_);
    out.push_back({"rate_limit_redis", ok ? "ok" : "down", ok});
  }
  bool chroma_ok = chroma_.Heartbeat().ok();
  out.push_back({"chroma", chroma_ok ? "ok" : "down", chroma_ok});
  // The model is a paid API: health never calls it, it only checks it is set up.
  out.push_back({"model", model_configured_ ? "configured" : "missing", model_configured_});
  cached_ = out;
  checked_at_ = now;
  return out;
}

}  // namespace chatd
