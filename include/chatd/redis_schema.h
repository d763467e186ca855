// The Redis schema: every key chatd writes, the index stream's entries, and
// every script that touches more than one key. The adapters (short-term
// store, indexer, cleanup, user data, health, rate limiter, idempotency)
// call the functions here and never spell a key, so the layout, and the
// proof that each script stays within one Redis Cluster slot, live in one
// file (docs/memory.md describes the layout and its reasons).
//
// Every function that names a user's key or shard takes a UserId, which only
// parsing makes (user_id.h): an unchecked string cannot become a key, so no
// function here checks an id again. Ids read back from Redis (stream entries,
// the activity index, the in-progress set) are parsed by their reader first.
//
// Layout (docs/memory.md, "Key layout"). Every key that a script touches
// together with others carries the hash tag of one shard, {s<n>}, so every
// script stays within one Redis Cluster slot:
//   chatd:{s<n>}:index    stream of recorded turns of the shard's users,
//                         waiting for the long-term indexer (group "indexers")
//   chatd:{s<n>}:index:dead  turns the indexer gave up on
//   chatd:{s<n>}:activity  sorted set: user -> last activity (ms, Redis time)
//   chatd:{s<n>}:cleanup:inprogress  users a cleanup has locked and not finished
//   chatd:{s<n>}:u:<user>:<name>  the user's keys, n = ShardOf(user):
//     recent     list of the last N messages, JSON {role,content,ts,id}
//     lock       set by chatd-cleanup while it archives or forgets the user;
//                the indexer leaves the user's turns pending meanwhile
//     indexing   indexers writing the user's turns right now
//     hot        hash: message id -> packed record (hot_record.h), the user's
//                latest indexed messages with embeddings
//     hotidx     sorted set: message id by timestamp, to trim the hot set
//     turns      sorted set, every turn of the user in time order
//                (TurnIndexMember), the history's index
//     queued     hash: turn id -> its index-stream entry id, while the turn
//                waits for the indexer
//     erased     the tombstone of the user's latest erase
//     recorded   sorted set: recently recorded turn ids by time, kept for as
//                long as a chat may still retry its record
//     rl:fixed, rl:sliding, rl:data  rate-limit counters
//     inflight   the user's chats in flight (concurrency leases)
//     idem:<sha-256 of key>, idemkeys  Idempotency-Key claims and answers
//   chatd:cleanup:lease   the chatd-cleanup run or migration at work (only
//                         ever touched alone)
// Before the shards, per-user keys were chat:{<user>}:<name> and the stream,
// dead letters, activity and in-progress set were global (chatd:index, ...):
// MigrateKeys* below move such a deployment.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/memory.h"
#include "chatd/redis.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

// ---- Keys -------------------------------------------------------------------

// The number of shards of the stream, dead letters, activity and in-progress
// set. A constant, not a setting: every host and the cleanup must agree on it,
// and changing it moves every user's keys. 16 spreads the shards over the
// primaries of a cluster of up to 16; each shard is one slot.
inline constexpr int kRedisShards = 16;
// The user's shard: FNV-1a (32 bits) of the id's bytes, modulo kRedisShards.
// Stable across hosts, builds and restarts.
int ShardOf(const UserId& user_id);

inline constexpr std::string_view kIndexGroup = "indexers";
std::string IndexStreamKey(int shard);
std::string DeadLetterKey(int shard);
std::string ActivityKey(int shard);
// Users whose cleanup started and has not finished (a run killed midway):
// every run settles them first.
std::string CleanupInProgressKey(int shard);
// One chatd-cleanup run or migration at a time.
inline constexpr std::string_view kCleanupLeaseKey = "chatd:cleanup:lease";

std::string RecentKey(const UserId& user_id);
std::string CleanupLockKey(const UserId& user_id);
// A counter of indexers writing this user's turns to Chroma right now (with a
// TTL, in case one dies mid-write): the cleanup waits for it to clear after
// taking the lock, so no write can land after its export or delete.
std::string IndexingKey(const UserId& user_id);
// The hot set: written by the indexer once a message is in the long-term
// store, read by the request path with the recent list in one round trip.
std::string HotKey(const UserId& user_id);
std::string HotIndexKey(const UserId& user_id);
// Written by the record script with the turn: a retry of the script that
// finds the turn there records nothing.
std::string RecordedTurnsKey(const UserId& user_id);
// Every turn of the user, oldest first: a sorted set whose scores are all 0
// and whose members (TurnIndexMember) sort by time, so a page of the history
// is one ZRANGE BYLEX from a cursor, O(log n + page) whatever its size.
std::string TurnIndexKey(const UserId& user_id);
// Turns recorded and not yet indexed: turn id -> stream entry id, so the
// history finds them without scanning the shared stream. The indexer removes
// a turn when it acknowledges it.
std::string QueuedTurnsKey(const UserId& user_id);
// Left by an erase (DELETE /api/memory, chatd-cleanup forget): the id of a
// stream entry added and deleted at the erase, i.e. a point in the stream's
// own order. Chats read it when they start and the record script refuses a
// turn whose chat saw another value (it started before the erase); the
// indexer drops entries older than it. It expires after EraseTombstoneTtlMs.
std::string TombstoneKey(const UserId& user_id);

