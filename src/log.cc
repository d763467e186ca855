#include "chatd/log.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <ctime>

#include "json.h"

namespace chatd {

namespace {
// glibc no longer caches getpid(), and every request logs a line. chatd's
// processes never fork, so the first answer stays true.
pid_t ProcessId() {
  static const pid_t pid = getpid();
  return pid;
}

std::string IsoTimeNow() {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char out[64];  // room for any int the compiler imagines in tm
  std::snprintf(out, sizeof(out), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms % 1000));
  return out;
}
}  // namespace

LogLine::LogLine(std::string_view level, std::string_view event) {
  buf_.reserve(256);
  buf_.append("{\"time\":\"").append(IsoTimeNow()).append("\"");
  Str("level", level);
  Str("event", event);
  Int("pid", ProcessId());
}

void LogLine::Key(std::string_view key) {
  buf_.push_back(',');
  AppendJsonString(buf_, key);
  buf_.push_back(':');
}

LogLine& LogLine::Str(std::string_view key, std::string_view value) {
  Key(key);
  AppendJsonString(buf_, value);
  return *this;
}

LogLine& LogLine::Int(std::string_view key, int64_t value) {
  Key(key);
  buf_.append(std::to_string(value));
  return *this;
}

LogLine& LogLine::Num(std::string_view key, double value) {
  Key(key);
  char out[32];
  std::snprintf(out, sizeof(out), "%.3f", value);
  buf_.append(out);
  return *this;
}

LogLine& LogLine::Bool(std::string_view key, bool value) {
  Key(key);
  buf_.append(value ? "true" : "false");
  return *this;
}

void LogLine::Emit() {
  buf_.append("}\n");
  const char* p = buf_.data();
  size_t left = buf_.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // nowhere to report a failing log
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace chatd
