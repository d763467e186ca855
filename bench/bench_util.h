// Helpers shared by the bench drivers (chroma_bench, chroma_layouts, sse_ttfb):
// timing, latency series as JSON, flag parsing and the synthetic topics.
#pragma once

#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace bench {

// What synthetic messages talk about.
inline constexpr const char* kTopics[] = {
    "the weather in Lisbon",      "a recipe for lentil soup", "how tides work",
    "learning the cello",         "the history of paper",     "training for a marathon",
    "repairing a bicycle chain",  "planting tomatoes",        "the rules of cricket",
    "why the sky is blue",        "saving money on groceries", "the moons of Jupiter",
    "writing a short story",      "caring for a cat",         "baking sourdough bread",
    "the French revolution",
};
inline constexpr size_t kTopicCount = sizeof(kTopics) / sizeof(kTopics[0]);

using Clock = std::chrono::steady_clock;

// This thread's CPU time (user + system) in milliseconds: what a call cost
// the caller's process, whatever else the machine runs.
inline double ThreadCpuMs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

inline double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

inline std::string Num(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3f", x);
  return buf;
}

// Percentiles of a sample, nearest rank; the JSON object of one latency series.
inline std::string Series(std::vector<double> ms) {
  if (ms.empty()) return "{\"n\":0}";
  std::sort(ms.begin(), ms.end());
  auto rank = [&ms](double p) {
    size_t i = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(ms.size())));
    return ms[std::min(ms.size() - 1, i == 0 ? 0 : i - 1)];
  };
  double sum = 0;
  for (double x : ms) sum += x;
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "{\"n\":%zu,\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}",
                ms.size(), sum / static_cast<double>(ms.size()), rank(50), rank(90), rank(99), rank(99.9),
                ms.back());
  return buf;
}

// Latencies gathered by several threads.
class Samples {
 public:
  void Add(double ms) {
    std::lock_guard<std::mutex> lock(mu_);
    ms_.push_back(ms);
  }
  std::vector<double> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(ms_);
  }

 private:
  std::mutex mu_;
  std::vector<double> ms_;
};

// A whole decimal number within [min, max].
inline bool ParseInt(const char* text, int64_t min, int64_t max, int64_t& out) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < min || v > max) return false;
  out = v;
  return true;
}

// A flag that takes a whole number within [min, max].
template <typename T>
struct IntFlag {
  const char* name;
  int64_t min, max;
  T* target;
};
enum class FlagParse { kUnknown, kBad, kSet };

// Sets the flag of `flags` named `name` from `value`.
template <typename T, size_t N>
FlagParse ParseIntFlag(std::string_view name, const char* value, const IntFlag<T> (&flags)[N]) {
  for (const IntFlag<T>& f : flags) {
    if (name != f.name) continue;
    int64_t v = 0;
    if (!ParseInt(value, f.min, f.max, v)) return FlagParse::kBad;
    *f.target = static_cast<T>(v);
    return FlagParse::kSet;
  }
  return FlagParse::kUnknown;
}

}  // namespace bench
