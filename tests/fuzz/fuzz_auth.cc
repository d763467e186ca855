// The Authorization header and JWT decoding (src/auth.cc): bearer parsing,
// base64url, the JWT header and payload JSON, the claims and the HS256
// signature check, through the same Authenticator a worker uses.
//
// The first byte picks how the rest is used:
//   even: the rest is the Authorization value, as a client sent it (so the
//         signature check runs on whatever was sent and must refuse it);
//   odd:  the rest is "<header JSON>\0<payload JSON>", which the harness
//         encodes and signs with the configured secret, so the fuzzer reaches
//         the header and claim checks behind a valid signature.
#include <openssl/hmac.h>

#include <memory>
#include <optional>
#include <string>

#include "auth_internal.h"
#include "chatd/auth.h"
#include "chatd/user_id.h"
#include "fuzz_input.h"

namespace {

using namespace chatd;

// Random-looking: chatd refuses placeholder and low-entropy secrets at start.
constexpr char kSecret[] = "q7Vx2LmR9tKp4ZsW8nBc3HyJ6dFg1AeU";
constexpr char kIssuer[] = "https://issuer.example";
constexpr char kAudience[] = "chatd";
// Fixed "now", so exp and nbf around it in the seeds stay meaningful.
constexpr int64_t kNow = 1'700'000'000;
constexpr unsigned kSha256Bytes = 32;

std::optional<std::string> FuzzEnv(const std::string& name) {
  if (name == "CHATD_JWT_ALGORITHM") return "HS256";
  if (name == "CHATD_JWT_SECRET") return kSecret;
  if (name == "CHATD_JWT_ISSUER") return kIssuer;
  if (name == "CHATD_JWT_AUDIENCE") return kAudience;
  return std::nullopt;
}

Authenticator& Verifier() {
  static std::unique_ptr<Authenticator> auth = [] {
    auto made = MakeAuthenticator(AuthMode::kJwt, FuzzEnv, [] { return kNow; });
    fuzz::Require(made.ok(), "the HS256 configuration is accepted");
    return std::move(*made);
  }();
  return *auth;
}

// Unpadded base64url, the encoding Base64UrlDecode accepts.
std::string Base64UrlEncode(std::string_view in) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    acc = (acc << 8) | static_cast<unsigned char>(c);
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(kAlphabet[(acc >> bits) & 0x3f]);
    }
  }
  if (bits > 0) out.push_back(kAlphabet[(acc << (6 - bits)) & 0x3f]);
  return out;
}

std::string Sign(std::string_view signing_input) {
  unsigned char mac[kSha256Bytes];
  unsigned len = 0;
  HMAC(EVP_sha256(), kSecret, sizeof(kSecret) - 1, reinterpret_cast<const unsigned char*>(signing_input.data()),
       signing_input.size(), mac, &len);
  fuzz::Require(len == kSha256Bytes, "HMAC-SHA256 works");
  return Base64UrlEncode(std::string_view(reinterpret_cast<const char*>(mac), len));
}

void CheckVerdict(const Result<Principal>& who) {
  if (who.ok()) {
    fuzz::Require(who->subject && IsValidUserId(*who->subject), "an accepted token names a valid user");
  } else {
    fuzz::Require(who.status().code() == Code::kUnauthorized, "a refused token is 401");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool sign = (data[0] & 1) != 0;
  std::string_view rest = fuzz::Bytes(data + 1, size - 1);
  HttpRequest req;
  req.request_id = "fuzz";

  if (!sign) {
    req.authorization.assign(rest);
    Result<std::string_view> token = BearerToken(rest);
    if (token.ok()) {
      fuzz::Require(!token->empty() && token->size() <= kMaxBearerTokenBytes, "a token within bounds");
      // Strict base64url: whatever decodes re-encodes to the very same text.
      std::string decoded;
      if (Base64UrlDecode(*token, decoded)) {
        fuzz::Require(Base64UrlEncode(decoded) == *token, "one value, one encoding");
      }
    }
    CheckVerdict(Verifier().Authenticate(req));
    return 0;
  }

  std::string_view header = fuzz::NextField(rest);
  std::string_view payload = rest;
  std::string signing_input = Base64UrlEncode(header) + "." + Base64UrlEncode(payload);
  req.authorization = "Bearer " + signing_input + "." + Sign(signing_input);
  CheckVerdict(Verifier().Authenticate(req));
  return 0;
}
