#include "chatd/cleanup.h"

#include <limits.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "archive.h"
#include "chroma.h"
#include "chatd/clock.h"
#include "decimal.h"
#include "chatd/indexer.h"
#include "chatd/log.h"
#include "random_id.h"
#include "redis_memory.h"
#include "chatd/redis_schema.h"

namespace chatd {

namespace {

constexpr int kCrashStatus = 137;  // what a shell reports after kill -9
// Seconds since the epoch beyond which milliseconds would overflow int64.
constexpr int64_t kMaxTimeSeconds = INT64_MAX / 1000 - 1;
// How often the cleanup looks whether an indexer finished writing a user.
constexpr std::chrono::milliseconds kMarkerPoll{20};
// The lock purpose of a migration, so only a migration releases it early.
constexpr char kMigratePurpose[] = "migrate";

// Lock values are "<purpose>:<token>". Only a run ("cleanup") or a migration
// holds the lease, so only their locks can be proved abandoned: by a lease
// that is free, or ours.
constexpr char kRunPurpose[] = "cleanup";
// How often a forget or a restore looks whether a run let go of the user.
constexpr std::chrono::milliseconds kLockPoll{100};

// Runs `f` when the scope ends, whichever way: for what must follow every
// return (stop renewing a lock, release the lease).
template <typename F>
struct OnExit {
  F f;
  ~OnExit() { f(); }
};
template <typename F>
OnExit(F) -> OnExit<F>;

// This host's name, for the lease: a holder on the same host can be proved
// gone.
std::string HostName() {
  char host[HOST_NAME_MAX + 1] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "unknown-host";
  return host;
}

// When the process started (clock ticks since boot, /proc/<pid>/stat field
// 22), so that a pid reused by another process is not taken for the holder.
// Empty when no such process runs.
std::string ProcessStart(const std::string& pid) {
  std::ifstream in("/proc/" + pid + "/stat");
  std::string stat;
  if (!in || !std::getline(in, stat)) return "";
  const size_t comm_end = stat.rfind(')');
  if (comm_end == std::string::npos) return "";
  std::istringstream fields(stat.substr(comm_end + 1));
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i) {
    if (i == 22) return field;
  }
  return "";
}

Status RedisErrorIf(const Result<RedisValue>& r, std::string_view what) {
  if (!r.ok()) return r.status();
  if (r->is_error()) return RedisReplyError(r->str, what);
  return Status::Ok();
}

// A user id read back from a shard's activity index or in-progress set. Only
// our scripts write those, always with a parsed id, so a malformed one was
// written by something else: reported (the cleanup's user failure, reason
// invalid_user_id) and left where it is, never made into a key.
std::optional<UserId> StoredUser(std::string_view text, std::string_view where) {
  std::optional<UserId> user = UserId::Parse(text);
  if (!user) {
    LogError("cleanup_user_failed")
        .Str("user", text)
        .Str("reason", "invalid_user_id")
        .Str("detail", std::string(where) + " holds a malformed user id: left alone")
        .Emit();
  }
  return user;
}

Status LockLost() {
  return Unavailable("lock_lost",
                     "the user's cleanup lock expired and another process holds it now: nothing more was written or "
                     "deleted for this user");
}

}  // namespace

Cleanup::Cleanup(RedisClient& redis, ChromaStore& chroma, Embedder& embedder, CleanupOptions options)
    : redis_(redis), chroma_(chroma), embedder_(embedder), options_(std::move(options)), token_(RandomHexId()) {}

Cleanup::~Cleanup() {
  {
    std::lock_guard<std::mutex> lock(keep_mu_);
    keep_stop_ = true;
  }
  keep_cv_.notify_all();
  if (keeper_.joinable()) keeper_.join();
}

std::string Cleanup::LockValue(std::string_view purpose) const { return std::string(purpose) + ":" + token_; }

void Cleanup::StartKeeper() {
  if (!keeper_.joinable()) keeper_ = std::thread([this] { Keep(); });
}

