// Secrets and keys read from files named by variables (*_FILE), checked on the
// open descriptor before a byte is read.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>

#include "chatd/status.h"

namespace chatd {


// Secrets: the group may read them (0640, like the environment file), nobody
// else may read, nobody but the owner may write. A public key is not secret,
// but whoever can write it can mint tokens.
inline constexpr mode_t kSecretForbiddenBits = 0027;
inline constexpr mode_t kPublicKeyForbiddenBits = 0022;

// Reads a secret (or key) file named by the variable `variable` after checking
// on the open descriptor that it is a regular file with none of
// `forbidden_mode_bits` set (kSecretForbiddenBits for secrets,
// kPublicKeyForbiddenBits for a public key). Errors are bad_config naming the
// variable, never quoting the content.
Result<std::string> ReadProtectedFile(const std::string& path, std::string_view variable,
                                      mode_t forbidden_mode_bits);

// kInvalidArgument "bad_config": "<variable> <why>".
Status BadConfig(std::string_view variable, std::string_view why);

}  // namespace chatd
