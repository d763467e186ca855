// What /api/health and /metrics need to know about the dependencies, behind an
// interface so the HTTP layer can be unit-tested without them.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "chatd/redis.h"
#include "chatd/status.h"

namespace chatd {

// The long-term store's adapter (src/chroma.h): held by reference here.
class ChromaStore;

struct DependencyState {
  std::string name;    // "redis", "chroma", "model"
  // "ok", "down", "unknown" (not probed yet), "configured" or "missing"; a
  // Redis may also be "loading" (its data, after a restart) or "busy" (a
  // script runs too long): down for now, back within seconds.
  std::string state;
  bool healthy = false;
};

class HealthProbe {
 public:
  virtual ~HealthProbe() = default;
  virtual std::vector<DependencyState> Check() = 0;
};

// Pings Redis (both, when the counters have their own) and Chroma's heartbeat.
// Answers are cached for a second per process, so a load balancer polling
// every second costs at most one ping per dependency per worker per second.
//
// One caller at a time refreshes, without holding the lock across the probes:
// while it waits on a slow or frozen dependency, every other caller gets the
// previous answer at once, or, before any answer exists (a cold cache), every
// probed dependency as "unknown" (unhealthy: 503), rather than waiting. So a
// burst of health checks against a hung Chroma ties up one thread per worker
// process, never the pool. The cache is stamped when the probes end, so a
// refresh that took longer than the cache lifetime is still reused.
class StackHealthProbe : public HealthProbe {
 public:
  StackHealthProbe(RedisClient& redis, RedisClient* rate_redis, ChromaStore& chroma, bool model_configured);
  std::vector<DependencyState> Check() override;

 private:
  std::vector<DependencyState> Probe();
  std::vector<DependencyState> Unknown() const;
  DependencyState ModelState() const;

  RedisClient& redis_;
  RedisClient* rate_redis_;
  ChromaStore& chroma_;
  bool model_configured_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point checked_at_;  // guarded by mu_
  std::vector<DependencyState> cached_;               // guarded by mu_; empty until the first refresh ends
  bool refreshing_ = false;                           // guarded by mu_
};

}  // namespace chatd
