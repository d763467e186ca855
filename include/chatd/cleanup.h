// chatd-cleanup: archives and removes the memory of users inactive for longer
// than a threshold, restores an archived user, or forgets one completely.
//
// Cost: the activity index (one sorted set per shard, maintained by the
// record-turn script) is asked for users below the cut-off, a shard after the
// other, in batches; users who are active are never touched. Per archived user the steps are:
//   1. take the user's cleanup lock (the indexer leaves them alone meanwhile)
//      and wait until no indexer is still writing their turns;
//   2. index their turns still waiting in the stream, so the archive is whole;
//   3. export the Chroma collection and merge it into the archive file named
//      by the user's last activity (written durably);
//   4. delete the collection;
//   5. one script: if the user's activity is still the one we started from,
//      delete their Redis keys and activity entry; otherwise they came back
//      meanwhile and their live memory stays. Either way the stream entries we
//      archived are acknowledged and the lock is released.
// Every step is idempotent, so a run killed anywhere and run again finishes
// the job without losing or duplicating a record; users a killed run left
// locked are kept in chatd:cleanup:inprogress, and the next run releases
// those who came back meanwhile (docs/cleanup.md).
//
// Fencing. The user's lock holds "<purpose>:<token>", a token of this process:
// taken only when free (or left by a dead run), renewed every third of its TTL
// while the user is processed, released by compare-and-delete. Before every
// Chroma write or delete and every archive write the lock is checked and
// renewed, and the final Redis scripts check it atomically: a process that
// lost its lock (paused past the TTL, and someone else took it) aborts that
// user without writing or deleting anything more. A run or a migration also
// holds the lease chatd:cleanup:lease (token, TTL, renewed): a second one is
// refused while it lives. Forget and restore take only the user's lock, and
// wait for it when a run holds it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "chatd/embeddings.h"
#include "chatd/redis.h"
#include "chatd/redis_schema.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

// The long-term store's adapter (src/chroma.h): held by reference here.
class ChromaStore;

struct CleanupOptions {
  int64_t inactive_ms = 24 * 3600 * 1000;
  std::string archive_dir;
  int batch = 100;
  int64_t lock_ttl_ms = 10 * 60 * 1000;  // the user's lock and the run's lease, both renewed every third of it
  int64_t now_ms = 0;  // 0: Redis TIME
  bool dry_run = false;
  int hot_messages = 64;  // the hot-set bound (CHATD_RECALL_HOT_MESSAGES), refilled by restore and migrate
  // How long an erase's tombstone lives: longer than any chat (EraseTombstoneTtlMs).
  int64_t tombstone_ttl_ms = 60 * 1000;
  // Test-only fault injection: "after_lock", "after_export",
  // "after_delete_collection", "migrate_after_lock", "migrate_after_upsert" or
  // "migrate_after_delete" ends the process there with status 137, as a kill
  // -9 would, so tests can prove a rerun completes the job.
  std::string crash_at;
};

struct MigrateSummary {
  int64_t users = 0;    // moved from a per-user collection to their shard
  int64_t records = 0;
  int64_t failed = 0;
  int64_t turn_indexes = 0;  // users whose turn index was filled from their records
};

struct CleanupSummary {
  int64_t scanned = 0;   // inactive users looked at
  int64_t archived = 0;  // archived and removed
  int64_t returned = 0;  // archived, but came back meanwhile: live memory kept
  int64_t failed = 0;
  int64_t skipped = 0;   // held by a forget or a restore meanwhile: left for the next run
  int64_t records = 0;   // records written to archives
  double seconds = 0;
};

// The reason of the Status Run() and Migrate() return when another run or
// migration holds the lease (chatd-cleanup exits with its own status then).
inline constexpr std::string_view kCleanupRunningReason = "cleanup_running";

class Cleanup {
 public:
  Cleanup(RedisClient& redis, ChromaStore& chroma, Embedder& embedder, CleanupOptions options);
  ~Cleanup();
  Cleanup(const Cleanup&) = delete;
  Cleanup& operator=(const Cleanup&) = delete;

