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
#include <string>
#include <vector>

#include "chatd/chroma.h"
#include "chatd/cleanup.h"
#include "chatd/config.h"
#include "chatd/embeddings.h"
#include "chatd/http_client.h"
#include "chatd/log.h"
#include "chatd/openai_embedder.h"
#include "chatd/redis.h"
#include "chatd/user_id.h"

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitAlreadyRunning = 3;
// The cleanup is not latency-bound: give Chroma and Redis more patience than
// the request path does.
constexpr int64_t kCleanupChromaTimeoutMs = 30000;
constexpr int64_t kCleanupRedisTimeoutMs = 5000;

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
  if (args.size() == 2 && !IsValidUserId(args[1])) {
    std::fprintf(stderr, "chatd-cleanup: \"%s\" is not a valid user id\n", args[1].c_str());
    return kExitUsage;
  }

  Result<Config> loaded = LoadConfig(ProcessEnv());
  if (!loaded.ok()) {
    std::fprintf(stderr, "chatd-cleanup: configuration error: %s\n", loaded.status().message().c_str());
    return kExitUsage;
  }
  const Config& config = *loaded;
  signal(SIGPIPE, SIG_IGN);
  InitHttpGlobal();

  RedisOptions redis_options;
  redis_options.host = config.redis_host;
  redis_options.port = config.redis_port;
  redis_options.timeout_ms = std::max(config.redis_timeout_ms, kCleanupRedisTimeoutMs);
  redis_options.username = config.redis_username;
  redis_options.password = config.redis_password;
  // A Redis restarting (loading its data) or busy with a long script is
  // waited for, within a bound, rather than failing every user.
  redis_options.transient_wait_ms = config.cleanup_redis_wait_ms;
  RedisClient redis(redis_options);
  // Refused credentials end the run at once with the reason, rather than as
  // one failure per user.
  if (Status s = redis.CheckAccess(); !s.ok()) {
    LogError("cleanup_failed").Str("reason", s.reason()).Str("detail", s.message()).Emit();
    return kExitFailed;
  }

  ChromaOptions chroma_options;
  chroma_options.base_url = config.chroma_url;
  chroma_options.timeout_ms = std::max(config.chroma_timeout_ms, kCleanupChromaTimeoutMs);
  chroma_options.sync_threshold = config.chroma_sync_threshold;
  chroma_options.shards = config.chroma_shards;
  chroma_options.tenant = config.chroma_tenant;
  chroma_options.database = config.chroma_database;
  chroma_options.token = config.chroma_token;
  chroma_options.token_header = config.chroma_token_header;
  ChromaStore chroma(chroma_options);

  std::unique_ptr<Embedder> embedder;
  if (config.embedder == EmbedderKind::kLocal) {
    embedder = std::make_unique<LocalEmbedder>(static_cast<size_t>(config.embedding_dimensions));
  } else {
    OpenAIEmbedderOptions o;
    o.base_url = config.openai_base_url;
    o.api_key = config.openai_api_key;
    o.model = config.embedding_model;
    o.dimensions = static_cast<size_t>(config.embedding_dimensions);
    o.timeout_ms = kCleanupChromaTimeoutMs;
    embedder = std::make_unique<OpenAIEmbedder>(o);
  }

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
  Cleanup cleanup(redis, chroma, *embedder, options);

  if (command == "restore") {
    Result<int64_t> n = cleanup.Restore(args[1]);
    if (!n.ok()) {
      LogError("restore_failed").Str("user", args[1]).Str("reason", n.status().reason())
          .Str("detail", n.status().message()).Emit();
      return kExitFailed;
    }
    LogInfo("restore_done").Str("user", args[1]).Int("records", *n).Bool("dry_run", dry_run).Emit();
    return 0;
  }
  if (command == "forget") {
    Result<int64_t> erased = cleanup.Forget(args[1]);
    if (!erased.ok()) {
      const Status& s = erased.status();
      LogError("forget_failed").Str("user", args[1]).Str("reason", s.reason()).Str("detail", s.message()).Emit();
      return kExitFailed;
    }
    LogInfo("forget_done").Str("user", args[1]).Int("messages", *erased).Bool("dry_run", dry_run).Emit();
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
