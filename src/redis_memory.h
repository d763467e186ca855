// Short-term memory in Redis, and the durable record of every turn (the
// layout is the schema's: redis_schema.h). RecordTurn writes the turn to the
// recent list and the index stream, and marks the user active, in one script,
// so a turn is either fully recorded (both halves, queued for Chroma, user
// marked active) or not at all, and concurrent turns of one user never leave
// half a turn in the list.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "chatd/memory.h"
#include "chatd/redis.h"
#include "chatd/redis_schema.h"

namespace chatd {

class RedisShortTermStore : public ShortTermStore {
 public:
  // `hot_messages` is the bound of the hot set that the indexer keeps
  // (CHATD_RECALL_HOT_MESSAGES): a full hot set means older messages exist.
  // `recorded_window_ms`: how long a recorded turn stays listed, at least as
  // long as a chat may still be recording (then no retry can record twice).
  // `older_by_id_max` (CHATD_RECALL_BY_ID_MAX): up to how many older messages
  // Read lists by id (UserMemory::older_ids); 0 lists none.
  RedisShortTermStore(RedisClient& redis, int recent_messages, int hot_messages, int64_t recorded_window_ms,
                      int older_by_id_max = 0);

  // LRANGE of the recent list, HVALS of the hot set, the tombstone and the
  // newest turns of the turn index (to list the older messages), pipelined.
  Result<UserMemory> Read(const UserId& user_id) override;

  // Read in two halves, for a caller that sends the commands in a pipeline of
  // its own (RedisChatStart): Read is KeysToRead, ReadCommands, the round
  // trip, then FromReplies.
  struct ReadKeys {
    std::string recent, hot, tombstone, turns;
  };
  ReadKeys KeysToRead(const UserId& user_id) const;
  // Views of `keys`, which must outlive them.
  std::vector<std::vector<std::string_view>> ReadCommands(const ReadKeys& keys) const;
  Result<UserMemory> FromReplies(std::vector<RedisValue> replies) const;
  // One script call; after a transport error, one more (the script is
  // idempotent by turn id), whose answer tells whether the turn landed.
  Status RecordTurn(const Turn& turn) override;

 private:
  RedisClient& redis_;
  int recent_messages_;
  int hot_messages_;
  std::string recorded_window_ms_;
  int older_by_id_max_;
  // Turns read from the turn index: enough for the hot set and
  // older_by_id_max_ older messages, plus one to tell "all of them" from
  // "more exist".
  size_t turns_asked_;
  std::string last_turn_rank_;  // turns_asked_ - 1: ZREVRANGE's stop is inclusive

  // Fills out.older_ids from the newest turns of the index, when they are all
  // of the user's turns and hold at most older_by_id_max_ older messages.
  void ListOlder(const RedisValue& turns, UserMemory& out) const;
};

// Parses one entry of the recent list.
Result<Message> ParseRecentEntry(std::string_view json);

}  // namespace chatd
