// chatd-cleanup: archives and removes the memory of inactive users; restores or
// forgets one user. Run daily by systemd/chatd-cleanup.timer with the pool's
// environment file (docs/cleanup.md).
//
//   chatd-cleanup [run] [--dry-run]
//   chatd-cleanup restore USER [--dry-run]
//   chatd-cleanup forget USER [--dry-run]
//   chatd-cleanup migrate [--dry-run]   (per-user collections -> shards, once)
//   chatd-cleanup migrate-keys [--dry-run]   (global Redis keys -> shards, once)
//
// Logs are JSON lines on stderr; the last one is the summary. Exit status: 0
// when every user succeeded, 1 when any failed, 2 for bad usage or config, 3
// when another run or migration is running (it holds the lease).
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "chroma.h"
#include "chatd/cleanup.h"
#include "chatd/config.h"
#include "chatd/embeddings.h"
#include "http_client.h"
#include "chatd/log.h"
#include "chatd/redis.h"
#include "chatd/user_id.h"
#include "chatd/wiring.h"

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitAlreadyRunning = 3;

// Logs the failure of a command that takes the lease (run, migrate,
// migrate-keys) and returns its exit status.
int LeaseCommandFailed(const chatd::Status& s, std::string_view event) {
  if (s.reason() == chatd::kCleanupRunningReason) {
    chatd::LogError("cleanup_already_running").Str("reason", s.reason()).Str("detail", s.message()).Emit();
    return kExitAlreadyRunning;
  }
  chatd::LogError(event).Str("reason", s.reason()).Str("detail", s.message()).Emit();
  return kExitFailed;
}

int Usage() {
  std::fprintf(stderr,
               "usage: chatd-cleanup [run] [--dry-run]\n"
               "       chatd-cleanup restore USER [--dry-run]\n"
               "       chatd-cleanup forget USER [--dry-run]\n"
               "       chatd-cleanup migrate [--dry-run]\n"
               "       chatd-cleanup migrate-keys [--dry-run]\n");
  return kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace chatd;

  std::vector<std::string> args;
  bool dry_run = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--dry-run") == 0) {
      dry_run = true;
    } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      Usage();
      return 0;
    } else {
      args.emplace_back(argv[i]);
    }
  }
  std::string command = args.empty() ? "run" : args[0];
  if (!(((command == "run" || command == "migrate" || command == "migrate-keys") && args.size() <= 1) || ((command == "restore" || command == "forget") && args.size() == 2))) {
    return Usage();
  }
  // restore and forget name their user: parsed here, where it enters, like a
  // request's; a malformed one is a usage error before anything is touched.
  std::optional<UserId> user;
  if (args.size() == 2) {
    user = UserId::Parse(args[1]);
    if (!user) {
      std::fprintf(stderr, "chatd-cleanup: \"%s\" is not a valid user id\n", args[1].c_str());
      return kExitUsage;
    }
  }

  Result<Config> loaded = LoadConfig(ProcessEnv());
  if (!loaded.ok()) {
    std::fprintf(stderr, "chatd-cleanup: configuration error: %s\n", loaded.status().message().c_str());
    return kExitUsage;
  }
  const Config& config = *loaded;
  signal(SIGPIPE, SIG_IGN);
  InitHttpGlobal();

  Adapters adapters = Wire(config, Binary::kCleanup);
  RedisClient redis(adapters.redis);
  // Refused credentials end the run at once with the reason, rather than as
  // one failure per user.
  if (Status s = redis.CheckAccess(); !s.ok()) {
    LogError("cleanup_failed").Str("reason", s.reason()).Str("detail", s.message()).Emit();
    return kExitFailed;
  }

  ChromaStore& chroma = *adapters.chroma;
  Embedder& embedder = *adapters.embedder;

  CleanupOptions options;
  options.inactive_ms = config.cleanup_inactive_s * 1000;
  options.archive_dir = config.archive_dir;
  options.batch = config.cleanup_batch;
  options.lock_ttl_ms = config.cleanup_lock_ttl_ms;
  options.now_ms = config.cleanup_now_ms;
  options.dry_run = dry_run;
  options.hot_messages = config.recall_hot_messages;
  options.tombstone_ttl_ms = EraseTombstoneTtlMs(config);
  // A way to end the process on purpose has no place in what we ship: only
  // the test build (chatd-cleanup-testhooks, compiled with CHATD_TEST_HOOKS)
  // reads it, and the release build says it ignores it.
#ifdef CHATD_TEST_HOOKS
  if (const char* crash = std::getenv("CHATD_CLEANUP_CRASH_AT")) options.crash_at = crash;
#else
  if (std::getenv("CHATD_CLEANUP_CRASH_AT") != nullptr) {
    LogWarn("test_hook_ignored").Str("variable", "CHATD_CLEANUP_CRASH_AT").Emit();
  }
#endif
  Cleanup cleanup(redis, chroma, embedder, options);

  if (command == "restore") {
    Result<int64_t> n = cleanup.Restore(*user);
    if (!n.ok()) {
      LogError("restore_failed").Str("user", *user).Str("reason", n.status().reason())
          .Str("detail", n.status().message()).Emit();
      return kExitFailed;
    }
    LogInfo("restore_done").Str("user", *user).Int("records", *n).Bool("dry_run", dry_run).Emit();
    return 0;
  }
  if (command == "forget") {
    Result<int64_t> erased = cleanup.Forget(*user);
    if (!erased.ok()) {
      const Status& s = erased.status();
      LogError("forget_failed").Str("user", *user).Str("reason", s.reason()).Str("detail", s.message()).Emit();
      return kExitFailed;
    }
    LogInfo("forget_done").Str("user", *user).Int("messages", *erased).Bool("dry_run", dry_run).Emit();
    return 0;
  }

  if (command == "migrate-keys") {
    Result<KeyMigrationSummary> m = cleanup.MigrateKeys();
    if (!m.ok()) return LeaseCommandFailed(m.status(), "migrate_keys_failed");
    LogInfo("migrate_keys_done")
        .Int("user_keys", m->user_keys)
        .Int("stream_entries", m->stream_entries)
        .Int("dead_letters", m->dead_letters)
        .Int("activity", m->activity)
        .Int("in_progress", m->in_progress)
        .Bool("dry_run", dry_run)
        .Emit();
    return 0;
  }

  if (command == "migrate") {
    Result<MigrateSummary> m = cleanup.Migrate();
    if (!m.ok()) return LeaseCommandFailed(m.status(), "migrate_failed");
    LogInfo("migrate_done")
        .Int("users", m->users)
        .Int("records", m->records)
        .Int("failed", m->failed)
        .Int("turn_indexes", m->turn_indexes)
        .Bool("dry_run", dry_run)
        .Emit();
    return m->failed == 0 ? 0 : kExitFailed;
  }

  Result<CleanupSummary> sum = cleanup.Run();
  if (!sum.ok()) return LeaseCommandFailed(sum.status(), "cleanup_failed");
  LogInfo("cleanup_summary")
      .Int("scanned", sum->scanned)
      .Int("archived", sum->archived)
      .Int("returned", sum->returned)
      .Int("failed", sum->failed)
      .Int("skipped", sum->skipped)
      .Int("records", sum->records)
      .Num("seconds", sum->seconds)
      .Bool("dry_run", dry_run)
      .Emit();
  return sum->failed == 0 ? 0 : kExitFailed;
}
