// Idempotency keys in Redis (idempotency.h), next to the user's other keys:
//   chat:{<user>}:idem:<sha-256 hex of the key>  hash
//     fp    the request's fingerprint
//     tok   the claim of the request in flight (absent once answered)
//     turn, resp  the answer, once the record script has kept it
//   chat:{<user>}:idemkeys  sorted set: the names of those hashes, by when
//     they expire at the latest, so an erase deletes them without a SCAN
// The hash tag keeps it in the user's slot, so the record script can write
// the answer in the same atomic step as the turn. A claim lives as long as a
// chat may run; an answer as long as the configuration keeps it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "chatd/idempotency.h"
#include "chatd/redis.h"

namespace chatd {

// The Redis key of an idempotency key: hashed, so that any printable key (and
// its length) fits a key name without escaping.
Result<std::string> IdempotencyRedisKey(std::string_view user_id, std::string_view key);
// The user's list of those keys (kept by the claim script), for the erase.
std::string IdempotencyKeysKey(std::string_view user_id);

class RedisIdempotencyStore final : public IdempotencyStore {
 public:
  // `claim_ttl_ms`: the longest a chat may run, record included.
  RedisIdempotencyStore(RedisClient& redis, int64_t claim_ttl_ms);

  // One script call.
  Result<KeyClaim> Claim(std::string_view user_id, const IdempotencyTicket& ticket) override;
  // One script call (compare-and-delete).
  Status Release(std::string_view user_id, const IdempotencyTicket& ticket) override;

 private:
  RedisClient& redis_;
  std::string claim_ttl_ms_;
};

// The claim script's reply as a claim. Exposed for tests.
Result<KeyClaim> KeyClaimFromReply(const RedisValue& reply);

}  // namespace chatd
