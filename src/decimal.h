// Strict parsing of non-negative decimal integers from text we did not write
// (file names, Redis replies): digits only, no sign, no spaces, no overflow.
// std::stoll would accept "+1" and " 1", and throws on 20 digits; this never
// throws.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string_view>
#include <system_error>

namespace chatd {

inline std::optional<int64_t> ParseDecimal(std::string_view s) {
  if (s.empty() || s.front() < '0' || s.front() > '9') return std::nullopt;
  int64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return value;
}

}  // namespace chatd
