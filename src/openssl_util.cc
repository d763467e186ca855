#include "openssl_util.h"

#include <openssl/err.h>

namespace chatd {

bool Sha256(const EVP_MD* md, std::string_view data, Digest& out) {
  unsigned int len = 0;
  bool ok = EVP_Digest(data.data(), data.size(), out.data(), &len, md, nullptr) == 1 && len == out.size();
  if (!ok) ERR_clear_error();
  return ok;
}

}  // namespace chatd
