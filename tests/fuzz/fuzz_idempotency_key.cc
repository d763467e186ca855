// The Idempotency-Key header value (ParseIdempotencyKey), checked against the
// rule: a key is 1 to 255 printable ASCII characters, bare or as a quoted
// string whose only escapes are \" and \\; the quoted form of a key names it.
#include <string>

#include "chatd/idempotency.h"
#include "fuzz_input.h"

namespace {

bool PrintableAscii(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  std::string_view text = fuzz::Bytes(data, size);
  std::optional<std::string> key = ParseIdempotencyKey(text);
  const bool quoted = text.size() >= 2 && text.front() == '"' && text.back() == '"';
  if (!quoted) {
    const bool valid = !text.empty() && text.size() <= kMaxIdempotencyKeyLength && PrintableAscii(text);
    fuzz::Require(key.has_value() == valid, "a bare key is accepted exactly when 1-255 printable ASCII");
    if (key) fuzz::Require(*key == text, "a bare key is itself");
  }
  if (!key) return 0;
  fuzz::Require(!key->empty() && key->size() <= kMaxIdempotencyKeyLength && PrintableAscii(*key),
                "every accepted key follows the rule");
  // Quoting a key (escaping \ and ") names the same key.
  std::string requoted = "\"";
  for (char c : *key) {
    if (c == '"' || c == '\\') requoted.push_back('\\');
    requoted.push_back(c);
  }
  requoted.push_back('"');
  std::optional<std::string> again = ParseIdempotencyKey(requoted);
  fuzz::Require(again.has_value() && *again == *key, "the quoted form of a key names the same key");
  return 0;
}
