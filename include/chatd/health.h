// What /api/health and /metrics need to know about the dependencies, behind an
// interface so the HTTP layer can be unit-tested without them.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "chatd/chroma.h"
#include "chatd/redis.h"
#include "chatd/status.h"

namespace chatd {

struct DependencyState {
  std::string name;    // "redis", "chroma", "model"
  std::string state;   // "ok", "down" or "configured"
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
class StackHealthProbe : public HealthProbe {
 public:
  StackHealthProbe(RedisClient& redis, RedisClient* rate_redis, ChromaStore& chroma, bool model_configured);
  std::vector<DependencyState> Check() override;

 private:
  RedisClient& redis_;
  RedisClient* rate_redis_;
  ChromaStore& chroma_;
  bool model_configured_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point checked_at_;  // guarded by mu_
  std::vector<DependencyState> cached_;               // guarded by mu_
};

}  // namespace chatd
