// Deadlines: every chat request carries one (CHATD_REQUEST_DEADLINE_MS).
// Only the model call takes it (Llm::Complete and Llm::Stream: each attempt,
// each backoff and the whole stream fit in the time that is left), because it
// is the one call that can take seconds. The calls before it keep short fixed
// timeouts of their own: Redis CHATD_REDIS_TIMEOUT_MS, Chroma and the embedding
// model CHATD_CHROMA_TIMEOUT_MS; recording the turn after the model answered
// runs past the deadline on purpose, bounded by the Redis timeout, so an answer
// the client may already hold is not lost (leases and claims are sized for it).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace chatd {

using SteadyClock = std::chrono::steady_clock;

class Deadline {
 public:
  explicit Deadline(SteadyClock::time_point at) : at_(at) {}
  static Deadline In(std::chrono::milliseconds d) { return Deadline(SteadyClock::now() + d); }

  SteadyClock::time_point at() const { return at_; }
  // Milliseconds left, never negative.
  int64_t RemainingMs() const {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(at_ - SteadyClock::now()).count();
    return std::max<int64_t>(left, 0);
  }
  bool Expired() const { return SteadyClock::now() >= at_; }
  // The earlier of this deadline and now + d.
  Deadline Within(std::chrono::milliseconds d) const {
    return Deadline(std::min(at_, SteadyClock::now() + d));
  }

 private:
  SteadyClock::time_point at_;
};

// Wall-clock milliseconds since the epoch, for timestamps that leave the process.
inline int64_t WallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace chatd