void Cleanup::Keep() {
  const auto every = std::chrono::milliseconds(std::max<int64_t>(options_.lock_ttl_ms / 3, 1));
  std::unique_lock<std::mutex> lock(keep_mu_);
  while (!keep_cv_.wait_for(lock, every, [this] { return keep_stop_; })) {
    const std::optional<std::string> lease = lease_;
    const std::optional<UserId> user = locked_user_;
    const std::string value = locked_value_;
    lock.unlock();
    // A failed renewal (Redis away) is tried again next time; only an answer
    // that the key is someone else's now counts as lost.
    if (lease) {
      auto r = RenewCleanupLease(redis_, *lease, options_.lock_ttl_ms);
      if (r.ok() && !r->is_error() && r->integer == 0) {
        lease_lost_ = true;
        LogError("cleanup_lease_lost").Str("detail", "another chatd-cleanup holds the lease now").Emit();
      }
    }
    if (user) {
      auto r = RenewCleanupLock(redis_, *user, value, options_.lock_ttl_ms);
      lock.lock();
      const bool still_ours = locked_user_ == user;
      lock.unlock();
      if (r.ok() && !r->is_error() && r->integer == 0 && still_ours) {
        LogError("cleanup_lock_lost").Str("user", *user).Emit();  // the next Fence stops the user's processing
      }
    }
    lock.lock();
  }
}

Status Cleanup::TakeLease(std::string_view command) {
  const std::string host = HostName(), pid = std::to_string(getpid());
  const std::string value = token_ + " " + host + " " + pid + " " + ProcessStart(pid) + " " + std::string(command);
  std::string gone;  // a holder proved dead, whose lease we may take over
  for (int attempt = 0; attempt < 2; ++attempt) {
    Result<RedisValue> r = TakeCleanupLease(redis_, value, options_.lock_ttl_ms, gone);
    if (!r.ok()) return r.status();
    if (r->type == RedisValue::Type::kInteger && r->integer == 1) {
      if (!gone.empty()) LogWarn("cleanup_lease_taken_over").Str("from", gone).Emit();
      {
        std::lock_guard<std::mutex> lock(keep_mu_);
        lease_ = value;
      }
      StartKeeper();
      return Status::Ok();
    }
    // "<token> <host> <pid> <start> <command>" of the holder. One killed on
    // this host (kill -9, a crash) is gone for sure: its run may be resumed
    // at once. Elsewhere only its TTL can tell.
    std::istringstream holder(r->str);
    std::string their_token, their_host, their_pid, their_start, their_command;
    holder >> their_token >> their_host >> their_pid >> their_start >> their_command;
    const bool dead_here = their_host == host && !their_pid.empty() && ProcessStart(their_pid) != their_start;
    if (!dead_here || attempt > 0) {
      return Unavailable(std::string(kCleanupRunningReason),
                         "another chatd-cleanup " + their_command + " (pid " + their_pid + " on " + their_host +
                             ") is running; this one stops. Its lease " + std::string(kCleanupLeaseKey) +
                             " ends with it, or CHATD_CLEANUP_LOCK_TTL_MS after it stopped renewing it");
    }
    gone = r->str;
  }
  return Status::Ok();  // not reached: the second attempt returns
}

void Cleanup::ReleaseLease() {
  std::optional<std::string> lease;
  {
    std::lock_guard<std::mutex> lock(keep_mu_);
    lease.swap(lease_);
  }
  if (!lease) return;
  // A failed release costs the next run the lease's TTL at most.
  if (!ReleaseCleanupLease(redis_, *lease).ok()) LogWarn("cleanup_lease_not_released").Emit();
}

void Cleanup::CrashIf(std::string_view point) const {
  if (options_.crash_at == point) _exit(kCrashStatus);
}

Result<int64_t> Cleanup::NowMs() {
  if (options_.now_ms > 0) return options_.now_ms;
  Result<RedisValue> t = redis_.Command({"TIME"});
  if (Status s = RedisErrorIf(t, "TIME"); !s.ok()) return s;
  if (t->elements.size() != 2) return Unavailable("redis_error", "TIME answered oddly");
  std::optional<int64_t> secs = ParseDecimal(t->elements[0].str);
  std::optional<int64_t> micros = ParseDecimal(t->elements[1].str);
  if (!secs || !micros || *secs > kMaxTimeSeconds) return Unavailable("redis_error", "TIME answered oddly");
  return *secs * 1000 + *micros / 1000;
}

