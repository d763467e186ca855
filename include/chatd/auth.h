// Access control: who is speaking. The HTTP layer asks the Authenticator
// before it even parses the body, so a flood of bad credentials costs a header
// check and never touches Redis, the model or another user's quota.
//
// Modes (docs/auth.md): off (the body's userId is trusted; for local demos
// only), service (a trusted backend presents one of the configured bearer
// tokens and speaks for the body's userId), jwt (each client presents a signed
// token; the user is its "sub").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "chatd/config.h"
#include "chatd/http.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

struct Principal {
  // The authenticated user (jwt mode), or nullopt when the caller is a trusted
  // service that names the user in the body (service mode).
  std::optional<UserId> subject;
};

// Thread-safe.
class Authenticator {
 public:
  virtual ~Authenticator() = default;
  // kUnauthorized (missing, malformed, expired, badly signed...) with a reason
  // for logs and metrics; the Status never contains the token.
  virtual Result<Principal> Authenticate(const HttpRequest& req) = 0;
};

// Builds the authenticator for the configured mode from its variables
// (LoadConfig reads them; secrets come from variables or files: docs/auth.md,
// docs/configuration.md). Returns nullptr for mode off. Fails with a message
// naming the variable when the mode lacks what it needs.
//
// `now`: seconds since the epoch, injected so tests can put a token's exp and
// nbf exactly at the edge of the leeway; empty for the system clock.
using EpochSecondsFn = std::function<int64_t()>;
Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const AuthConfig& config,
                                                         EpochSecondsFn now = {});

// Longest Authorization value we look at; anything longer is refused before
// any decoding or hashing.
inline constexpr size_t kMaxBearerTokenBytes = 8 * 1024;

}  // namespace chatd
