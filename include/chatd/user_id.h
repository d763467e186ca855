// The user id rule, and how an id becomes storage names. Every mapping here is
// injective, so two distinct users can never share a Redis key or a Chroma
// collection, whatever their ids look like (docs/api.md states the rule).
#pragma once

#include <string>
#include <string_view>

namespace chatd {

inline constexpr size_t kMaxUserIdLength = 64;

// 1 to 64 characters of [A-Za-z0-9_.@-]. Case matters: "Alice" and "alice"
// are two users.
bool IsValidUserId(std::string_view user_id);

// "chat:{<id>}:<suffix>": a user's keys in the layout before the shards, which
// `chatd-cleanup migrate-keys` moves (redis_schema.h spells the current ones).
// The id sits verbatim inside the hash tag; ids cannot contain '{' or '}', so
// the key identifies its user.
std::string UserKey(std::string_view user_id, std::string_view suffix);

// "chatd-u-<lower-case hex of the id's bytes>": within Chroma's rules (3-512 of
// [a-zA-Z0-9._-], alphanumeric at both ends, no "..") for every valid id, and
// immune to case folding anywhere below us.
std::string ChromaCollectionName(std::string_view user_id);

}  // namespace chatd