Result<std::map<UserId, std::vector<IndexEntry>>> Cleanup::QueuedTurns(const std::vector<UserId>& users) {
  return ReadQueuedTurns(redis_, users);
}

Result<Cleanup::Outcome> Cleanup::ArchiveUser(const UserId& user, int64_t last_activity,
                                              const std::vector<IndexEntry>& queued, int64_t& records) {
  // 1. The lock pauses the indexer for this user. A lock left by a run that was
  // killed is simply taken over: every step below is idempotent.
  if (Status s = TakeLock(user, kRunPurpose); !s.ok()) return s;
  // Whatever happens below, this user's lock is no longer renewed after it:
  // released by the final script, or left to its TTL (and the next run).
  OnExit stop_renewing{[this] { ForgetLock(); }};
  CrashIf("after_lock");

  // 2. Turns still queued for indexing go into Chroma first, so the export is whole.
  if (!queued.empty()) {
    auto messages = BuildStoredMessages(queued, embedder_);
    if (!messages.ok()) return messages.status();
    if (Status s = Fence(user); !s.ok()) return s;
    if (Status s = chroma_.Upsert(*messages); !s.ok()) return s;
  }

  // 3. Export and merge into the archive file of this activity time.
  std::string path = ArchivePath(options_.archive_dir, user, last_activity);
  auto exported = chroma_.ExportAll(user);
  if (!exported.ok()) return exported.status();
  Archive archive(user);
  archive.last_activity_ms = last_activity;
  archive.archived_at_ms = WallMs();
  if (access(path.c_str(), F_OK) == 0) {
    // A previous run got this far (and maybe deleted the collection): keep
    // what it wrote, add what is new.
    auto text = ReadFile(path);
    if (!text.ok()) return text.status();
    auto previous = ParseArchive(*text);
    if (!previous.ok()) return previous.status();
    archive.records = MergeById(std::move(previous->records), std::move(*exported));
  } else {
    archive.records = MergeById({}, std::move(*exported));
  }
  if (!archive.records.empty()) {
    if (Status s = Fence(user); !s.ok()) return s;
    if (Status s = WriteFileDurably(path, SerializeArchive(archive)); !s.ok()) return s;
  }
  records += static_cast<int64_t>(archive.records.size());
  CrashIf("after_export");

  // 4. The user's records go (checked by count).
  if (Status s = Fence(user); !s.ok()) return s;
  if (auto deleted = chroma_.DeleteUser(user); !deleted.ok()) return deleted.status();
  CrashIf("after_delete_collection");

  // 5. Redis keys, unless the user came back meanwhile.
  std::vector<std::string> stream_ids;
  for (const IndexEntry& e : queued) stream_ids.push_back(e.stream_id);
  Result<RedisValue> done = FinishArchive(redis_, user, last_activity, LockValue(kRunPurpose), stream_ids);
  if (!done.ok()) return done.status();
  if (done->integer < 0) return LockLost();
  return done->integer == 1 ? Outcome::kArchived : Outcome::kReturned;
}

Result<CleanupSummary> Cleanup::Run() {
  auto started = SteadyClock::now();
  CleanupSummary sum;
  // One run at a time (a dry run changes nothing, and needs no lease).
  if (!options_.dry_run) {
    if (Status s = TakeLease("run"); !s.ok()) return s;
  }
  OnExit lease_end{[this] { ReleaseLease(); }};
  Result<int64_t> now = NowMs();
  if (!now.ok()) return now.status();
  int64_t cutoff_ms = *now - options_.inactive_ms;
  // Users a killed run left locked: release those who came back meanwhile.
  if (!options_.dry_run) {
    if (Status s = SettleInProgress(cutoff_ms); !s.ok()) return s;
  }

  // One shard's activity index after the other.
  int batch_no = 0;
  for (int shard = 0; shard < kRedisShards; ++shard) {
    if (Status s = RunShard(shard, cutoff_ms, batch_no, sum); !s.ok()) return s;
  }
  sum.seconds = std::chrono::duration<double>(SteadyClock::now() - started).count();
  return sum;
}

