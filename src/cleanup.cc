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
#include "chatd/clock.h"
#include "decimal.h"
#include "chatd/indexer.h"
#include "chatd/log.h"
#include "random_id.h"
#include "chatd/redis_idempotency.h"
#include "chatd/redis_memory.h"
#include "chatd/redis_rate_limiter.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// Page size when reading the index stream for queued turns.
constexpr int kStreamPage = 1000;
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
constexpr char kLeaseKey[] = "chatd:cleanup:lease";
// How often a forget or a restore looks whether a run let go of the user.
constexpr std::chrono::milliseconds kLockPoll{100};

// KEYS: activity, recent, rl fixed, rl sliding, lock, hot set, hot index,
// index stream, in-progress set, recorded turns, turn index, queued turns.
// ARGV: user, last activity we archived, index group, our lock value, stream
// ids to acknowledge.
// The turn index goes with the rest: restore rebuilds it from the archive.
// Returns 1 when the user was removed, 0 when they came back meanwhile, -1
// (and touches nothing) when the lock is no longer ours.
const RedisScript kFinishArchive(R"lua(
if redis.call('GET', KEYS[5]) ~= ARGV[4] then return -1 end
if #ARGV > 4 then
  local ids = {}
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
  redis.call('XACK', KEYS[8], ARGV[3], unpack(ids))
  redis.call('XDEL', KEYS[8], unpack(ids))
end
redis.call('SREM', KEYS[9], ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[10], KEYS[11], KEYS[12])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
redis.call('DEL', KEYS[5])
return 0
)lua");

// KEYS: lock, in-progress set, lease. ARGV: user, our lock value, lock TTL,
// our lease value ("" when we hold none).
// Takes the user's lock, when it is free (SET NX, in effect) or left by a
// run or migration that is gone (the lease is free, or ours), and remembers
// the user as in progress, together. Returns 1, or the holder's value.
const RedisScript kTakeLock(R"lua(
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[2] then
  local purpose = string.match(held, '^[^:]*')
  local lease = redis.call('GET', KEYS[3])
  if (purpose ~= 'cleanup' and purpose ~= 'migrate') or (lease and lease ~= ARGV[4]) then return held end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
)lua");

// KEYS: a lock or the lease. ARGV: our value, TTL. Renews it if it is still
// ours: 1; else 0 (expired, or someone else's now).
const RedisScript kRenew(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
)lua");

// KEYS: lease. ARGV: our value, TTL, the value of a holder proved gone ("":
// none). Returns 1, or the live holder's value.
const RedisScript kTakeLease(R"lua(
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] and held ~= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
)lua");

// KEYS: lease. ARGV: our value. Compare-and-delete.
const RedisScript kReleaseLease(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
)lua");

// KEYS: activity, lock, in-progress set. ARGV: user, cut-off.
// A user left in progress by a killed run who is active again (or gone)
// gets their lock back; one still inactive is left for this run to finish.
// The lock of a forget or a restore is its owner's: left alone.
const RedisScript kSettleInProgress(R"lua(
local held = redis.call('GET', KEYS[2])
if held then
  local purpose = string.match(held, '^[^:]*')
  if purpose ~= 'cleanup' and purpose ~= 'migrate' then return 0 end
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
)lua");

