// Deadlines: every request carries one, and every blocking call below it takes
// the time that is left instead of a fixed timeout of its own.
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