Status Cleanup::RunShard(int shard, int64_t cutoff_ms, int& batch_no, CleanupSummary& sum) {
  // Users that stay in the index below the cut-off (failed, or left alone in
  // a dry run) are skipped by offset; archived ones leave it, and those who
  // come back move above the cut-off.
  int64_t offset = 0;
  for (;;) {
    Result<RedisValue> page = InactiveUsersPage(redis_, shard, cutoff_ms, offset, options_.batch);
    if (!page.ok()) return page.status();
    if (page->elements.empty()) break;
    ++batch_no;

    std::vector<std::pair<UserId, int64_t>> users;
    int64_t batch_archived = 0, batch_failed = 0;
    for (size_t i = 0; i + 1 < page->elements.size(); i += 2) {
      // Scores are the milliseconds our own script wrote; anything else in
      // the index is a fault to report, not an exception to die of.
      std::optional<int64_t> score = ParseDecimal(page->elements[i + 1].str);
      if (!score) return Unavailable("redis_error", "the activity index holds a score that is not whole milliseconds");
      std::optional<UserId> user = StoredUser(page->elements[i].str, "the activity index");
      if (!user) {
        // It stays in the index below the cut-off: skipped by offset, like a failed user.
        ++sum.scanned;
        ++sum.failed;
        ++batch_failed;
        ++offset;
        continue;
      }
      users.emplace_back(std::move(*user), *score);
    }
    std::vector<UserId> names;
    for (const auto& [u, ts] : users) names.push_back(u);
    auto queued = QueuedTurns(names);
    if (!queued.ok()) return queued.status();

    for (const auto& [user, last_activity] : users) {
      if (lease_lost_) {
        return Unavailable("lease_lost", "another chatd-cleanup took this run's lease over: stopping here");
      }
      ++sum.scanned;
      if (options_.dry_run) {
        auto count = chroma_.Count(user);
        LogInfo("cleanup_would_archive")
            .Str("user", user)
            .Int("last_activity_ms", last_activity)
            .Int("records", count.ok() ? *count : -1)
            .Int("queued_turns", static_cast<int64_t>((*queued)[user].size()))
            .Emit();
        ++offset;
        continue;
      }
      int64_t records = 0;
      Result<Outcome> outcome = ArchiveUser(user, last_activity, (*queued)[user], records);
      if (!outcome.ok() && outcome.status().reason() == "user_locked") {
        // A forget or a restore has the user: nothing to archive now.
        ++sum.skipped;
        ++offset;
        LogInfo("cleanup_user_skipped").Str("user", user).Str("detail", outcome.status().message()).Emit();
        continue;
      }
      if (!outcome.ok()) {
        ++sum.failed;
        ++batch_failed;
        ++offset;
        LogError("cleanup_user_failed")
            .Str("user", user)
            .Str("reason", outcome.status().reason())
            .Str("detail", outcome.status().message())
            .Emit();
        continue;
      }
      sum.records += records;
      if (*outcome == Outcome::kArchived) {
        ++sum.archived;
        ++batch_archived;
      } else {
        ++sum.returned;
      }
    }
    LogInfo("cleanup_batch")
        .Int("batch", batch_no)
        .Int("users", static_cast<int64_t>(users.size()))
        .Int("archived", batch_archived)
        .Int("failed", batch_failed)
        .Emit();
  }
  return Status::Ok();
}

