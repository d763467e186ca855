// Service mode: a trusted backend presents one of the configured bearer
// tokens (docs/auth.md). Only their SHA-256 digests are kept.
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "auth_internal.h"
#include "openssl_util.h"
#include "secret_file.h"
#include "secret_strength.h"

namespace chatd {

namespace {

// Service tokens are bearer secrets too; short ones can be guessed.
constexpr size_t kMinServiceTokenBytes = 16;
constexpr size_t kMaxServiceTokens = 64;

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

class ServiceTokenAuthenticator final : public Authenticator {
 public:
  ServiceTokenAuthenticator(EvpMdPtr sha256, std::vector<Digest> digests)
      : sha256_(std::move(sha256)), digests_(std::move(digests)) {}

  // A refusal is logged and counted by Observe (observe.h), from the
  // request's context.
  Result<Principal> Authenticate(const HttpRequest& req) override {
    Result<std::string_view> token = BearerToken(req.authorization);
    if (!token.ok()) return token.status();
    Digest presented;
    if (!Sha256(sha256_.get(), *token, presented)) return Internal("digest_failed", "Internal error");
    // Every configured digest is compared, whatever matched first, so the
    // time taken says nothing about which token (or which prefix) was close.
    int matched = 0;
    for (const Digest& known : digests_) {
      matched |= static_cast<int>(CRYPTO_memcmp(presented.data(), known.data(), known.size()) == 0);
    }
    if (matched == 0) return Unauthorized("invalid_token", "The bearer token is not valid");
    return Principal{};
  }

 private:
  EvpMdPtr sha256_;
  std::vector<Digest> digests_;
};

Status AddServiceTokens(std::string_view variable, std::string_view text, char separator, bool allow_comments,
                        const EVP_MD* md, std::vector<Digest>& digests) {
  size_t start = 0;
  size_t index = 0;
  while (start <= text.size()) {
    size_t end = text.find(separator, start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view token = Trim(text.substr(start, end - start));
    start = end + 1;
    if (token.empty() || (allow_comments && token.front() == '#')) continue;
    ++index;
    // Errors say which entry, never what it is.
    std::string which = "entry " + std::to_string(index);
    if (token.size() < kMinServiceTokenBytes) {
      return BadConfig(variable, which + " is shorter than " + std::to_string(kMinServiceTokenBytes) +
                                     " characters: use a long random token (openssl rand -hex 32)");
    }
    if (token.size() > kMaxBearerTokenBytes) {
      return BadConfig(variable, which + " is longer than " + std::to_string(kMaxBearerTokenBytes) + " bytes");
    }
    if (!IsB64Token(token)) {
      return BadConfig(variable, which + " has characters a bearer token cannot carry (allowed: A-Z a-z 0-9 - . _ ~ + / "
                                         "and trailing =)");
    }
    if (std::optional<std::string> weak = SecretWeakness(token)) return BadConfig(variable, which + " " + *weak);
    if (digests.size() >= kMaxServiceTokens) {
      return BadConfig(variable, "lists more than " + std::to_string(kMaxServiceTokens) + " tokens");
    }
    Digest d;
    if (!Sha256(md, token, d)) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");
    digests.push_back(d);
  }
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Authenticator>> MakeServiceAuthenticator(const AuthConfig& config) {
  constexpr const char* kInline = "CHATD_SERVICE_TOKENS";
  constexpr const char* kFile = "CHATD_SERVICE_TOKENS_FILE";
  std::optional<std::string> inline_tokens = config.service_tokens;
  const std::optional<std::string>& file = config.service_tokens_file;
  std::string inline_text = inline_tokens ? std::move(*inline_tokens) : std::string();
  ScopedCleanse wipe_copy(inline_text);
  if (inline_tokens && file) return BadConfig(kInline, "and CHATD_SERVICE_TOKENS_FILE are both set: set only one");
  if (!inline_tokens && !file) {
    return BadConfig(kInline, "(or CHATD_SERVICE_TOKENS_FILE) is required when CHATD_AUTH_MODE=service");
  }

  EvpMdPtr sha256(EVP_MD_fetch(nullptr, "SHA256", nullptr));
  if (!sha256) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");
  std::vector<Digest> digests;
  if (inline_tokens) {
    Status s = AddServiceTokens(kInline, inline_text, ',', /*allow_comments=*/false, sha256.get(), digests);
    if (!s.ok()) return s;
  } else {
    Result<std::string> text = ReadProtectedFile(*file, kFile, kSecretForbiddenBits);
    if (!text.ok()) return text.status();
    ScopedCleanse wipe_file(*text);
    Status s = AddServiceTokens(kFile, *text, '\n', /*allow_comments=*/true, sha256.get(), digests);
    if (!s.ok()) return s;
  }
  if (digests.empty()) return BadConfig(inline_tokens ? kInline : kFile, "contains no token");
  std::unique_ptr<Authenticator> auth =
      std::make_unique<ServiceTokenAuthenticator>(std::move(sha256), std::move(digests));
  return auth;
}

}  // namespace chatd
