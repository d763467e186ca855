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
//   chat:{<user>}:hot     hash: message id -> packed record (hot_record.h),
//                         the user's latest indexed messages with embeddings
//   chat:{<user>}:hotidx  sorted set: message id by timestamp, to trim the
//                         hot set to its oldest-first bound
//   chat:{<user>}:turns   sorted set, every turn of the user in time order
//                         (TurnIndexMember), the history's index
//   chat:{<user>}:queued  hash: turn id -> its index-stream entry id, while
//                         the turn waits for the indexer
//   chat:{<user>}:erased  the tombstone of the user's latest erase
//   chat:{<user>}:recorded  sorted set: the user's recently recorded turn ids
//                         by time, kept for as long as a chat may still retry
//                         its record (the record script is idempotent by turn id)
//   chat:{<user>}:idem:<sha-256 of key>  an Idempotency-Key's claim or answer
//                         (redis_idempotency.h)
// RecordTurn updates all three in one Lua script, so a turn is either fully
// recorded (both halves, queued for Chroma, user marked active) or not at all,
// and concurrent turns of one user never leave half a turn in the list.
#pragma once

#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include "hot_record.h"
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
// The hot set: written by the indexer once a message is in the long-term
// store, read by the request path with the recent list in one round trip.
inline std::string HotKey(std::string_view user_id) { return UserKey(user_id, "hot"); }
inline std::string HotIndexKey(std::string_view user_id) { return UserKey(user_id, "hotidx"); }
// Written by the record script with the turn: a retry of the script that
// finds the turn there records nothing. One key per user, so the cleanup
// removes it with the user's other keys.
inline std::string RecordedTurnsKey(std::string_view user_id) { return UserKey(user_id, "recorded"); }
// Every turn of the user, oldest first: a sorted set whose scores are all 0
// and whose members (TurnIndexMember) sort by time, so a page of the history
// is one ZRANGE BYLEX from a cursor, O(log n + page) whatever its size.
inline std::string TurnIndexKey(std::string_view user_id) { return UserKey(user_id, "turns"); }
// Turns recorded and not yet indexed: turn id -> stream entry id, so the
// history finds them without scanning the shared stream. The indexer removes
// a turn when it acknowledges it.
inline std::string QueuedTurnsKey(std::string_view user_id) { return UserKey(user_id, "queued"); }
// Left by an erase (DELETE /api/memory, chatd-cleanup forget): the id of a
// stream entry added and deleted at the erase, i.e. a point in the stream's
// own order. Chats read it when they start and the record script refuses a
// turn whose chat saw another value (it started before the erase); the
// indexer drops entries older than it. It expires after EraseTombstoneTtlMs.
inline std::string TombstoneKey(std::string_view user_id) { return UserKey(user_id, "erased"); }
// "<ts as 15 digits>:<turn id>": zero-padded, so members sort by time as
// strings, then by turn id.
std::string TurnIndexMember(int64_t ts_ms, std::string_view turn_id);
inline constexpr size_t kTurnIndexTsDigits = 15;
// The turn id of a TurnIndexMember; empty when the member is malformed.
inline std::string_view TurnOfIndexMember(std::string_view member) {
  return member.size() > kTurnIndexTsDigits + 1 ? member.substr(kTurnIndexTsDigits + 1) : std::string_view();
}
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
  int64_t deliveries = 1;             // how often the group has handed it out
};

// Entries of an XRANGE / XREADGROUP / XAUTOCLAIM entry list:
// [[id, [field, value, ...]], ...]. Entries deleted meanwhile (no fields) are
// skipped; their ids go to `deleted` when given.
std::vector<IndexEntry> ParseIndexEntries(const RedisValue& list, std::vector<std::string>* deleted = nullptr);

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
  Result<UserMemory> Read(std::string_view user_id) override;
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
  std::string turns_to_read_;

  // Fills out.older_ids from the newest turns of the index, when they are all
  // of the user's turns and hold at most older_by_id_max_ older messages.
  void ListOlder(const RedisValue& turns, UserMemory& out) const;
};

// The record script's reply as RecordTurn's status (memory.h). Exposed for tests.
Status RecordReplyStatus(const RedisValue& reply);

// Parses one entry of the recent list.
Result<Message> ParseRecentEntry(std::string_view json);

// The Lua that adds records to a hot set and trims it to its newest `bound`,
// shared by every script that fills one (the indexer's, restore's and
// migrate's), so the set has one definition. It expects the locals hot_key,
// hot_index_key, bound and first (the ARGV index of the first
// (message id, ts, packed record) triple) to be set.
extern const char kHotSetAddLua[];

// Appends `m` as the (message id, ts, packed record) triple that the scripts
// built on kHotSetAddLua take. `backing` owns the strings the views point
// into (a deque: appending never moves them).
void AppendHotSetArgs(const StoredMessage& m, std::deque<std::string>& backing, std::vector<std::string_view>& args);

// Adds the turns of `messages` (of one user) to the user's turn index. Used
// where records come back outside the record script (restore, migrate).
Status AddToTurnIndex(RedisClient& redis, std::string_view user_id, const std::vector<StoredMessage>& messages);

// Adds `messages` (of one user) to the user's hot set, keeping the newest
// `bound`. Used where records reach the long-term store outside the indexer
// (restore, migrate).
Status AddToHotSet(RedisClient& redis, std::string_view user_id, const std::vector<StoredMessage>& messages,
                   int bound);

}  // namespace chatd