  // Archives every inactive user; one failing user does not stop the others.
  // Prints a JSON progress line per batch on stderr.
  Result<CleanupSummary> Run();
  // Brings an archived user's long-term memory back into Chroma, exactly (same
  // ids, documents, metadata, embeddings), then removes the archive files.
  // Returns the number of records restored.
  Result<int64_t> Restore(const UserId& user_id);
  // The erase engine of `chatd-cleanup forget` and DELETE /api/memory:
  // erases everything of a user under their lock (recent messages, turn index,
  // hot set, queued turns and dead letters, Chroma records by id, archives,
  // activity entry) and leaves the erase tombstone (TombstoneKey) that fences
  // the user's chats in flight. Returns the number of distinct messages
  // erased; a second call erases nothing and returns 0. With
  // `keep_rate_limits` the user's rate-limit counters stay (the API's erase:
  // they hold no memory and expire by themselves, and erasing them would
  // reset the user's quota).
  Result<int64_t> Forget(const UserId& user_id, bool keep_rate_limits = false);
  // Moves every user still in the old layout (one Chroma collection per user)
  // to their shard: under the user's lock, export, upsert (same ids, so a
  // rerun after a kill anywhere rewrites the same records), check the count,
  // refill the hot set, then delete the old collection. Archives need no
  // migration: they hold records, not a layout. Then fills every tracked
  // user's turn index (the history's) from their records in Chroma.
  Result<MigrateSummary> Migrate();
  // Moves a deployment's Redis keys from the layout before the shards to the
  // sharded one (MigrateKeysToShards), under the lease, so no run or other
  // migration works meanwhile. Resumable and idempotent.
  Result<KeyMigrationSummary> MigrateKeys();

 private:
  enum class Outcome { kArchived, kReturned };
  Result<Outcome> ArchiveUser(const UserId& user, int64_t last_activity, const std::vector<IndexEntry>& queued,
                              int64_t& records);
  // Archives the inactive users of one shard's activity index (Run's batches).
  Status RunShard(int shard, int64_t cutoff_ms, int& batch_no, CleanupSummary& sum);
  Result<int64_t> EraseLocked(const UserId& user, bool keep_rate_limits);  // Forget's steps under the lock
  Result<int64_t> MigrateUser(const UserId& user);     // under the user's lock
  Status IndexTurns(MigrateSummary& sum);  // fills the turn index of users recorded before it
  Status IndexTurnsOfShard(int shard, MigrateSummary& sum);
  Result<int64_t> MoveLegacyUser(const UserId& user);  // the steps the lock covers
  Result<int64_t> NowMs();
  // Turns of these users still in the index stream (one pass over the stream).
  Result<std::map<UserId, std::vector<IndexEntry>>> QueuedTurns(const std::vector<UserId>& users);
  void CrashIf(std::string_view point) const;
  // Takes the user's lock for `purpose`, marks them in progress, and waits
  // until no indexer is still writing their turns. `wait`: while another
  // process holds the lock, wait for it (up to the lock TTL) instead of
  // failing with "user_locked". The lock is renewed until ForgetLock().
  Status TakeLock(const UserId& user, std::string_view purpose, bool wait = false);
  // Checks that the user's lock is still ours, and renews it: called before
  // every write and delete. "lock_lost" when it is not.
  Status Fence(const UserId& user);
  // Releases the user's lock if it is still ours (compare-and-delete).
  Status ReleaseLock(const UserId& user);
  void ReleaseLockOrWarn(const UserId& user);
  void ForgetLock();  // stop renewing the user's lock (released or left to its TTL)
  std::string LockValue(std::string_view purpose) const;
  // The run's lease: kCleanupRunningReason when another process holds it.
  Status TakeLease(std::string_view command);
  void ReleaseLease();
  void StartKeeper();
  void Keep();  // the keeper thread: renews what we hold every third of the TTL
  Status SettleInProgress(int64_t cutoff_ms);

  RedisClient& redis_;
  ChromaStore& chroma_;
  Embedder& embedder_;
  CleanupOptions options_;
  std::string token_;  // this process's owner token

  // Shared with the keeper thread.
  std::mutex keep_mu_;
  std::condition_variable keep_cv_;
  bool keep_stop_ = false;               // guarded by keep_mu_
  std::optional<std::string> lease_;     // our lease value; guarded by keep_mu_
  std::optional<UserId> locked_user_;    // whose lock is renewed; guarded by keep_mu_
  std::string locked_value_;             // and its value; guarded by keep_mu_
  std::atomic<bool> lease_lost_{false};
  std::thread keeper_;
};

}  // namespace chatd