Result<int64_t> Cleanup::Restore(const UserId& user) {
  // Under the user's lock, so a forget cannot erase the archives between our
  // reading them and bringing them back (nor a run archive the user anew).
  if (!options_.dry_run) {
    if (Status s = TakeLock(user, "restore", /*wait=*/true); !s.ok()) return s;
  }
  OnExit release{[this, &user] {
    if (!options_.dry_run) ReleaseLockOrWarn(user);
  }};
  auto paths = ListArchives(options_.archive_dir, user);
  if (!paths.ok()) return paths.status();
  std::vector<StoredMessage> records;
  for (const std::string& p : *paths) {
    auto text = ReadFile(p);
    if (!text.ok()) return text.status();
    auto archive = ParseArchive(*text);
    if (!archive.ok()) return archive.status();
    if (archive->user_id != user) return Internal("bad_archive", "archive " + p + " belongs to another user");
    records = MergeById(std::move(records), std::move(archive->records));
  }
  if (options_.dry_run) {
    LogInfo("restore_would_upsert").Str("user", user).Int("records", static_cast<int64_t>(records.size())).Emit();
    return static_cast<int64_t>(records.size());
  }
  for (StoredMessage& m : records) m.user_id = user.str();
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = chroma_.Upsert(records); !s.ok()) return s;  // chunked by the store
  // Recall reads the newest records from the hot set, as if just indexed.
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = AddToHotSet(redis_, user, records, options_.hot_messages); !s.ok()) return s;
  // The history reads the user's turns through their index.
  if (Status s = AddToTurnIndex(redis_, user, records); !s.ok()) return s;
  // Tracked again, so the restored memory is archived again when unused.
  Result<int64_t> now = NowMs();
  if (!now.ok()) return now.status();
  if (auto tracked = TrackActivityIfAbsent(redis_, user, *now); !tracked.ok()) return tracked.status();
  // Only now that Chroma holds every record may the archives go.
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = RemoveArchives(options_.archive_dir, user, *paths); !s.ok()) return s;
  return static_cast<int64_t>(records.size());
}

Result<int64_t> Cleanup::Forget(const UserId& user, bool keep_rate_limits) {
  if (options_.dry_run) {
    auto paths = ListArchives(options_.archive_dir, user);
    if (!paths.ok()) return paths.status();
    auto queued = QueuedTurns({user});
    if (!queued.ok()) return queued.status();
    auto count = chroma_.Count(user);
    LogInfo("forget_would_erase")
        .Str("user", user)
        .Int("records", count.ok() ? *count : -1)
        .Int("queued_turns", static_cast<int64_t>((*queued)[user].size()))
        .Int("archives", static_cast<int64_t>(paths->size()))
        .Emit();
    return 0;
  }

  // Lock first, so no indexer writes to Chroma while we erase it, and no run
  // writes an archive after we listed them: a run that holds the user is
  // waited for. The final script releases the lock; a failure releases it too.
  if (Status s = TakeLock(user, "forget", /*wait=*/true); !s.ok()) return s;
  Result<int64_t> erased = EraseLocked(user, keep_rate_limits);
  if (!erased.ok() && erased.status().reason() != "lock_lost") ReleaseLockOrWarn(user);
  ForgetLock();
  return erased;
}

