#include "chatd/idempotency.h"

#include <openssl/err.h>
#include <openssl/evp.h>

#include <array>

namespace chatd {

std::optional<std::string> ParseIdempotencyKey(std::string_view value) {
  std::string key;
  if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
    // RFC 8941 sf-string: only \" and \\ may be escaped.
    std::string_view inner = value.substr(1, value.size() - 2);
    for (size_t i = 0; i < inner.size(); ++i) {
      char c = inner[i];
      if (c == '"') return std::nullopt;
      if (c == '\\') {
        if (i + 1 == inner.size() || (inner[i + 1] != '"' && inner[i + 1] != '\\')) return std::nullopt;
        c = inner[++i];
      }
      key.push_back(c);
    }
  } else {
    key.assign(value);
  }
  if (key.empty() || key.size() > kMaxIdempotencyKeyLength) return std::nullopt;
  for (unsigned char c : key) {
    if (c < 0x20 || c > 0x7e) return std::nullopt;
  }
  return key;
}

Result<std::string> Sha256Hex(std::string_view data) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), digest.data(), &len, EVP_sha256(), nullptr) != 1) {
    ERR_clear_error();
    return Internal("digest_failed", "Internal error");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[digest[i] >> 4]);
    out.push_back(kHex[digest[i] & 0xf]);
  }
  return out;
}

}  // namespace chatd
