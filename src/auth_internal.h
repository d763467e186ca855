// What the authenticators share (auth.cc, service_token_auth.cc,
// jwt_auth.cc), and their building blocks, exposed for unit tests and the
// fuzzer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "chatd/auth.h"
#include "chatd/config.h"
#include "chatd/status.h"

namespace chatd {

// The token of an Authorization value "Bearer <token>" (scheme in any case,
// then spaces, then a b64token of RFC 6750). The view points into
// `authorization`. kUnauthorized: missing_token, bad_auth_scheme,
// malformed_token, token_too_long.
Result<std::string_view> BearerToken(std::string_view authorization);

// Strict unpadded base64url (RFC 7515 section 2): no padding, no other
// alphabet, no stray bits in the last character, so one value has exactly one
// encoding. Replaces `out`; false on any deviation.
bool Base64UrlDecode(std::string_view in, std::string& out);

// RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
bool IsB64Token(std::string_view s);

Status Unauthorized(const char* reason, const char* message);

// MakeAuthenticator from the variables themselves, as LoadConfig would read
// them: for unit tests and the fuzzer, which vary one variable at a time.
Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env,
                                                         EpochSecondsFn now = {});

Result<std::unique_ptr<Authenticator>> MakeServiceAuthenticator(const AuthConfig& config);
Result<std::unique_ptr<Authenticator>> MakeJwtAuthenticator(const AuthConfig& config, EpochSecondsFn now);

}  // namespace chatd