Result<int64_t> Cleanup::EraseLocked(const UserId& user, bool keep_rate_limits) {
  // Every message id found anywhere, so a message kept in several places
  // (recent list, stream, hot set, Chroma, an archive) counts once.
  std::set<std::string> erased;
  auto add_turn = [&erased](const std::string& turn) {
    erased.insert(MessageId(turn, Role::kUser));
    erased.insert(MessageId(turn, Role::kAssistant));
  };
  auto paths = ListArchives(options_.archive_dir, user);
  if (!paths.ok()) return paths.status();
  for (const std::string& p : *paths) {
    auto text = ReadFile(p);
    if (!text.ok()) return text.status();
    auto archive = ParseArchive(*text);
    if (!archive.ok()) return archive.status();
    for (const StoredMessage& m : archive->records) erased.insert(m.id);
  }
  auto queued = QueuedTurns({user});
  if (!queued.ok()) return queued.status();
  for (const IndexEntry& e : (*queued)[user]) add_turn(e.turn);

  // Dead letters of this user (rare; the stream is normally empty).
  std::vector<std::string> dead_ids;
  auto dead = ReadDeadLetters(redis_, user);
  if (!dead.ok()) return dead.status();
  for (const IndexEntry& e : *dead) {
    dead_ids.push_back(e.stream_id);
    add_turn(e.turn);
  }

  // What Redis holds of the user's messages: the recent list, the turn index
  // and the hot set; and their Idempotency-Key answers, which hold reply texts.
  auto held = ReadUserFootprint(redis_, user);
  if (!held.ok()) return held.status();
  for (const RedisValue& e : held->recent.elements) {
    auto m = ParseRecentEntry(e.str);
    if (m.ok()) erased.insert(m->id);
  }
  for (const RedisValue& e : held->turns.elements) {
    if (std::string_view turn = TurnOfIndexMember(e.str); !turn.empty()) add_turn(std::string(turn));
  }
  for (const RedisValue& e : held->hot_ids.elements) erased.insert(e.str);

  if (Status s = Fence(user); !s.ok()) return s;
  std::vector<std::string> chroma_ids;
  if (auto deleted = chroma_.DeleteUser(user, &chroma_ids); !deleted.ok()) return deleted.status();
  erased.insert(chroma_ids.begin(), chroma_ids.end());
  // A deployment not yet migrated may still hold the old per-user collection.
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = chroma_.DeleteLegacy(user); !s.ok()) return s;
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = RemoveArchives(options_.archive_dir, user, *paths); !s.ok()) return s;

  std::vector<std::string> stream_ids;
  for (const IndexEntry& e : (*queued)[user]) stream_ids.push_back(e.stream_id);
  Result<RedisValue> mark = ForgetUser(redis_, user, LockValue("forget"), options_.tombstone_ttl_ms, keep_rate_limits,
                                       stream_ids, dead_ids, held->idempotency_keys);
  if (!mark.ok()) return mark.status();
  if (mark->type == RedisValue::Type::kInteger && mark->integer < 0) return LockLost();

  // Chats fenced by the erase may have recorded a turn between the first look
  // at the stream and the tombstone: those entries go now, rather than wait
  // for an indexer to drop them.
  auto late = QueuedTurns({user});
  if (!late.ok()) return late.status();
  if (!(*late)[user].empty()) {
    std::vector<std::string> late_ids;
    for (const IndexEntry& e : (*late)[user]) late_ids.push_back(e.stream_id);
    Result<RedisValue> dropped = DropBeforeTombstone(redis_, user, mark->str, late_ids);
    if (!dropped.ok()) return dropped.status();
    std::set<std::string> gone;
    for (const RedisValue& id : dropped->elements) gone.insert(id.str);
    for (const IndexEntry& e : (*late)[user]) {
      if (gone.count(e.stream_id) != 0) add_turn(e.turn);
    }
  }
  return static_cast<int64_t>(erased.size());
}

Result<MigrateSummary> Cleanup::Migrate() {
  MigrateSummary sum;
  // One run or migration at a time.
  if (!options_.dry_run) {
    if (Status s = TakeLease("migrate"); !s.ok()) return s;
  }
  OnExit lease_end{[this] { ReleaseLease(); }};
  // A migration killed after deleting a user's old collection left their
  // lock: the user is done (or, with the collection still there, is listed
  // and migrated again below). We hold the lease: its owner is gone.
  if (!options_.dry_run) {
    auto left = CleanupInProgressUsers(redis_);
    if (!left.ok()) return left.status();
    for (const std::string& u : *left) {
      std::optional<UserId> user = StoredUser(u, "the in-progress set");
      if (!user) continue;
      if (auto released = ReleaseAbandonedLock(redis_, *user, kMigratePurpose); !released.ok()) {
        return released.status();
      }
    }
  }
  std::set<UserId> failed;
  for (;;) {
    // Migrated users' collections are deleted, so the list shrinks; failed
    // ones are asked for again but skipped, so it also ends when all fail.
    auto users = chroma_.ListLegacyUsers(failed.size() + static_cast<size_t>(options_.batch));
    if (!users.ok()) return users.status();
    size_t todo = 0;
    for (const UserId& user : *users) {
      if (failed.count(user) != 0) continue;
      ++todo;
      Result<int64_t> moved = MigrateUser(user);
      if (!moved.ok()) {
        failed.insert(user);
        ++sum.failed;
        LogError("migrate_user_failed")
            .Str("user", user)
            .Str("reason", moved.status().reason())
            .Str("detail", moved.status().message())
            .Emit();
        continue;
      }
      ++sum.users;
      sum.records += *moved;
      if (options_.dry_run) failed.insert(user);  // nothing was deleted: do not list it again
    }
    if (todo == 0) break;
  }
  if (Status s = IndexTurns(sum); !s.ok()) return s;
  return sum;
}

