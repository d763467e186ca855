#include "redis_rate_limiter.h"

#include <algorithm>

#include "random_id.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// The per-user cap on chats in flight, prepended to both algorithms. Active
// only when the caller passes KEYS[2]: a sorted set of lease ids scored by
// their expiry in ms of Redis time. ARGV[3]: the cap, ARGV[4]: the lease TTL
// in ms, ARGV[5]: this request's lease id.
//
// Expired leases (their worker died before releasing) are dropped before a
// full set refuses anyone, so a crash costs a slot for one TTL at most. Only
// a full set is pruned: below the cap an expired lease changes no answer, and
// admissions stop at the cap, so the common admission saves Redis the prune.
// Every lease expires within the TTL, so re-arming the key's TTL on each
// admission keeps the key alive exactly as long as a lease may be in it. The
// scripts below ask only after the rate check has passed and before anything
// is counted: a request over the cap consumes no quota.
constexpr char kInflightLua[] = R"lua(
local function inflight_full(now_ms)
  if KEYS[2] == nil then return false end
  local cap = tonumber(ARGV[3])
  if redis.call('ZCARD', KEYS[2]) < cap then return false end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now_ms))
  return redis.call('ZCARD', KEYS[2]) >= cap
end
local function inflight_add(now_ms)
  if KEYS[2] == nil then return end
  local ttl = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], string.format('%d', now_ms + ttl), ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
)lua";

// Fixed window. KEYS[1]: hash {w = window index, n = admitted in it}.
// ARGV: limit, window in ms.
//
// Windows are aligned to multiples of the window on Redis's clock, and the
// window index lives inside the one declared key (a per-window key name would
// depend on TIME, which the caller cannot know to declare it for Cluster).
// Cheap and simple, but a client can get N at the end of one window and N more
// at the start of the next: up to 2N within one window's span around a
// boundary. The sliding log below does not have that flaw.
//
// Every write re-arms the TTL to the end of the window, in the same atomic
// script, so no key can outlive its window; a rejection writes nothing and so
// costs no quota.
constexpr char kFixedWindowLua[] = R"lua(
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now_ms / window_ms)
local reset_ms = (window + 1) * window_ms - now_ms
local window_id = string.format('%d', window)
local state = redis.call('HMGET', KEYS[1], 'w', 'n')
local count = 0
if state[1] == window_id then count = tonumber(state[2]) or 0 end
if count < limit then
  if inflight_full(now_ms) then return {2, limit - count, reset_ms, 0} end
  count = count + 1
  redis.call('HSET', KEYS[1], 'w', window_id, 'n', count)
  redis.call('PEXPIRE', KEYS[1], reset_ms)
  inflight_add(now_ms)
  return {1, limit - count, reset_ms, 0}
end
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], reset_ms) end
return {0, 0, reset_ms, reset_ms}
)lua";

// Sliding log. KEYS[1]: sorted set of admissions, scored by Redis time in
// microseconds. ARGV: limit, window in ms.
//
// An admission at s counts while now - window < s <= now, so at most `limit`
// admissions fall in any rolling window. Members are "<µs>-<seq>", made unique
// with ZADD NX: two admissions can share a microsecond. The TTL is re-armed to
// one window on every admission; every entry is at most that old, so the key
// expires exactly when the log would be empty anyway. Trimming old entries is
// the only write on a rejection and leaves the TTL in place.
constexpr char kSlidingLogLua[] = R"lua(
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local window_us = window_ms * 1000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window_us))
local count = redis.call('ZCARD', key)
local function ms_until_leaves(index)
  local e = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
  if e[2] == nil then return 0 end
  return math.ceil((tonumber(e[2]) + window_us - now) / 1000)
end
if count < limit then
  local now_ms = math.floor(now / 1000)
  if inflight_full(now_ms) then return {2, limit - count, ms_until_leaves(0), 0} end
  local now_id = string.format('%d', now)
  local seq = count
  while redis.call('ZADD', key, 'NX', now_id, now_id .. '-' .. seq) == 0 do seq = seq + 1 end
  redis.call('PEXPIRE', key, window_ms)
  inflight_add(now_ms)
  count = count + 1
  return {1, limit - count, ms_until_leaves(0), 0}
end
if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, window_ms) end
return {0, 0, ms_until_leaves(0), ms_until_leaves(count - limit)}
)lua";

const RedisScript& FixedWindowScript() {
  static const RedisScript script(std::string(kInflightLua) + kFixedWindowLua);
  return script;
}

const RedisScript& SlidingLogScript() {
  static const RedisScript script(std::string(kInflightLua) + kSlidingLogLua);
  return script;
}

}  // namespace

