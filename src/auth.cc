// Access control (auth.h): the mode's authenticator, and the bearer-token
// parsing both modes share. Service tokens are in service_token_auth.cc, JWT
// in jwt_auth.cc, secret files in secret_file.cc.
#include "chatd/auth.h"

#include <cstdint>
#include <utility>

#include "auth_internal.h"

namespace chatd {

namespace {

constexpr size_t kMaxSchemeSlackBytes = 64;


bool EqualsIgnoreAsciiCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

bool IsAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

int Base64UrlValue(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

}  // namespace

// RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
bool IsB64Token(std::string_view s) {
  size_t end = s.size();
  while (end > 0 && s[end - 1] == '=') --end;
  if (end == 0) return false;
  for (size_t i = 0; i < end; ++i) {
    char c = s[i];
    if (!(IsAlnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/')) return false;
  }
  return true;
}

Status Unauthorized(const char* reason, const char* message) {
  return Status(Code::kUnauthorized, reason, message);
}

Result<std::string_view> BearerToken(std::string_view authorization) {
  if (authorization.empty()) return Unauthorized("missing_token", "Send Authorization: Bearer <token>");
  if (authorization.size() > kMaxBearerTokenBytes + kMaxSchemeSlackBytes) {
    return Unauthorized("token_too_long", "The bearer token is too long");
  }
  constexpr std::string_view kScheme = "bearer";
  if (authorization.size() <= kScheme.size() ||
      !EqualsIgnoreAsciiCase(authorization.substr(0, kScheme.size()), kScheme) ||
      authorization[kScheme.size()] != ' ') {
    return Unauthorized("bad_auth_scheme", "Use the Bearer authorization scheme");
  }
  std::string_view token = authorization.substr(kScheme.size());
  while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
  if (token.size() > kMaxBearerTokenBytes) return Unauthorized("token_too_long", "The bearer token is too long");
  // Also refuses a second credential after a comma or a space.
  if (!IsB64Token(token)) return Unauthorized("malformed_token", "The bearer token is malformed");
  return token;
}

bool Base64UrlDecode(std::string_view in, std::string& out) {
  out.clear();
  // One character alone carries 6 bits: not even one byte.
  if (in.size() % 4 == 1) return false;
  out.reserve(in.size() / 4 * 3 + 2);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    int v = Base64UrlValue(c);
    if (v < 0) return false;
    acc = ((acc << 6) | static_cast<uint32_t>(v)) & 0xffffu;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xffu));
    }
  }
  return (acc & ((1u << bits) - 1u)) == 0;  // unused low bits must be zero
}

Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const AuthConfig& config,
                                                         EpochSecondsFn now) {
  switch (mode) {
    case AuthMode::kOff:
      return std::unique_ptr<Authenticator>();
    case AuthMode::kService:
      return MakeServiceAuthenticator(config);
    case AuthMode::kJwt:
      return MakeJwtAuthenticator(config, std::move(now));
  }
  return Internal("bad_auth_mode", "unknown CHATD_AUTH_MODE");
}

Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env, EpochSecondsFn now) {
  return MakeAuthenticator(mode, ReadAuthConfig(env), std::move(now));
}

}  // namespace chatd
