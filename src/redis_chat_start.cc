#include "redis_chat_start.h"

#include <utility>
#include <vector>

namespace chatd {

RedisChatStart::RedisChatStart(RedisClient& redis, RedisRateLimiter& limiter, RejectionCache* rejections,
                               RedisShortTermStore& store)
    : redis_(redis), limiter_(limiter), rejections_(rejections), store_(store) {}

ChatStart RedisChatStart::Start(const UserId& user_id) {
  ChatStart start;
  if (rejections_ != nullptr) {
    if (std::optional<RateDecision> known = rejections_->Remembered(user_id)) {
      start.decision = std::move(*known);
      return start;
    }
  }
  RedisRateLimiter::Call call = limiter_.MakeCall(user_id);
  const RedisShortTermStore::ReadKeys keys = store_.KeysToRead(user_id);
  auto replies = redis_.EvalThen(*call.script, {call.keys.begin(), call.keys.end()}, limiter_.Args(call),
                                 store_.ReadCommands(keys));
  if (!replies.ok()) {
    start.decision = replies.status();
    start.memory = replies.status();
    return start;
  }
  start.decision = limiter_.Decide(call, replies->front());
  if (rejections_ != nullptr) rejections_->Remember(user_id, start.decision);
  replies->erase(replies->begin());  // the rest are the reads'
  start.memory = store_.FromReplies(std::move(*replies));
  return start;
}

}  // namespace chatd
