#include "secret_strength.h"

#include <array>

namespace chatd {

namespace {

char Lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool ContainsIgnoringCase(std::string_view haystack, std::string_view needle) {
  if (needle.size() > haystack.size()) return false;
  for (size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
    size_t k = 0;
    while (k < needle.size() && Lower(haystack[i + k]) == needle[k]) ++k;
    if (k == needle.size()) return true;
  }
  return false;
}

// Longest stretch of bytes whose step from one to the next is the same 0, +1
// or -1 throughout.
size_t LongestRun(std::string_view s) {
  if (s.empty()) return 0;
  size_t longest = 1, run = 1;
  int step = 2;  // none yet
  for (size_t i = 1; i < s.size(); ++i) {
    int d = static_cast<unsigned char>(s[i]) - static_cast<unsigned char>(s[i - 1]);
    bool small = d >= -1 && d <= 1;
    if (small && d == step) {
      ++run;
    } else {
      run = small ? 2 : 1;
      step = small ? d : 2;
    }
    if (run > longest) longest = run;
  }
  return longest;
}

}  // namespace

std::optional<std::string> SecretWeakness(std::string_view secret) {
  for (std::string_view word : kPlaceholderWords) {
    if (ContainsIgnoringCase(secret, word)) {
      return "looks like a placeholder (it contains a word such as \"" + std::string(word) +
             "\"): use a random value, e.g. openssl rand -base64 48";
    }
  }
  std::array<bool, 256> seen{};
  size_t distinct = 0;
  for (char c : secret) {
    bool& s = seen[static_cast<unsigned char>(c)];
    if (!s) ++distinct;
    s = true;
  }
  if (distinct < kMinDistinctSecretBytes) {
    return "has fewer than " + std::to_string(kMinDistinctSecretBytes) +
           " different characters: use a random value, e.g. openssl rand -base64 48";
  }
  if (LongestRun(secret) >= kMaxSecretRun) {
    return "has a run of " + std::to_string(kMaxSecretRun) +
           " or more repeated or consecutive characters: use a random value, e.g. openssl rand -base64 48";
  }
  return std::nullopt;
}

}  // namespace chatd