// The rate limiter's counters, one key per algorithm: the two keep different
// types, so switching CHATD_RATE_ALGORITHM on a live Redis never meets a
// WRONGTYPE; the user-data endpoints count apart from the chat.
enum class RateCounter { kChatFixed, kChatSliding, kData };
std::string RateKey(const UserId& user_id, RateCounter counter);
// The user's chats in flight: a sorted set of lease ids scored by their expiry
// (ms of Redis time), next to the rate key, so one script call both limits the
// rate and takes a lease, and the record script can give the lease back.
std::string InflightKey(const UserId& user_id);
// An Idempotency-Key's hash (fingerprint, claim token, answer): the key is
// hashed, so that any printable key (and its length) fits a key name.
// Fails only when the digest does.
Result<std::string> IdempotencyRedisKey(const UserId& user_id, std::string_view key);
// The user's list of those keys (kept by the claim script), for the erase.
std::string IdempotencyKeysKey(const UserId& user_id);
// Whether `key` is one of the user's idempotency hashes (an erase deletes
// only those, whatever the list says).
bool IsIdempotencyKeyOf(const UserId& user_id, std::string_view key);

// "<ts as 15 digits>:<turn id>": zero-padded, so members sort by time as
// strings, then by turn id.
std::string TurnIndexMember(int64_t ts_ms, std::string_view turn_id);
inline constexpr size_t kTurnIndexTsDigits = 15;
// The turn id of a TurnIndexMember; empty when the member is malformed.
inline std::string_view TurnOfIndexMember(std::string_view member) {
  return member.size() > kTurnIndexTsDigits + 1 ? member.substr(kTurnIndexTsDigits + 1) : std::string_view();
}

// ---- The index stream -------------------------------------------------------

// One recorded turn as it waits in the index stream.
struct IndexEntry {
  std::string stream_id;
  // The user field as stored. The record script writes only parsed ids, but
  // an entry is data read back, so whoever acts on it parses it first
  // (UserId::Parse): the indexer dead-letters an entry whose user is not an id.
  std::string user;
  std::string turn;
  int64_t ts = 0;
  std::string user_text;
  std::string assistant_text;
  std::vector<float> user_embedding;  // empty when the request path could not embed
  int64_t deliveries = 1;             // how often the group has handed it out
  // The shard whose stream it was read from, where the reader knows it (the
  // indexer): an entry whose user is no id can only be settled there.
  int shard = -1;
};

// Entries of an XRANGE / XREADGROUP / XAUTOCLAIM entry list:
// [[id, [field, value, ...]], ...]. Entries deleted meanwhile (no fields) are
// skipped; their ids go to `deleted` when given.
std::vector<IndexEntry> ParseIndexEntries(const RedisValue& list, std::vector<std::string>* deleted = nullptr);

// Turns of these users still in the index stream, by user (one pass over each
// of their shards' streams, a page at a time).
Result<std::map<UserId, std::vector<IndexEntry>>> ReadQueuedTurns(RedisClient& redis,
                                                                   const std::vector<UserId>& users);
// The dead letters of one user.
Result<std::vector<IndexEntry>> ReadDeadLetters(RedisClient& redis, const UserId& user_id);

// ---- The record script ------------------------------------------------------

// One call of the record script for `turn`: the recent list, the stream entry,
// the activity, the turn index, the queued turn, the lease release and the
// Idempotency-Key answer in one atomic step, refused by the erase fence, and
// idempotent by turn id (a retry after a lost reply records nothing twice).
class RecordTurnCall {
 public:
  static Result<RecordTurnCall> Make(const Turn& turn, int recent_messages, std::string_view recorded_window_ms);
  // `may_have_run` as RedisClient::Eval.
  Result<RedisValue> Run(RedisClient& redis, bool* may_have_run) const;

 private:
  RecordTurnCall() = default;
  std::vector<std::string> keys_;
  std::vector<std::string> args_;
};