Result<KeyMigrationSummary> Cleanup::MigrateKeys() {
  if (!options_.dry_run) {
    if (Status s = TakeLease("migrate-keys"); !s.ok()) return s;
  }
  OnExit lease_end{[this] { ReleaseLease(); }};
  return MigrateKeysToShards(redis_, options_.dry_run);
}

Status Cleanup::IndexTurns(MigrateSummary& sum) {
  // Turns recorded before the turn index existed are not in it, and the
  // history would not see them. Every tracked user's indexed records (ids and
  // metadata only) are added again, a page of the activity index at a time:
  // adding is idempotent, and a user who chatted since the upgrade has an
  // index that holds only the new turns, so "has an index" proves nothing.
  for (int shard = 0; shard < kRedisShards; ++shard) {
    if (Status s = IndexTurnsOfShard(shard, sum); !s.ok()) return s;
  }
  return Status::Ok();
}

Status Cleanup::IndexTurnsOfShard(int shard, MigrateSummary& sum) {
  for (int64_t offset = 0;; offset += options_.batch) {
    Result<RedisValue> page = TrackedUsersPage(redis_, shard, offset, options_.batch);
    if (!page.ok()) return page.status();
    if (page->elements.empty()) return Status::Ok();
    for (const RedisValue& member : page->elements) {
      std::optional<UserId> user = UserId::Parse(member.str);
      if (!user) {
        // Not a user our scripts tracked: no key may be built from it.
        ++sum.failed;
        LogError("index_turns_failed").Str("user", member.str).Str("reason", "invalid_user_id").Emit();
        continue;
      }
      const UserId& u = *user;
      auto records = chroma_.ListMessages(u);
      if (!records.ok()) {
        ++sum.failed;
        LogError("index_turns_failed").Str("user", u).Str("reason", records.status().reason()).Emit();
        continue;
      }
      if (options_.dry_run) {
        LogInfo("index_turns_would_add").Str("user", u).Int("records", static_cast<int64_t>(records->size())).Emit();
        continue;
      }
      if (Status s = AddToTurnIndex(redis_, u, *records); !s.ok()) return s;
      ++sum.turn_indexes;
    }
  }
}

Result<int64_t> Cleanup::MigrateUser(const UserId& user) {
  if (options_.dry_run) {
    auto records = chroma_.ExportLegacy(user);
    if (!records.ok()) return records.status();
    LogInfo("migrate_would_move").Str("user", user).Int("records", static_cast<int64_t>(records->size())).Emit();
    return static_cast<int64_t>(records->size());
  }
  // The lock pauses the indexers for this user, so the hot set is rebuilt
  // from a quiet state; the cleanup's own run cannot archive them meanwhile.
  if (Status s = TakeLock(user, kMigratePurpose); !s.ok()) return s;
  CrashIf("migrate_after_lock");
  Result<int64_t> moved = MoveLegacyUser(user);
  // Succeeded or not, the indexers may have the user back now: a failed user
  // is listed again by the next migration, and every step is idempotent.
  Status released = ReleaseLock(user);
  if (!moved.ok()) return moved;
  if (!released.ok()) return released;
  return moved;
}

Result<int64_t> Cleanup::MoveLegacyUser(const UserId& user) {
  auto records = chroma_.ExportLegacy(user);
  if (!records.ok()) return records.status();
  for (StoredMessage& m : *records) m.user_id = user.str();
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = chroma_.Upsert(*records); !s.ok()) return s;
  CrashIf("migrate_after_upsert");
  // The shard may hold more (turns indexed since the upgrade), never fewer.
  auto count = chroma_.Count(user);
  if (!count.ok()) return count.status();
  if (*count < static_cast<int64_t>(records->size())) {
    return Unavailable("migrate_incomplete", "the shard holds fewer records than the old collection");
  }
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = AddToHotSet(redis_, user, *records, options_.hot_messages); !s.ok()) return s;
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = AddToTurnIndex(redis_, user, *records); !s.ok()) return s;
  if (Status s = chroma_.DeleteLegacy(user); !s.ok()) return s;
  CrashIf("migrate_after_delete");
  return static_cast<int64_t>(records->size());
}

