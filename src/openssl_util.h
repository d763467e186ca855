// OpenSSL handles owned by RAII, secret wiping and SHA-256, for the
// authenticators.
#pragma once

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace chatd {

inline constexpr size_t kSha256Bytes = 32;

// Frees an OpenSSL object with its own free function, for unique_ptr.
template <auto kFree>
struct OpenSslFree {
  template <class T>
  void operator()(T* p) const { kFree(p); }
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, OpenSslFree<EVP_PKEY_free>>;
using EvpMdPtr = std::unique_ptr<EVP_MD, OpenSslFree<EVP_MD_free>>;
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, OpenSslFree<EVP_MD_CTX_free>>;
using EvpMacPtr = std::unique_ptr<EVP_MAC, OpenSslFree<EVP_MAC_free>>;
using EvpMacCtxPtr = std::unique_ptr<EVP_MAC_CTX, OpenSslFree<EVP_MAC_CTX_free>>;
using BioPtr = std::unique_ptr<BIO, OpenSslFree<BIO_free>>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, OpenSslFree<ECDSA_SIG_free>>;
using BignumPtr = std::unique_ptr<BIGNUM, OpenSslFree<BN_free>>;

// Wipes a copy of a secret once it has been turned into what we keep.
class ScopedCleanse {
 public:
  explicit ScopedCleanse(std::string& s) : s_(s) {}
  ~ScopedCleanse() {
    if (!s_.empty()) OPENSSL_cleanse(s_.data(), s_.size());
  }
  ScopedCleanse(const ScopedCleanse&) = delete;
  ScopedCleanse& operator=(const ScopedCleanse&) = delete;

 private:
  std::string& s_;
};

using Digest = std::array<unsigned char, kSha256Bytes>;

// SHA-256 of `data` with `md` (EVP_MD_fetch'ed once by the caller); false,
// with OpenSSL's error queue cleared, when OpenSSL fails.
bool Sha256(const EVP_MD* md, std::string_view data, Digest& out);

}  // namespace chatd