// The record script's reply as RecordTurn's status (memory.h). Exposed for tests.
Status RecordReplyStatus(const RedisValue& reply);

// ---- Hot set and turn index -------------------------------------------------

// Appends `m` as the (message id, ts, packed record) triple that the scripts
// filling a hot set take. `backing` owns the strings the views point into (a
// deque: appending never moves them).
void AppendHotSetArgs(const StoredMessage& m, std::deque<std::string>& backing, std::vector<std::string_view>& args);

// Adds the turns of `messages` (of one user) to the user's turn index. Used
// where records come back outside the record script (restore, migrate).
Status AddToTurnIndex(RedisClient& redis, const UserId& user_id, const std::vector<StoredMessage>& messages);

// Adds `messages` (of one user) to the user's hot set, keeping the newest
// `bound`. Used where records reach the long-term store outside the indexer
// (restore, migrate).
Status AddToHotSet(RedisClient& redis, const UserId& user_id, const std::vector<StoredMessage>& messages,
                   int bound);

// ---- The indexer's side of the cleanup handshake ----------------------------
//
// Before writing a user's turns the indexer checks the user's cleanup lock and
// raises the user's "indexing" marker in one script; after the write it
// lowers the marker and acknowledges, again only if no lock appeared. The
// cleanup takes the lock and then waits for the marker to clear
// (IndexingInProgress), so no write can land after its export or its delete.

struct BeginIndexingRequest {
  UserId user;
  std::vector<std::pair<std::string, int64_t>> entries;  // (stream id, deliveries)
};
// One script call per user, in one round trip. Each reply: 0 when a cleanup
// holds the user (the entries stay pending, and this delivery does not count);
// 1 when every entry is to be written, with the marker raised; else
// {go (1/0), erased count, erased ids..., gone ids...}: entries older than the
// user's latest erase were acknowledged and deleted, entries no longer in the
// stream were settled by someone else after we read them (a cleanup that
// archived or forgot the user, or another indexer), and go is 0 (no marker)
// when nothing else is left.
Result<std::vector<RedisValue>> BeginIndexing(RedisClient& redis, std::string_view consumer, int64_t marker_ttl_ms,
                                              const std::vector<BeginIndexingRequest>& users);

struct FinishIndexingRequest {
  UserId user;
  bool keep_marker = false;                // a write of ours may still land: the marker waits for its TTL
  std::vector<std::string> stream_ids;     // settled: acknowledged and deleted
  std::vector<std::string> turns;          // their turn ids, no longer queued
  std::vector<const StoredMessage*> hot;   // written: they join the hot set
};
// One script call per user, in one round trip. Lowers the marker (unless
// keep_marker), and acknowledges and fills the hot set only while no cleanup
// holds the user. Each reply: the number acknowledged.
Result<std::vector<RedisValue>> FinishIndexing(RedisClient& redis, int hot_bound,
                                               const std::vector<FinishIndexingRequest>& users);

// Removes the shard group's consumers other than `consumer` idle longer than
// `idle_ms` with nothing pending. Returns how many went.
Result<RedisValue> RemoveGoneIndexConsumers(RedisClient& redis, int shard, std::string_view consumer,
                                            int64_t idle_ms);

// ---- The cleanup's locks ----------------------------------------------------

// Takes the user's lock with `value` ("<purpose>:<token>") when it is free or
// left by a run or migration that is gone (the lease is free, or `lease`, ours),
// and lists the user as in progress. Replies 1, or the holder's value. The
// lease is read first, apart: it is global, and the script may touch only the
// user's slot (docs/memory.md says why a lease taken in between is harmless).
Result<RedisValue> TakeCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value,
                                   int64_t ttl_ms, std::string_view lease);
// Renews the lock if it is still `value`: 1; else 0.
Result<RedisValue> RenewCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value,
                                    int64_t ttl_ms);
// Compare-and-delete of the lock; the user is no longer in progress.
Result<RedisValue> ReleaseCleanupLock(RedisClient& redis, const UserId& user_id, std::string_view value);
// Releases a lock of `purpose` whose owner is proved gone (we hold the lease).
Result<RedisValue> ReleaseAbandonedLock(RedisClient& redis, const UserId& user_id, std::string_view purpose);
// Whether an indexer is writing the user's turns right now.
Result<bool> IndexingInProgress(RedisClient& redis, const UserId& user_id);
// The users a killed run or migration left in progress.
Result<std::vector<std::string>> CleanupInProgressUsers(RedisClient& redis);
// A user left in progress by a killed run who is active again since `cutoff_ms`
// (or gone) gets their lock back: 1; one still inactive, or held by a forget
// or a restore, is left: 0.
Result<RedisValue> SettleInProgress(RedisClient& redis, const UserId& user_id, int64_t cutoff_ms);

