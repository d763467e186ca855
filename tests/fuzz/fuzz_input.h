// What every fuzz target shares: the input as a string_view, splitting one
// input into several fields, and checking a property (a violated property is a
// finding like a crash, so it aborts and libFuzzer saves the input).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace chatd::fuzz {

inline std::string_view Bytes(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

// Separates the fields of one input. A byte that no parser treats specially
// and that is easy to type in a hand-written seed (printf '...\x00...').
inline constexpr char kFieldSeparator = '\0';

// The next field of `rest` (up to kFieldSeparator or the end), removed from it.
inline std::string_view NextField(std::string_view& rest) {
  size_t end = rest.find(kFieldSeparator);
  std::string_view field = rest.substr(0, end);
  rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
  return field;
}

// Aborts (so libFuzzer records the input) when a property does not hold.
inline void Require(bool holds, const char* property) {
  if (!holds) {
    std::fprintf(stderr, "property violated: %s\n", property);
    std::abort();
  }
}

}  // namespace chatd::fuzz