// KEYS: activity, recent, rl fixed, rl sliding, lock, hot set, hot index,
// index stream, dead letters, in-progress set, turn index, queued turns,
// tombstone, recorded turns, the list of Idempotency-Key hashes, then those
// hashes.
// ARGV: user, index group, our lock value, tombstone TTL (ms), keep rate
// limits (1/0), then stream ids (index stream) ... "|" ... dead-letter ids.
// -1 (nothing touched) when the lock is not ours. Else leaves the tombstone:
// the id of an entry added to the index stream and deleted at once, so every
// turn recorded before this moment has a smaller id and every later one a
// larger. Returns it.
const RedisScript kForget(R"lua(
if redis.call('GET', KEYS[5]) ~= ARGV[3] then return -1 end
redis.call('SREM', KEYS[10], ARGV[1])
local ids, dead, into = {}, {}, nil
into = ids
for i = 6, #ARGV do
  if ARGV[i] == '|' then into = dead else into[#into + 1] = ARGV[i] end
end
if #ids > 0 then
  redis.call('XACK', KEYS[8], ARGV[2], unpack(ids))
  redis.call('XDEL', KEYS[8], unpack(ids))
end
if #dead > 0 then redis.call('XDEL', KEYS[9], unpack(dead)) end
redis.call('DEL', KEYS[2], KEYS[5], KEYS[6], KEYS[7], KEYS[11], KEYS[12], KEYS[14], KEYS[15])
for i = 16, #KEYS do redis.call('DEL', KEYS[i]) end
if ARGV[5] ~= '1' then redis.call('DEL', KEYS[3], KEYS[4]) end
redis.call('ZREM', KEYS[1], ARGV[1])
local mark = redis.call('XADD', KEYS[8], '*', 'erase', ARGV[1])
redis.call('XDEL', KEYS[8], mark)
redis.call('SET', KEYS[13], mark, 'PX', ARGV[4])
return mark
)lua");

// KEYS: index stream. ARGV: group, tombstone, then stream ids of the user.
// Drops the entries older than the tombstone: turns that chats fenced by the
// erase recorded after its first look at the stream. Returns their ids.
const RedisScript kDropBeforeTombstone(R"lua(
local tm, tq = string.match(ARGV[2], '^(%d+)-(%d+)$')
tm, tq = tonumber(tm), tonumber(tq)
local dropped = {}
for i = 3, #ARGV do
  local m, q = string.match(ARGV[i], '^(%d+)-(%d+)$')
  m, q = tonumber(m), tonumber(q)
  if m < tm or (m == tm and q < tq) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
)lua");

// KEYS: lock, in-progress set. ARGV: user, value. Compare-and-delete of the
// user's lock, and the user is no longer in progress.
const RedisScript kReleaseLock(R"lua(
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
)lua");

// KEYS: lock, in-progress set. ARGV: user, purpose. Releases a lock a killed
// migration left (the caller holds the lease, so its owner is gone).
const RedisScript kReleaseAbandoned(R"lua(
local held = redis.call('GET', KEYS[1])
if not held or string.match(held, '^[^:]*') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
)lua");

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

// Every per-user key a cleanup removes: recent, rl fixed, rl sliding, lock,
// hot set, hot index (the scripts' KEYS[2..7]), recorded turns (their last).
std::vector<std::string> UserKeys(std::string_view user) {
  return {RecentKey(user), UserKey(user, kFixedWindowKeySuffix), UserKey(user, kSlidingLogKeySuffix),
          CleanupLockKey(user), HotKey(user), HotIndexKey(user), RecordedTurnsKey(user)};
}

Status RedisErrorIf(const Result<RedisValue>& r, std::string_view what) {
  if (!r.ok()) return r.status();
  if (r->is_error()) return RedisReplyError(r->str, what);
  return Status::Ok();
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
  const std::string ttl = std::to_string(options_.lock_ttl_ms);
  const auto every = std::chrono::milliseconds(std::max<int64_t>(options_.lock_ttl_ms / 3, 1));
  std::unique_lock<std::mutex> lock(keep_mu_);
  while (!keep_cv_.wait_for(lock, every, [this] { return keep_stop_; })) {
    const std::optional<std::string> lease = lease_;
    const std::string user = locked_user_, value = locked_value_;
    lock.unlock();
    // A failed renewal (Redis away) is tried again next time; only an answer
    // that the key is someone else's now counts as lost.
    if (lease) {
      auto r = redis_.Eval(kRenew, {kLeaseKey}, {*lease, ttl});
      if (r.ok() && !r->is_error() && r->integer == 0) {
        lease_lost_ = true;
        LogError("cleanup_lease_lost").Str("detail", "another chatd-cleanup holds the lease now").Emit();
      }
    }
    if (!user.empty()) {
      std::string key = CleanupLockKey(user);
      auto r = redis_.Eval(kRenew, {key}, {value, ttl});
      lock.lock();
      const bool still_ours = locked_user_ == user;
      lock.unlock();
      if (r.ok() && !r->is_error() && r->integer == 0 && still_ours) {
        LogError("cleanup_lock_lost").Str("user", user).Emit();  // the next Fence stops the user's processing
      }
    }
    lock.lock();
  }
}

Status Cleanup::TakeLease(std::string_view command) {
  const std::string host = HostName(), pid = std::to_string(getpid());
  const std::string value = token_ + " " + host + " " + pid + " " + ProcessStart(pid) + " " + std::string(command);
  const std::string ttl = std::to_string(options_.lock_ttl_ms);
  std::string gone;  // a holder proved dead, whose lease we may take over
  for (int attempt = 0; attempt < 2; ++attempt) {
    Result<RedisValue> r = redis_.Eval(kTakeLease, {kLeaseKey}, {value, ttl, gone});
    if (Status s = RedisErrorIf(r, "lease"); !s.ok()) return s;
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
                             ") is running; this one stops. Its lease " + kLeaseKey +
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
  auto r = redis_.Eval(kReleaseLease, {kLeaseKey}, {*lease});
  if (!r.ok() || r->is_error()) LogWarn("cleanup_lease_not_released").Emit();
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

Result<std::map<std::string, std::vector<IndexEntry>>> Cleanup::QueuedTurns(const std::vector<std::string>& users) {
  std::set<std::string> wanted(users.begin(), users.end());
  std::map<std::string, std::vector<IndexEntry>> out;
  std::string start = "-";
  std::string page = std::to_string(kStreamPage);
  for (;;) {
    Result<RedisValue> r = redis_.Command({"XRANGE", kIndexStreamKey, start, "+", "COUNT", page});
    if (Status s = RedisErrorIf(r, "XRANGE"); !s.ok()) return s;
    std::vector<IndexEntry> entries = ParseIndexEntries(*r);
    for (auto& e : entries) {
      if (wanted.count(e.user)) out[e.user].push_back(e);
    }
    if (r->elements.size() < static_cast<size_t>(kStreamPage)) break;
    start = "(" + r->elements.back().elements[0].str;  // exclusive: after the last id seen
  }
  return out;
}

Result<Cleanup::Outcome> Cleanup::ArchiveUser(const std::string& user, int64_t last_activity,
                                              const std::vector<IndexEntry>& queued, int64_t& records) {
  std::vector<std::string> keys = UserKeys(user);

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
  Archive archive;
  archive.user_id = user;
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
  std::string score = std::to_string(last_activity);
  const std::string value = LockValue(kRunPurpose);
  std::vector<std::string_view> args = {user, score, kIndexGroup, value};
  for (const IndexEntry& e : queued) args.push_back(e.stream_id);
  const std::string turns = TurnIndexKey(user), queued_turns = QueuedTurnsKey(user);
  std::vector<std::string_view> script_keys = {kActivityKey, keys[0], keys[1], keys[2], keys[3], keys[4], keys[5],
                                               kIndexStreamKey, kCleanupInProgressKey, keys[6], turns, queued_turns};
  Result<RedisValue> done = redis_.Eval(kFinishArchive, script_keys, args);
  if (Status s = RedisErrorIf(done, "finishing the archive"); !s.ok()) return s;
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
  std::string cutoff = "(" + std::to_string(cutoff_ms);  // strictly older than the threshold
  std::string batch = std::to_string(options_.batch);

  // Users that stay in the index below the cut-off (failed, or left alone in
  // a dry run) are skipped by offset; archived ones leave it, and those who
  // come back move above the cut-off.
  int64_t offset = 0;
  for (int batch_no = 1;; ++batch_no) {
    std::string off = std::to_string(offset);
    Result<RedisValue> page = redis_.Command(
        {"ZRANGE", kActivityKey, "-inf", cutoff, "BYSCORE", "LIMIT", off, batch, "WITHSCORES"});
    if (Status s = RedisErrorIf(page, "ZRANGE"); !s.ok()) return s;
    if (page->elements.empty()) break;

    std::vector<std::pair<std::string, int64_t>> users;
    for (size_t i = 0; i + 1 < page->elements.size(); i += 2) {
      // Scores are the milliseconds our own script wrote; anything else in
      // the index is a fault to report, not an exception to die of.
      std::optional<int64_t> score = ParseDecimal(page->elements[i + 1].str);
      if (!score) return Unavailable("redis_error", "the activity index holds a score that is not whole milliseconds");
      users.emplace_back(page->elements[i].str, *score);
    }
    std::vector<std::string> names;
    for (const auto& [u, ts] : users) names.push_back(u);
    auto queued = QueuedTurns(names);
    if (!queued.ok()) return queued.status();

    int64_t batch_archived = 0, batch_failed = 0;
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
  sum.seconds = std::chrono::duration<double>(SteadyClock::now() - started).count();
  return sum;
}

Result<int64_t> Cleanup::Restore(std::string_view user_id) {
  std::string user(user_id);
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
  for (StoredMessage& m : records) m.user_id = user;
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
  std::string score = std::to_string(*now);
  if (Status s = RedisErrorIf(redis_.Command({"ZADD", kActivityKey, "NX", score, user}), "ZADD"); !s.ok()) return s;
  // Only now that Chroma holds every record may the archives go.
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = RemoveArchives(options_.archive_dir, user, *paths); !s.ok()) return s;
  return static_cast<int64_t>(records.size());
}

Result<int64_t> Cleanup::Forget(std::string_view user_id, bool keep_rate_limits) {
  std::string user(user_id);
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

Result<int64_t> Cleanup::EraseLocked(const std::string& user, bool keep_rate_limits) {
  // Every message id found anywhere, so a message kept in several places
  // (recent list, stream, hot set, Chroma, an archive) counts once.
  std::set<std::string> erased;
  auto add_turn = [&erased](const std::string& turn) {
    erased.insert(turn + ":u");
    erased.insert(turn + ":a");
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
  Result<RedisValue> dead = redis_.Command({"XRANGE", kDeadLetterKey, "-", "+"});
  if (Status s = RedisErrorIf(dead, "XRANGE"); !s.ok()) return s;
  for (const IndexEntry& e : ParseIndexEntries(*dead)) {
    if (e.user != user) continue;
    dead_ids.push_back(e.stream_id);
    add_turn(e.turn);
  }

  // What Redis holds of the user's messages: the recent list, the turn index
  // and the hot set.
  std::vector<std::string> keys = UserKeys(user);
  const std::string turns = TurnIndexKey(user), queued_turns = QueuedTurnsKey(user), tombstone = TombstoneKey(user);
  const std::string idem_list = IdempotencyKeysKey(user);
  auto held = redis_.Pipeline({{"LRANGE", keys[0], "0", "-1"},
                               {"ZRANGE", turns, "0", "-1"},
                               {"HKEYS", keys[4]},
                               {"ZRANGE", idem_list, "0", "-1"}});
  if (!held.ok()) return held.status();
  for (const RedisValue& r : *held) {
    if (r.is_error()) return Unavailable("redis_error", "reading the user's keys failed: " + r.str);
  }
  for (const RedisValue& e : (*held)[0].elements) {
    auto m = ParseRecentEntry(e.str);
    if (m.ok()) erased.insert(m->id);
  }
  for (const RedisValue& e : (*held)[1].elements) {
    if (std::string_view turn = TurnOfIndexMember(e.str); !turn.empty()) add_turn(std::string(turn));
  }
  for (const RedisValue& e : (*held)[2].elements) erased.insert(e.str);
  // The user's Idempotency-Key answers hold reply texts: they go too. Only
  // names under the user's own prefix, whatever the list says.
  const std::string idem_prefix = UserKey(user, "idem:");
  std::vector<std::string> idem_keys;
  for (const RedisValue& e : (*held)[3].elements) {
    if (e.str.rfind(idem_prefix, 0) == 0) idem_keys.push_back(e.str);
  }

  if (Status s = Fence(user); !s.ok()) return s;
  std::vector<std::string> chroma_ids;
  if (auto deleted = chroma_.DeleteUser(user, &chroma_ids); !deleted.ok()) return deleted.status();
  erased.insert(chroma_ids.begin(), chroma_ids.end());
  // A deployment not yet migrated may still hold the old per-user collection.
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = chroma_.DeleteLegacy(user); !s.ok()) return s;
  if (Status s = Fence(user); !s.ok()) return s;
  if (Status s = RemoveArchives(options_.archive_dir, user, *paths); !s.ok()) return s;

  const std::string value = LockValue("forget");
  const std::string ttl = std::to_string(options_.tombstone_ttl_ms);
  std::vector<std::string_view> args = {user, kIndexGroup, value, ttl, keep_rate_limits ? "1" : "0"};
  for (const IndexEntry& e : (*queued)[user]) args.push_back(e.stream_id);
  args.push_back("|");
  for (const std::string& id : dead_ids) args.push_back(id);
  std::vector<std::string_view> script_keys = {kActivityKey,    keys[0],        keys[1],
                                               keys[2],         keys[3],        keys[4],
                                               keys[5],         kIndexStreamKey, kDeadLetterKey,
                                               kCleanupInProgressKey, turns,    queued_turns,
                                               tombstone,       keys[6],        idem_list};
  for (const std::string& k : idem_keys) script_keys.push_back(k);
  Result<RedisValue> mark = redis_.Eval(kForget, script_keys, args);
  if (Status s = RedisErrorIf(mark, "forget"); !s.ok()) return s;
  if (mark->type == RedisValue::Type::kInteger && mark->integer < 0) return LockLost();

  // Chats fenced by the erase may have recorded a turn between the first look
  // at the stream and the tombstone: those entries go now, rather than wait
  // for an indexer to drop them.
  auto late = QueuedTurns({user});
  if (!late.ok()) return late.status();
  if (!(*late)[user].empty()) {
    std::vector<std::string_view> drop = {kIndexGroup, mark->str};
    for (const IndexEntry& e : (*late)[user]) drop.push_back(e.stream_id);
    Result<RedisValue> dropped = redis_.Eval(kDropBeforeTombstone, {kIndexStreamKey}, drop);
    if (Status s = RedisErrorIf(dropped, "dropping fenced turns"); !s.ok()) return s;
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
    Result<RedisValue> left = redis_.Command({"SMEMBERS", kCleanupInProgressKey});
    if (Status s = RedisErrorIf(left, "SMEMBERS"); !s.ok()) return s;
    for (const RedisValue& u : left->elements) {
      std::string lock = CleanupLockKey(u.str);
      auto released = redis_.Eval(kReleaseAbandoned, {lock, kCleanupInProgressKey}, {u.str, kMigratePurpose});
      if (Status s = RedisErrorIf(released, "release"); !s.ok()) return s;
    }
  }
  std::set<std::string> failed;
  for (;;) {
    // Migrated users' collections are deleted, so the list shrinks; failed
    // ones are asked for again but skipped, so it also ends when all fail.
    auto users = chroma_.ListLegacyUsers(failed.size() + static_cast<size_t>(options_.batch));
    if (!users.ok()) return users.status();
    size_t todo = 0;
    for (const std::string& user : *users) {
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

Status Cleanup::IndexTurns(MigrateSummary& sum) {
  // Turns recorded before the turn index existed are not in it, and the
  // history would not see them. Every tracked user's indexed records (ids and
  // metadata only) are added again, a page of the activity index at a time:
  // adding is idempotent, and a user who chatted since the upgrade has an
  // index that holds only the new turns, so "has an index" proves nothing.
  const std::string batch = std::to_string(options_.batch);
  for (int64_t offset = 0;; offset += options_.batch) {
    const std::string off = std::to_string(offset);
    Result<RedisValue> page = redis_.Command({"ZRANGE", kActivityKey, "-inf", "+inf", "BYSCORE", "LIMIT", off, batch});
    if (Status s = RedisErrorIf(page, "ZRANGE"); !s.ok()) return s;
    if (page->elements.empty()) return Status::Ok();
    for (const RedisValue& u : page->elements) {
      auto records = chroma_.ListMessages(u.str);
      if (!records.ok()) {
        ++sum.failed;
        LogError("index_turns_failed").Str("user", u.str).Str("reason", records.status().reason()).Emit();
        continue;
      }
      if (options_.dry_run) {
        LogInfo("index_turns_would_add").Str("user", u.str).Int("records", static_cast<int64_t>(records->size())).Emit();
        continue;
      }
      if (Status s = AddToTurnIndex(redis_, u.str, *records); !s.ok()) return s;
      ++sum.turn_indexes;
    }
  }
}

Result<int64_t> Cleanup::MigrateUser(const std::string& user) {
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

Result<int64_t> Cleanup::MoveLegacyUser(const std::string& user) {
  auto records = chroma_.ExportLegacy(user);
  if (!records.ok()) return records.status();
  for (StoredMessage& m : *records) m.user_id = user;
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

Status Cleanup::TakeLock(const std::string& user, std::string_view purpose, bool wait) {
  std::string lock = CleanupLockKey(user);
  std::string ttl = std::to_string(options_.lock_ttl_ms);
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
    Result<RedisValue> r = redis_.Eval(kTakeLock, {lock, kCleanupInProgressKey, kLeaseKey}, {user, value, ttl, lease});
    if (Status s = RedisErrorIf(r, "lock"); !s.ok()) return s;
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
  std::string marker = IndexingKey(user);
  auto waited_until = SteadyClock::now() + std::chrono::milliseconds(options_.lock_ttl_ms / 2);
  for (;;) {
    Result<RedisValue> r = redis_.Command({"EXISTS", marker});
    if (Status e = RedisErrorIf(r, "EXISTS"); !e.ok()) return e;
    if (r->integer == 0) return Status::Ok();
    if (SteadyClock::now() >= waited_until) {
      return Unavailable("indexer_busy", "an indexer kept writing this user's turns; retry later");
    }
    std::this_thread::sleep_for(kMarkerPoll);
  }
}

Status Cleanup::Fence(const std::string& user) {
  if (lease_lost_) return Unavailable("lease_lost", "another chatd-cleanup took this run's lease over: stopping here");
  std::string value;
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    if (locked_user_ == user) value = locked_value_;
  }
  if (value.empty()) return LockLost();
  std::string lock = CleanupLockKey(user);
  std::string ttl = std::to_string(options_.lock_ttl_ms);
  Result<RedisValue> r = redis_.Eval(kRenew, {lock}, {value, ttl});
  if (Status s = RedisErrorIf(r, "lock check"); !s.ok()) return s;
  if (r->integer != 1) {
    LogError("cleanup_lock_lost").Str("user", user).Emit();
    return LockLost();
  }
  return Status::Ok();
}

Status Cleanup::ReleaseLock(const std::string& user) {
  std::string value;
  {
    std::lock_guard<std::mutex> guard(keep_mu_);
    if (locked_user_ == user) value = locked_value_;
  }
  ForgetLock();
  if (value.empty()) return Status::Ok();
  std::string lock = CleanupLockKey(user);
  return RedisErrorIf(redis_.Eval(kReleaseLock, {lock, kCleanupInProgressKey}, {user, value}), "release");
}

void Cleanup::ReleaseLockOrWarn(const std::string& user) {
  // Not released, the lock expires after its TTL: the indexers wait that long.
  if (Status s = ReleaseLock(user); !s.ok()) {
    LogWarn("cleanup_lock_not_released").Str("user", user).Str("reason", s.reason()).Emit();
  }
}

void Cleanup::ForgetLock() {
  std::lock_guard<std::mutex> guard(keep_mu_);
  locked_user_.clear();
  locked_value_.clear();
}

Status Cleanup::SettleInProgress(int64_t cutoff_ms) {
  Result<RedisValue> users = redis_.Command({"SMEMBERS", kCleanupInProgressKey});
  if (Status s = RedisErrorIf(users, "SMEMBERS"); !s.ok()) return s;
  std::string cutoff = std::to_string(cutoff_ms);
  for (const RedisValue& u : users->elements) {
    std::string lock = CleanupLockKey(u.str);
    Result<RedisValue> r = redis_.Eval(kSettleInProgress, {kActivityKey, lock, kCleanupInProgressKey}, {u.str, cutoff});
    if (Status s = RedisErrorIf(r, "settling"); !s.ok()) return s;
    if (r->integer == 1) LogInfo("cleanup_settled").Str("user", u.str).Emit();
  }
  return Status::Ok();
}

}  // namespace chatd
