// Access control: who is speaking. The HTTP layer asks the Authenticator
// before it even parses the body, so a flood of bad credentials costs a header
// check and never touches Redis, the model or another user's quota.
//
// Modes (docs/auth.md): off (the body's userId is trusted; for local demos
// only), service (a trusted backend presents one of the configured bearer
// tokens and speaks for the body's userId), jwt (each client presents a signed
// token; the user is its "sub").
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "chatd/config.h"
#include "chatd/http.h"
#include "chatd/status.h"

namespace chatd {

struct Principal {
  // The authenticated user (jwt mode), or nullopt when the caller is a trusted
  // service that names the user in the body (service mode).
  std::optional<std::string> subject;
};

// Thread-safe.
class Authenticator {
 public:
  virtual ~Authenticator() = default;
  // kUnauthorized (missing, malformed, expired, badly signed...) with a reason
  // for logs and metrics; the Status never contains the token.
  virtual Result<Principal> Authenticate(const HttpRequest& req) = 0;
};

// Builds the authenticator for the configured mode from the environment
// (secrets from variables or files: docs/auth.md, docs/configuration.md). Returns nullptr
// for mode off. Fails with a message naming the variable when the mode lacks
// what it needs.
Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env);

// Longest Authorization value we look at; anything longer is refused before
// any decoding or hashing.
inline constexpr size_t kMaxBearerTokenBytes = 8 * 1024;

// Seconds since the epoch. Injected so tests can put a token's exp and nbf
// exactly at the edge of the leeway.
using EpochSecondsFn = std::function<int64_t()>;
Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env,
                                                         EpochSecondsFn now);

// Building blocks of the authenticators, exposed for unit tests.

// The token of an Authorization value "Bearer <token>" (scheme in any case,
// then spaces, then a b64token of RFC 6750). The view points into
// `authorization`. kUnauthorized: missing_token, bad_auth_scheme,
// malformed_token, token_too_long.
Result<std::string_view> BearerToken(std::string_view authorization);

// Strict unpadded base64url (RFC 7515 section 2): no padding, no other
// alphabet, no stray bits in the last character, so one value has exactly one
// encoding. Replaces `out`; false on any deviation.
bool Base64UrlDecode(std::string_view in, std::string& out);

// Reads a secret (or key) file named by the variable `variable` after checking
// on the open descriptor that it is a regular file with none of
// `forbidden_mode_bits` set (0027 for secrets: group may read, as for the env
// file; 0022 for a public key). Errors are bad_config naming the variable,
// never quoting the content.
Result<std::string> ReadProtectedFile(const std::string& path, std::string_view variable,
                                      mode_t forbidden_mode_bits);

}  // namespace chatd
