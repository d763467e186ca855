// Idempotency keys in Redis (idempotency.h), next to the user's other keys
// (redis_schema.h names them):
//   IdempotencyRedisKey  hash
//     fp    the request's fingerprint
//     tok   the claim of the request in flight (absent once answered)
//     turn, resp  the answer, once the record script has kept it
//   IdempotencyKeysKey  sorted set: the names of those hashes, by when
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
#include "chatd/redis_schema.h"

namespace chatd {

class RedisIdempotencyStore final : public IdempotencyStore {
 public:
  // `claim_ttl_ms`: the longest a chat may run, record included.
  RedisIdempotencyStore(RedisClient& redis, int64_t claim_ttl_ms);

  // One script call.
  Result<KeyClaim> Claim(const UserId& user_id, const IdempotencyTicket& ticket) override;
  // One script call (compare-and-delete).
  Status Release(const UserId& user_id, const IdempotencyTicket& ticket) override;

 private:
  RedisClient& redis_;
  std::string claim_ttl_ms_;
};

// The claim script's reply as a claim. Exposed for tests.
Result<KeyClaim> KeyClaimFromReply(const RedisValue& reply);

}  // namespace chatd
