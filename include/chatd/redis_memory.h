// Short-term memory in Redis, and the durable record of every turn.
//
// Layout (docs/memory.md):
//   chat:{<user>}:recent  list of the last N messages, JSON {role,content,ts,id}
//   chatd:index           stream of recorded turns waiting for the long-term
//                         indexer (consumer group "indexers")
//   chatd:activity        sorted set: user -> last activity (ms, Redis time)
//   chat:{<user>}:lock    set by chatd-cleanup while it archives or forgets
//                         the user; the indexer leaves the user's turns
//                         pending meanwhile
//   chat:{<user>}:indexing  indexers writing the user's turns right now
//   chatd:cleanup:inprogress  users a cleanup has locked and not finished
// RecordTurn updates all three in one Lua script, so a turn is either fully
// recorded (both halves, queued for Chroma, user marked active) or not at all,
// and concurrent turns of one user never leave half a turn in the list.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "chatd/memory.h"
#include "chatd/redis.h"
#include "chatd/user_id.h"

namespace chatd {

inline constexpr std::string_view kIndexStreamKey = "chatd:index";
inline constexpr std::string_view kIndexGroup = "indexers";
inline constexpr std::string_view kActivityKey = "chatd:activity";
inline constexpr std::string_view kDeadLetterKey = "chatd:index:dead";

inline std::string RecentKey(std::string_view user_id) { return UserKey(user_id, "recent"); }
inline std::string CleanupLockKey(std::string_view user_id) { return UserKey(user_id, "lock"); }
// A counter of indexers writing this user's turns to Chroma right now (with a
// TTL, in case one dies mid-write): the cleanup waits for it to clear after
// taking the lock, so no write can land after its export or delete.
inline std::string IndexingKey(std::string_view user_id) { return UserKey(user_id, "indexing"); }
// Users whose cleanup started and has not finished (a run killed midway):
// every run settles them first.
inline constexpr std::string_view kCleanupInProgressKey = "chatd:cleanup:inprogress";

// One recorded turn as it waits in the index stream.
struct IndexEntry {
  std::string stream_id;
  std::string user;
  std::string turn;
  int64_t ts = 0;
  std::string user_text;
  std::string assistant_text;
  std::vector<float> user_embedding;  // empty when the request path could not embed
};

// Entries of an XRANGE / XREADGROUP / XAUTOCLAIM entry list:
// [[id, [field, value, ...]], ...]. Entries deleted meanwhile (no fields) are
// skipped; their ids go to `deleted` when given.
std::vector<IndexEntry> ParseIndexEntries(const RedisValue& list, std::vector<std::string>* deleted = nullptr);

class RedisShortTermStore : public ShortTermStore {
 public:
  RedisShortTermStore(RedisClient& redis, int recent_messages);

  Result<std::vector<Message>> Recent(std::string_view user_id) override;
  Status RecordTurn(const Turn& turn) override;

 private:
  RedisClient& redis_;
  int recent_messages_;
};

// Parses one entry of the recent list.
Result<Message> ParseRecentEntry(std::string_view json);

// Float vectors travel through Redis as little-endian float32 bytes.
std::string PackEmbedding(const std::vector<float>& v);
bool UnpackEmbedding(std::string_view bytes, std::vector<float>& out);

}  // namespace chatd