// The lease: 1, or the live holder's value. `gone`: a holder proved dead.
Result<RedisValue> TakeCleanupLease(RedisClient& redis, std::string_view value, int64_t ttl_ms, std::string_view gone);
Result<RedisValue> RenewCleanupLease(RedisClient& redis, std::string_view value, int64_t ttl_ms);
Result<RedisValue> ReleaseCleanupLease(RedisClient& redis, std::string_view value);

// ---- Activity ---------------------------------------------------------------

// A page of the shard's users, with their last activity, inactive before
// `before_ms` (exclusive): [user, score, ...] as ZRANGE WITHSCORES answers.
Result<RedisValue> InactiveUsersPage(RedisClient& redis, int shard, int64_t before_ms, int64_t offset, int64_t count);
// A page of every tracked user of the shard.
Result<RedisValue> TrackedUsersPage(RedisClient& redis, int shard, int64_t offset, int64_t count);
// The user's last activity (nil when untracked).
Result<RedisValue> LastActivity(RedisClient& redis, const UserId& user_id);
// Tracks the user from `now_ms`, unless they are tracked already.
Result<RedisValue> TrackActivityIfAbsent(RedisClient& redis, const UserId& user_id, int64_t now_ms);

// ---- Archive and erase ------------------------------------------------------

// Under the lock `lock_value`: acknowledges `stream_ids` (the user's queued
// turns, now in the archive) and, unless the user came back (activity no
// longer `last_activity_ms`), deletes every key of the user. Replies 1 when
// removed, 0 when they came back, -1 (nothing touched) when the lock is lost.
Result<RedisValue> FinishArchive(RedisClient& redis, const UserId& user_id, int64_t last_activity_ms,
                                 std::string_view lock_value, const std::vector<std::string>& stream_ids);

// What Redis holds of the user's messages, for an erase to count.
struct UserFootprint {
  RedisValue recent;     // LRANGE of the recent list
  RedisValue turns;      // ZRANGE of the turn index
  RedisValue hot_ids;    // HKEYS of the hot set
  std::vector<std::string> idempotency_keys;  // the user's Idempotency-Key hashes
};
Result<UserFootprint> ReadUserFootprint(RedisClient& redis, const UserId& user_id);

// Under the lock `lock_value`: deletes every key of the user (the rate-limit
// counters only without `keep_rate_limits`), acknowledges and deletes their
// queued stream entries and dead letters, and leaves the erase tombstone for
// `tombstone_ttl_ms`. Replies the tombstone, or -1 (nothing touched) when the
// lock is lost.
Result<RedisValue> ForgetUser(RedisClient& redis, const UserId& user_id, std::string_view lock_value,
                              int64_t tombstone_ttl_ms, bool keep_rate_limits,
                              const std::vector<std::string>& stream_ids, const std::vector<std::string>& dead_ids,
                              const std::vector<std::string>& idempotency_keys);
// Drops the user's stream entries older than `tombstone`: turns that chats
// fenced by the erase recorded meanwhile. Replies their ids.
Result<RedisValue> DropBeforeTombstone(RedisClient& redis, const UserId& user_id, std::string_view tombstone,
                                       const std::vector<std::string>& stream_ids);

// ---- Moving a deployment from the layout before the shards -----------------

struct KeyMigrationSummary {
  int64_t user_keys = 0;       // per-user keys moved under their shard's tag
  int64_t stream_entries = 0;  // queued turns moved to their shard's stream
  int64_t dead_letters = 0;
  int64_t activity = 0;        // users moved to their shard's activity index
  int64_t in_progress = 0;
};
// Moves every key of the old layout (chat:{<user>}:<name>, chatd:index,
// chatd:index:dead, chatd:activity, chatd:cleanup:inprogress) to the sharded
// one. Each step moves one key or one entry and deletes its old copy in one
// script, so a run killed anywhere is resumed by the next, and a second run
// finds nothing to move. Queued turns keep their stream ids when their shard's
// stream allows it (so the queued-turn hashes and erase tombstones stay true);
// the shards' groups are then rewound to 0 so that no moved turn is skipped
// (indexing twice is harmless: ids are deterministic). The steps touch old and
// new names together, across slots: run it on the single Redis, before a move
// to a cluster. `dry_run` counts and moves nothing.
Result<KeyMigrationSummary> MigrateKeysToShards(RedisClient& redis, bool dry_run);

}  // namespace chatd
