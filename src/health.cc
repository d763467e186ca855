#include "chatd/health.h"

#include "chroma.h"

namespace chatd {

namespace {
constexpr std::chrono::milliseconds kCacheFor{1000};

// "ok", "down", or what Redis says keeps it from serving for now: "loading"
// (its data, after a restart) or "busy" (a script runs too long).
DependencyState RedisState(RedisClient& redis, std::string name) {
  Result<RedisValue> r = redis.Command({"PING"});
  if (r.ok() && r->is_error()) {
    const std::string reason = RedisReplyError(r->str, "PING").reason();
    if (reason == "redis_loading") return {std::move(name), "loading", false};
    if (reason == "redis_busy") return {std::move(name), "busy", false};
  }
  const bool ok = r.ok() && r->str == "PONG";
  return {std::move(name), ok ? "ok" : "down", ok};
}
}  // namespace

StackHealthProbe::StackHealthProbe(RedisClient& redis, RedisClient* rate_redis, ChromaStore& chroma,
                                   bool model_configured)
    : redis_(redis), rate_redis_(rate_redis), chroma_(chroma), model_configured_(model_configured) {}

std::vector<DependencyState> StackHealthProbe::Check() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    bool fresh = !cached_.empty() && std::chrono::steady_clock::now() - checked_at_ < kCacheFor;
    if (fresh) return cached_;
    if (refreshing_) return cached_.empty() ? Unknown() : cached_;
    refreshing_ = true;
  }
  // Whatever happens in the probes, the next caller may refresh again.
  struct RefreshEnd {
    StackHealthProbe& self;
    ~RefreshEnd() {
      std::lock_guard<std::mutex> lock(self.mu_);
      self.refreshing_ = false;
    }
  } end{*this};
  // No lock held here: the probes may take a whole timeout each.
  std::vector<DependencyState> out = Probe();
  std::lock_guard<std::mutex> lock(mu_);
  cached_ = out;
  checked_at_ = std::chrono::steady_clock::now();  // after the probes, not before
  return out;
}

std::vector<DependencyState> StackHealthProbe::Probe() {
  std::vector<DependencyState> out;
  out.push_back(RedisState(redis_, "redis"));
  if (rate_redis_ != nullptr) out.push_back(RedisState(*rate_redis_, "rate_limit_redis"));
  bool chroma_ok = chroma_.Heartbeat().ok();
  out.push_back({"chroma", chroma_ok ? "ok" : "down", chroma_ok});
  out.push_back(ModelState());
  return out;
}

std::vector<DependencyState> StackHealthProbe::Unknown() const {
  std::vector<DependencyState> out;
  out.push_back({"redis", "unknown", false});
  if (rate_redis_ != nullptr) out.push_back({"rate_limit_redis", "unknown", false});
  out.push_back({"chroma", "unknown", false});
  out.push_back(ModelState());
  return out;
}

DependencyState StackHealthProbe::ModelState() const {
  // The model is a paid API: health never calls it, it only checks it is set up.
  return {"model", model_configured_ ? "configured" : "missing", model_configured_};
}

}  // namespace chatd
