// CONTENT_LENGTH as libfcgi hands it over (ParseContentLength), checked
// against an obviously correct reading of the same rule.
#include <string>

#include "chatd/http.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  std::string_view text = fuzz::Bytes(data, size);
  constexpr size_t kUntouched = 0xdeadbeef;
  size_t length = kUntouched;
  const bool ok = ParseContentLength(text, length);

  bool digits_only = !text.empty() && text.size() <= kMaxContentLengthDigits;
  for (char c : text) digits_only = digits_only && c >= '0' && c <= '9';
  fuzz::Require(ok == digits_only, "accepted exactly when 1 to 18 digits");
  if (!ok) {
    fuzz::Require(length == kUntouched, "a refused value leaves the output alone");
    return 0;
  }
  // The decimal text of the value is the input without its leading zeros.
  std::string_view significant = text.substr(std::min(text.find_first_not_of('0'), text.size() - 1));
  fuzz::Require(std::to_string(length) == significant, "the value is the decimal number");
  return 0;
}