RedisRateLimiter::RedisRateLimiter(RedisClient& redis, int64_t limit, int64_t window_s, RateAlgorithm algorithm,
                                   ConcurrencyCap cap, std::optional<RateCounter> counter)
    : redis_(redis),
      limit_(std::max<int64_t>(limit, 0)),
      window_s_(std::max<int64_t>(window_s, 1)),
      algorithm_(algorithm),
      limit_arg_(std::to_string(limit_)),
      window_ms_arg_(std::to_string(window_s_ * 1000)),
      cap_{std::max<int64_t>(cap.max_in_flight, 0), std::max<int64_t>(cap.lease_ttl_ms, 1)},
      cap_arg_(std::to_string(cap_.max_in_flight)),
      lease_ttl_ms_arg_(std::to_string(cap_.lease_ttl_ms)),
      counter_(counter.value_or(algorithm == RateAlgorithm::kSliding ? RateCounter::kChatSliding
                                                                      : RateCounter::kChatFixed)) {}

std::string RedisRateLimiter::KeyFor(const UserId& user_id) const {
  return RateKey(user_id, counter_);
}

RedisRateLimiter::Call RedisRateLimiter::MakeCall(const UserId& user_id) const {
  Call call;
  call.script = algorithm_ == RateAlgorithm::kSliding ? &SlidingLogScript() : &FixedWindowScript();
  call.keys.push_back(KeyFor(user_id));
  if (cap_.max_in_flight > 0) {
    // Same hash tag as the rate key: one slot, one script, one round trip.
    call.keys.push_back(InflightKey(user_id));
    call.lease = RandomHexId();
  }
  return call;
}

std::vector<std::string_view> RedisRateLimiter::Args(const Call& call) const {
  if (cap_.max_in_flight == 0) return {limit_arg_, window_ms_arg_};
  return {limit_arg_, window_ms_arg_, cap_arg_, lease_ttl_ms_arg_, call.lease};
}

Result<RateDecision> RedisRateLimiter::Decide(Call& call, const RedisValue& reply) const {
  Result<RateDecision> decision = RateDecisionFromReply(reply, limit_, window_s_);
  if (decision.ok() && decision->allowed) decision->lease_id = std::move(call.lease);
  return decision;
}

Result<RateDecision> RedisRateLimiter::Check(const UserId& user_id) {
  Call call = MakeCall(user_id);
  auto reply = redis_.Eval(*call.script, {call.keys.begin(), call.keys.end()}, Args(call));
  if (!reply.ok()) return reply.status();
  return Decide(call, *reply);
}

Status RedisRateLimiter::Release(const UserId& user_id, std::string_view lease_id) {
  if (lease_id.empty()) return Status::Ok();
  auto reply = redis_.Command({"ZREM", InflightKey(user_id), lease_id});
  if (!reply.ok()) return reply.status();
  if (reply->is_error()) return Unavailable("redis_error", "releasing a concurrency lease failed");
  return Status::Ok();
}

Result<RateDecision> RateDecisionFromReply(const RedisValue& reply, int64_t limit, int64_t window_s) {
  if (reply.is_error()) {
    // Only the error's first word: the rest may quote script internals.
    // Redis that cannot serve now (LOADING, BUSY, OOM...): the caller's
    // fail-open/closed policy should decide, not a 500.
    if (IsTransientRedisError(reply.str)) return RedisReplyError(reply.str, "the rate-limit script");
    const std::string_view code = std::string_view(reply.str).substr(0, reply.str.find(' '));
    return Internal("rate_limiter_script_error", "redis refused the rate-limit script: " + std::string(code));
  }
  const auto bad_reply = [] {
    return Internal("rate_limiter_bad_reply", "internal error: unexpected reply from the rate-limit script");
  };
  if (reply.type != RedisValue::Type::kArray || reply.elements.size() != 4) return bad_reply();
  for (const RedisValue& e : reply.elements) {
    if (e.type != RedisValue::Type::kInteger || e.integer < 0) return bad_reply();
  }
  const int64_t verdict = reply.elements[0].integer;
  if (verdict > 2) return bad_reply();
  RateDecision d;
  d.allowed = verdict == 1;
  d.too_many_concurrent = verdict == 2;
  d.limit = limit;
  d.remaining = reply.elements[1].integer;
  d.reset_ms = reply.elements[2].integer;
  d.retry_after_ms = d.too_many_concurrent ? kTooManyConcurrentRetryAfterMs : reply.elements[3].integer;
  d.window_s = window_s;
  return d;
}

}  // namespace chatd