Status Cleanup::TakeLock(const UserId& user, std::string_view purpose, bool wait) {
  const std::string value = LockValue(purpose);
  std::string lease;
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    if (lease_) lease = *lease_;
  }
  // A holder that lives renews its lock; one that died lets it expire, so
  // waiting up to the TTL sees it go.
  const auto wait_until = SteadyClock::now() + std::chrono::milliseconds(options_.lock_ttl_ms);
  for (bool told = false;; told = true) {
    Result<RedisValue> r = TakeCleanupLock(redis_, user, value, options_.lock_ttl_ms, lease);
    if (!r.ok()) return r.status();
    if (r->type == RedisValue::Type::kInteger && r->integer == 1) break;
    const std::string holder = r->str.substr(0, r->str.find(':'));
    if (!wait || SteadyClock::now() >= wait_until) {
      return Unavailable("user_locked", "another chatd-cleanup (" + holder + ") holds this user; try again later");
    }
    if (!told) LogInfo("cleanup_waiting_for_user").Str("user", user).Str("holder", holder).Emit();
    std::this_thread::sleep_for(kLockPoll);
  }
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    locked_user_ = user;
    locked_value_ = value;
  }
  StartKeeper();
  // Indexers that checked the lock just before we took it may still be
  // writing this user's turns: wait until they are done (their marker has a
  // TTL, so this ends even if one died mid-write).
  auto waited_until = SteadyClock::now() + std::chrono::milliseconds(options_.lock_ttl_ms / 2);
  for (;;) {
    Result<bool> busy = IndexingInProgress(redis_, user);
    if (!busy.ok()) return busy.status();
    if (!*busy) return Status::Ok();
    if (SteadyClock::now() >= waited_until) {
      return Unavailable("indexer_busy", "an indexer kept writing this user's turns; retry later");
    }
    std::this_thread::sleep_for(kMarkerPoll);
  }
}

Status Cleanup::Fence(const UserId& user) {
  if (lease_lost_) return Unavailable("lease_lost", "another chatd-cleanup took this run's lease over: stopping here");
  std::string value;
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    if (locked_user_ == user) value = locked_value_;
  }
  if (value.empty()) return LockLost();
  Result<RedisValue> r = RenewCleanupLock(redis_, user, value, options_.lock_ttl_ms);
  if (!r.ok()) return r.status();
  if (r->integer != 1) {
    LogError("cleanup_lock_lost").Str("user", user).Emit();
    return LockLost();
  }
  return Status::Ok();
}

Status Cleanup::ReleaseLock(const UserId& user) {
  std::string value;
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    if (locked_user_ == user) value = locked_value_;
  }
  ForgetLock();
  if (value.empty()) return Status::Ok();
  Result<RedisValue> released = ReleaseCleanupLock(redis_, user, value);
  return released.ok() ? Status::Ok() : released.status();
}

void Cleanup::ReleaseLockOrWarn(const UserId& user) {
  // Not released, the lock expires after its TTL: the indexers wait that long.
  if (Status s = ReleaseLock(user); !s.ok()) {
    LogWarn("cleanup_lock_not_released").Str("user", user).Str("reason", s.reason()).Emit();
  }
}

void Cleanup::ForgetLock() {
  std::lock_guard<std::mutex> guard(keep_mu_);
  locked_user_.reset();
  locked_value_.clear();
}

Status Cleanup::SettleInProgress(int64_t cutoff_ms) {
  auto users = CleanupInProgressUsers(redis_);
  if (!users.ok()) return users.status();
  for (const std::string& u : *users) {
    std::optional<UserId> user = StoredUser(u, "the in-progress set");
    if (!user) continue;
    Result<RedisValue> r = chatd::SettleInProgress(redis_, *user, cutoff_ms);
    if (!r.ok()) return r.status();
    if (r->integer == 1) LogInfo("cleanup_settled").Str("user", *user).Emit();
  }
  return Status::Ok();
}

}  // namespace chatd
