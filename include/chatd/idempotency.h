// Idempotent retries of POST /api/chat, after the IETF httpapi draft
// "The Idempotency-Key HTTP Header Field": a client that sends a key may
// retry (a timeout, a 502, a 503 record_outcome_unknown) without paying the
// model twice or being remembered twice. Keys are scoped to the user.
//
// The chat service claims the key before anything else (IdempotencyStore),
// the store of the turn keeps the answer under the key in the same atomic
// step that records the turn (Turn::idempotency), and a failure that stored
// nothing gives the claim back, so a retry runs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

inline constexpr size_t kMaxIdempotencyKeyLength = 255;

// The key of an Idempotency-Key header value. The draft makes the value a
// structured-field string ("...", with \" and \\ escapes); clients of payment
// APIs often send it bare. Both are accepted and name the same key. nullopt
// when the key is empty, longer than kMaxIdempotencyKeyLength, or holds a
// character outside printable ASCII (0x20-0x7e).
std::optional<std::string> ParseIdempotencyKey(std::string_view header_value);

// Lower-case hex SHA-256 of `data`: fingerprints of requests and the digests
// that put a key of any content into a Redis key name.
Result<std::string> Sha256Hex(std::string_view data);

// What a chat holding a key carries to the end: the store of the turn needs
// it to keep the answer under the key.
struct IdempotencyTicket {
  std::string key;          // as the client meant it (unquoted)
  std::string fingerprint;  // of the request: a retry must match it
  std::string token;        // this request's claim, unique per request
  int64_t keep_ms = 0;      // how long the answer is kept once recorded
};

enum class KeyState {
  kClaimed,     // nobody had the key: this request now holds it
  kInProgress,  // a request with the key is still running (409)
  kReused,      // the key was used with another request (422)
  kCompleted,   // the key's request was answered: replay its answer
};

struct KeyClaim {
  KeyState state = KeyState::kClaimed;
  std::string turn_id;   // kCompleted: the first answer's
  std::string response;  // kCompleted
};

// Thread-safe.
class IdempotencyStore {
 public:
  virtual ~IdempotencyStore() = default;
  // Claims the ticket's key for the user unless someone has it; a claim
  // expires by itself after the longest a chat can run, so a worker that dies
  // holding one blocks the key for that long at most.
  virtual Result<KeyClaim> Claim(const UserId& user_id, const IdempotencyTicket& ticket) = 0;
  // Gives back a claim whose request stored nothing, so a retry runs.
  // Compare-and-delete: a key no longer held by this ticket is left alone.
  virtual Status Release(const UserId& user_id, const IdempotencyTicket& ticket) = 0;
};

}  // namespace chatd
