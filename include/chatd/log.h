// Structured logs: one JSON object per line on stderr, which journald (or the
// test harness) collects. Never log message text, tokens or keys.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace chatd {

class LogLine {
 public:
  // `event` names what happened: "request", "model_error", "start", ...
  LogLine(std::string_view level, std::string_view event);
  LogLine& Str(std::string_view key, std::string_view value);
  LogLine& Int(std::string_view key, int64_t value);
  LogLine& Num(std::string_view key, double value);
  LogLine& Bool(std::string_view key, bool value);
  // Writes the line with a single write(2), so lines of concurrent threads and
  // processes sharing the stream never interleave.
  void Emit();

 private:
  void Key(std::string_view key);
  std::string buf_;
};

inline LogLine LogInfo(std::string_view event) { return LogLine("info", event); }
inline LogLine LogWarn(std::string_view event) { return LogLine("warn", event); }
inline LogLine LogError(std::string_view event) { return LogLine("error", event); }

}  // namespace chatd
