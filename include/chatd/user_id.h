// The user id rule, and how an id becomes storage names. Every mapping here is
// injective, so two distinct users can never share a Redis key or a Chroma
// collection, whatever their ids look like (docs/api.md states the rule).
#pragma once

#include <compare>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace chatd {

inline constexpr size_t kMaxUserIdLength = 64;

// 1 to 64 characters of [A-Za-z0-9_.@-]. Case matters: "Alice" and "alice"
// are two users.
bool IsValidUserId(std::string_view user_id);

// A user id that satisfies IsValidUserId. Parse is the only way to make one,
// so whatever takes a UserId never checks it again, and the storage names
// below are safe for every value it can hold. Requests parse theirs where they
// enter (the body's userId, the query's, a token's subject, chatd-cleanup's
// argument); ids read back from storage (stream entries, the activity index,
// archive files, ...) are parsed by their reader, which handles a malformed
// one itself. Everything below takes a UserId: the interfaces, the adapters
// and every key builder (redis_schema.h), so no unchecked string reaches a
// key. The conversion below is for reading an id as text (logs, arguments).
class UserId {
 public:
  // nullopt when `text` breaks the rule; the caller says why in its own
  // words (a body field, a query parameter, a token's subject).
  static std::optional<UserId> Parse(std::string_view text);

  const std::string& str() const { return value_; }
  operator std::string_view() const { return value_; }  // NOLINT: an id is read as text everywhere
  friend bool operator==(const UserId& a, const UserId& b) = default;
  // By the id's bytes, so a UserId can key a map or a set.
  friend auto operator<=>(const UserId& a, const UserId& b) = default;
  friend bool operator==(const UserId& a, std::string_view b) { return a.value_ == b; }

 private:
  explicit UserId(std::string value) : value_(std::move(value)) {}
  std::string value_;
};

// "chat:{<id>}:<suffix>": a user's keys in the layout before the shards, which
// `chatd-cleanup migrate-keys` moves (redis_schema.h spells the current ones).
// The id sits verbatim inside the hash tag; ids cannot contain '{' or '}', so
// the key identifies its user.
std::string UserKey(const UserId& user_id, std::string_view suffix);

// "chatd-u-<lower-case hex of the id's bytes>": within Chroma's rules (3-512 of
// [a-zA-Z0-9._-], alphanumeric at both ends, no "..") for every valid id, and
// immune to case folding anywhere below us.
std::string ChromaCollectionName(const UserId& user_id);

}  // namespace chatd
