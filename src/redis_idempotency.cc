#include "redis_idempotency.h"

#include "chatd/user_id.h"

namespace chatd {

namespace {

// KEYS[1]: the key's hash, KEYS[2]: the user's list of key hashes.
// ARGV: fingerprint, token, claim TTL in ms, how long an answer is kept (ms).
// A different fingerprint wins over "in progress": the client reused the key
// for another request, whatever became of the first. The list lets an erase
// find the user's keys (and the answers they hold) without a SCAN; an entry
// goes once the key it names must have expired.
const RedisScript kClaim(R"lua(
local held = redis.call('HMGET', KEYS[1], 'fp', 'turn', 'resp')
if not held[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'tok', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local life = math.max(tonumber(ARGV[3]), tonumber(ARGV[4]))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], now + life, KEYS[1])
  redis.call('PEXPIRE', KEYS[2], life)
  return {'claimed'}
end
if held[1] ~= ARGV[1] then return {'reused'} end
if held[2] then return {'done', held[2], held[3]} end
return {'busy'}
)lua");

// KEYS[1]: the key's hash. ARGV: token. Deletes only this request's claim,
// never an answer or another request's claim. (HMGET, not HGET: the ACL of
// systemd/redis-acl.conf.example allows the former.)
const RedisScript kRelease(R"lua(
if redis.call('HMGET', KEYS[1], 'tok')[1] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
)lua");

}  // namespace

RedisIdempotencyStore::RedisIdempotencyStore(RedisClient& redis, int64_t claim_ttl_ms)
    : redis_(redis), claim_ttl_ms_(std::to_string(claim_ttl_ms)) {}

Result<KeyClaim> RedisIdempotencyStore::Claim(const UserId& user_id, const IdempotencyTicket& ticket) {
  Result<std::string> key = IdempotencyRedisKey(user_id, ticket.key);
  if (!key.ok()) return key.status();
  const std::string list = IdempotencyKeysKey(user_id);
  const std::string keep_ms = std::to_string(ticket.keep_ms);
  auto reply = redis_.Eval(kClaim, {*key, list}, {ticket.fingerprint, ticket.token, claim_ttl_ms_, keep_ms});
  if (!reply.ok()) return reply.status();
  return KeyClaimFromReply(*reply);
}

Status RedisIdempotencyStore::Release(const UserId& user_id, const IdempotencyTicket& ticket) {
  Result<std::string> key = IdempotencyRedisKey(user_id, ticket.key);
  if (!key.ok()) return key.status();
  auto reply = redis_.Eval(kRelease, {*key}, {ticket.token});
  if (!reply.ok()) return reply.status();
  if (reply->is_error()) return Unavailable("redis_error", "releasing an idempotency key failed");
  return Status::Ok();
}

Result<KeyClaim> KeyClaimFromReply(const RedisValue& reply) {
  if (reply.is_error()) return Unavailable("redis_error", "claiming an idempotency key failed");
  const auto& e = reply.elements;
  if (reply.type == RedisValue::Type::kArray && !e.empty()) {
    KeyClaim claim;
    const std::string& verdict = e[0].str;
    if (verdict == "claimed") return claim;
    if (verdict == "busy") {
      claim.state = KeyState::kInProgress;
      return claim;
    }
    if (verdict == "reused") {
      claim.state = KeyState::kReused;
      return claim;
    }
    if (verdict == "done" && e.size() == 3 && e[1].type == RedisValue::Type::kString &&
        e[2].type == RedisValue::Type::kString) {
      claim.state = KeyState::kCompleted;
      claim.turn_id = e[1].str;
      claim.response = e[2].str;
      return claim;
    }
  }
  return Internal("idempotency_bad_reply", "internal error: unexpected reply from the idempotency script");
}

}  // namespace chatd
