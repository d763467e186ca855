// Start-up checks that a configured secret (the HS256 key, a service token) is
// not a placeholder copied from an example and not obviously low in entropy.
// Length alone is not enough: "replace-with-at-least-32-random-bytes-0000" is
// 42 bytes long and known to everyone who read the example file.
//
// A secret is refused when, compared without regard to ASCII case,
//   - it contains a word of kPlaceholderWords ("replace", "changeme",
//     "example", "secret", "password", ...), or
//   - it has fewer than kMinDistinctSecretBytes different byte values, or
//   - it has a run of kMaxSecretRun or more bytes that repeat ("aaaaaaaa") or
//     count up or down by one ("12345678", "hgfedcba").
// Output of `openssl rand -hex 32` or `-base64 48` passes all three with
// overwhelming probability (a run of 8 in 64 random hex digits: about 1 in
// 10^7; fewer than 10 distinct digits: about 1 in 10^9).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace chatd {

inline constexpr size_t kMinDistinctSecretBytes = 10;
inline constexpr size_t kMaxSecretRun = 8;
// Words of five letters or more only: a shorter one would turn up in random
// base64 too often (a given five-letter word: about 2 in 10^6 for 64 chars).
inline constexpr std::string_view kPlaceholderWords[] = {
    "replace", "changeme", "change-me", "change_me", "example", "placeholder", "secret", "password",
    "passwd",  "default",  "dummy",     "sample",    "insecure", "letmein",    "qwerty",
};

// Why `secret` is too weak to use, in words that never quote it; nullopt when
// it passes.
std::optional<std::string> SecretWeakness(std::string_view secret);

}  // namespace chatd
