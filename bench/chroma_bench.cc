// chroma_bench: Chroma at scale, through chatd's own adapter (chatd::ChromaStore
// and chatd::LocalEmbed), so the figures are what the pool would see.
//
//   chroma_bench --url URL [--users 2000] [--messages 50] [--dims 256]
//                [--threads 4] [--first 200] [--queries 2000] [--adds 100]
//                [--sample 50] [--timeout-ms 10000] [--pid PID] [--shards 16]
//                [--sync-threshold 1000] [--hnsw-max-neighbors 8] [--hnsw-ef-construction 40] [--first-user 0] [--batch-users 1]
//                [--range-queries 50] load|query|cold
//
//   load   users --first-user .. --users - 1 get M messages each, upserted B
//          users (--batch-users) per adapter call, P calls at a time; the
//          adapter splits a call into one upsert per shard touched, as the
//          indexer's batches do. --first-user makes loads incremental (load
//          1k, measure, add 4k, measure...). The latency of each call and the
//          wall time; with --pid, Chroma's CPU per user and per turn.
//   query  a first query for F users (what the first request of a user costs
//          right after the load), then random-user queries one at a time (the
//          recall latency a chat sees), R recalls with a ts bound (what the
//          request path asks of Chroma for a user whose hot set is full),
//          single-turn adds (what the indexer does per turn), and the same
//          queries from P threads at once (Chroma's query throughput here).
//   cold   run right after a restart of Chroma: the very first query, then
//          for a sample of users the collection lookup, a first (cold) query
//          and a second (warm) one, timed separately over raw HTTP.
//
// With --pid (Chroma's process), each stage also reports Chroma's CPU time
// (user + system, /proc) per call. Prints one JSON object on stdout;
// latencies are in milliseconds. Exit status
// 0 when every call succeeded, 1 when some failed (the JSON counts them), 2 on
// a usage error.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "chroma.h"
#include "chatd/embeddings.h"
#include "http_client.h"
#include "chatd/memory.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

#include "bench_util.h"
#include "local_embedder.h"
#include "chroma_json.h"

using namespace bench;  // NOLINT: the shared bench helpers, bench_util.h

namespace {

constexpr char kApiPrefix[] = "/api/v2/tenants/default_tenant/databases/default_database";
constexpr char kUserPrefix[] = "bench-chroma-";
// As on the request path: k memories, plus as many results as recent messages
// that recall excludes (CHATD_RECALL_K, CHATD_RECENT_MESSAGES defaults).
constexpr size_t kRecallK = 5;
constexpr size_t kRecentExcluded = 4;
constexpr int64_t kConnectTimeoutMs = 2000;
constexpr uint64_t kSeed = 20240601;

struct Options {
  std::string url;
  std::string command;
  int users = 2000;
  int messages = 50;
  int dims = 256;
  int threads = 4;
  int first = 200;
  int queries = 2000;
  int adds = 100;
  int sample = 50;
  int64_t timeout_ms = 10000;
  int pid = 0;  // Chroma's, for its CPU time; 0: not measured
  int shards = chatd::kDefaultChromaShards;
  int sync_threshold = 1000;
  int hnsw_max_neighbors = chatd::chroma_json::HnswBuild{}.max_neighbors;
  int hnsw_ef_construction = chatd::chroma_json::HnswBuild{}.ef_construction;
  int first_user = 0;   // load: users before this one are already in Chroma
  int batch_users = 1;  // load: users per Upsert call (one upsert per shard inside)
  int range_queries = 50;  // query: recalls excluding a hot half by id, as for a user whose hot set is full
};

// utime + stime of `pid` in milliseconds (fields 14 and 15 of proc(5)), or -1.
double ProcessCpuMs(int pid) {
  if (pid <= 0) return -1;
  std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (f == nullptr) return -1;
  char buf[1024];
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // The command name may hold spaces: the fields that follow start after the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return -1;
  unsigned long long utime = 0, stime = 0;
  if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) return -1;
  return static_cast<double>(utime + stime) * 1000.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// Chroma's CPU per call over a stage, or -1 when not measured.
class CpuMeter {
 public:
  explicit CpuMeter(int pid) : pid_(pid), start_(ProcessCpuMs(pid)) {}
  double PerCall(size_t calls) const {
    double now = ProcessCpuMs(pid_);
    if (start_ < 0 || now < 0 || calls == 0) return -1;
    return (now - start_) / static_cast<double>(calls);
  }

 private:
  int pid_;
  double start_;
};

std::string UserName(int i) { return kUserPrefix + std::to_string(i); }
// The store takes parsed ids only; the bench's own names are valid.
chatd::UserId ParsedUser(int i) { return chatd::UserId::Parse(UserName(i)).value(); }

std::string MessageText(int user, int j) {
  return "User " + std::to_string(user) + " said, in message " + std::to_string(j) + ", something about " +
         kTopics[static_cast<size_t>(user + j) % kTopicCount] + ".";
}

std::string MessageId(int user, int j) {
  return "t" + std::to_string(user) + "-" + std::to_string(j / 2) + (j % 2 == 0 ? ":u" : ":a");
}

chatd::StoredMessage MakeMessage(const std::string& user_id, int user, int j, size_t dims) {
  chatd::StoredMessage m;
  m.id = MessageId(user, j);
  m.user_id = user_id;
  m.turn_id = "t" + std::to_string(user) + "-" + std::to_string(j / 2);
  m.role = j % 2 == 0 ? chatd::Role::kUser : chatd::Role::kAssistant;
  m.content = MessageText(user, j);
  m.ts_ms = 1700000000000 + static_cast<int64_t>(j) * 1000;
  m.embedding = chatd::LocalEmbed(m.content, dims);
  return m;
}

chatd::ChromaStore MakeStore(const Options& o, std::atomic<uint64_t>* calls) {
  chatd::ChromaOptions co;
  co.base_url = o.url;
  co.timeout_ms = o.timeout_ms;
  co.connect_timeout_ms = kConnectTimeoutMs;
  co.call_counter = calls;
  co.shards = o.shards;
  co.hnsw.sync_threshold = o.sync_threshold;
  co.hnsw.max_neighbors = o.hnsw_max_neighbors;
  co.hnsw.ef_construction = o.hnsw_ef_construction;
  return chatd::ChromaStore(co);
}

// The recall of a chat: k results beyond the recent messages it excludes.
std::vector<std::string> ExcludedIds(int user, int messages) {
  std::vector<std::string> ids;
  for (int j = std::max(0, messages - static_cast<int>(kRecentExcluded)); j < messages; ++j) {
    ids.push_back(MessageId(user, j));
  }
  return ids;
}

std::vector<float> QueryEmbedding(std::mt19937_64& rng, size_t dims) {
  return chatd::LocalEmbed(std::string("Tell me again about ") + kTopics[rng() % kTopicCount] + ".", dims);
}

int RunLoad(const Options& o) {
  std::atomic<uint64_t> calls{0};
  chatd::ChromaStore store = MakeStore(o, &calls);
  Samples batches;
  std::atomic<int> failures{0};
  std::atomic<int> next{o.first_user};
  const size_t dims = static_cast<size_t>(o.dims);
  const int loaded = std::max(0, o.users - o.first_user);
  CpuMeter cpu(o.pid);
  auto started = Clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < o.threads; ++t) {
    workers.emplace_back([&] {
      for (int first = next.fetch_add(o.batch_users); first < o.users; first = next.fetch_add(o.batch_users)) {
        const int end = std::min(o.users, first + o.batch_users);
        std::vector<chatd::StoredMessage> batch;
        batch.reserve(static_cast<size_t>(o.messages) * static_cast<size_t>(end - first));
        for (int user = first; user < end; ++user) {
          const std::string id = UserName(user);
          for (int j = 0; j < o.messages; ++j) batch.push_back(MakeMessage(id, user, j, dims));
        }
        auto call_started = Clock::now();
        chatd::Status s = store.Upsert(batch);
        batches.Add(MsSince(call_started));
        if (!s.ok()) {
          failures.fetch_add(1);
          std::fprintf(stderr, "chroma_bench: upsert users %d..%d: %s\n", first, end - 1, s.message().c_str());
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  double seconds = MsSince(started) / 1000.0;
  const double per_user = cpu.PerCall(static_cast<size_t>(loaded));
  // A turn is two messages (user + assistant), as the indexer writes them.
  const double per_turn = per_user < 0 ? -1 : per_user / (o.messages / 2.0);
  std::printf(
      "{\"users\":%d,\"first_user\":%d,\"users_loaded\":%d,\"batch_users\":%d,\"messages_per_user\":%d,"
      "\"dims\":%d,\"threads\":%d,\"seconds\":%s,\"http_calls\":%llu,\"failures\":%d,\"call_ms\":%s,"
      "\"chroma_cpu_ms_per_user\":%s,\"chroma_cpu_ms_per_turn\":%s}\n",
      o.users, o.first_user, loaded, o.batch_users, o.messages, o.dims, o.threads, Num(seconds).c_str(),
      static_cast<unsigned long long>(calls.load()), failures.load(), Series(batches.Take()).c_str(),
      Num(per_user).c_str(), Num(per_turn).c_str());
  return failures.load() == 0 ? 0 : 1;
}

int RunQuery(const Options& o) {
  std::atomic<uint64_t> calls{0};
  chatd::ChromaStore store = MakeStore(o, &calls);
  const size_t dims = static_cast<size_t>(o.dims);
  std::mt19937_64 rng(kSeed);
  int failures = 0;
  int empty = 0;

  auto recall = [&](int user, std::vector<double>& out) {
    std::vector<float> embedding = QueryEmbedding(rng, dims);
    std::vector<std::string> exclude = ExcludedIds(user, o.messages);
    auto call_started = Clock::now();
    auto r = store.Recall(ParsedUser(user), embedding, kRecallK, exclude);
    out.push_back(MsSince(call_started));
    if (!r.ok()) {
      ++failures;
      std::fprintf(stderr, "chroma_bench: recall: %s\n", r.status().message().c_str());
    } else if (r->messages.size() != kRecallK) {
      ++empty;  // every user has more than k + excluded messages: a short answer is a bug below us
    }
  };

  // F users drawn at random. Their first query since the load includes the
  // adapter's lookup of the collection id, and whatever Chroma loads on a
  // collection's first read. The stages below reuse these users, so they
  // measure collections that are already loaded.
  std::vector<int> sampled(static_cast<size_t>(o.users));
  for (int i = 0; i < o.users; ++i) sampled[static_cast<size_t>(i)] = i;
  std::shuffle(sampled.begin(), sampled.end(), rng);
  sampled.resize(static_cast<size_t>(std::max(1, std::min(o.first, o.users))));
  std::vector<double> first;
  first.reserve(sampled.size());
  CpuMeter first_cpu(o.pid);
  for (int user : sampled) recall(user, first);
  const double first_cpu_ms = first_cpu.PerCall(first.size());

  std::vector<double> random;
  random.reserve(static_cast<size_t>(o.queries));
  const uint64_t calls_before = calls.load();
  std::uniform_int_distribution<size_t> pick(0, sampled.size() - 1);
  CpuMeter query_cpu(o.pid);
  for (int i = 0; i < o.queries; ++i) recall(sampled[pick(rng)], random);
  const double query_cpu_ms = query_cpu.PerCall(random.size());
  const uint64_t calls_per_query_x1000 = o.queries > 0 ? (calls.load() - calls_before) * 1000 / o.queries : 0;

  // The query the request path really sends to Chroma since the hot set: only
  // for a user whose hot set is full, for the messages that are neither recent
  // nor hot, excluded by id (where user; n_results grows by the excluded
  // count). Here the newer half of the user's messages is taken as hot.
  std::vector<double> ranged;
  CpuMeter range_cpu(o.pid);
  int range_short = 0;
  for (int i = 0; i < o.range_queries; ++i) {
    const int user = sampled[pick(rng)];
    std::vector<float> embedding = QueryEmbedding(rng, dims);
    auto call_started = Clock::now();
    std::vector<std::string> hot;
    for (int j = o.messages / 2; j < o.messages; ++j) hot.push_back(MessageId(user, j));
    auto r = store.Recall(ParsedUser(user), embedding, kRecallK, hot);
    ranged.push_back(MsSince(call_started));
    if (!r.ok()) {
      ++failures;
      std::fprintf(stderr, "chroma_bench: ranged recall: %s\n", r.status().message().c_str());
    } else if (r->messages.size() != kRecallK) {
      ++range_short;
    }
  }
  const double range_cpu_ms = range_cpu.PerCall(ranged.size());

  // Recall by id (CHATD_RECALL_BY_ID_MAX): what the request path sends for a
  // user whose older messages are few enough to list. Here every message but
  // the recent ones, so the answer is the plain recall's above; read by id
  // with embeddings and ranked in this process, whose CPU (the pool's cost of
  // it) is timed per call too.
  std::vector<double> by_id, by_id_worker_cpu;
  CpuMeter by_id_cpu(o.pid);
  int by_id_short = 0;
  for (int i = 0; i < o.queries; ++i) {
    const int user = sampled[pick(rng)];
    std::vector<float> embedding = QueryEmbedding(rng, dims);
    std::vector<std::string> older;
    for (int j = o.messages - static_cast<int>(kRecentExcluded) - 1; j >= 0; --j) older.push_back(MessageId(user, j));
    const double thread_cpu_before = ThreadCpuMs();
    auto call_started = Clock::now();
    auto r = store.RecallAmong(ParsedUser(user), embedding, kRecallK, older);
    by_id.push_back(MsSince(call_started));
    by_id_worker_cpu.push_back(ThreadCpuMs() - thread_cpu_before);
    if (!r.ok()) {
      ++failures;
      std::fprintf(stderr, "chroma_bench: recall by id: %s\n", r.status().message().c_str());
    } else if (r->messages.size() != kRecallK) {
      ++by_id_short;
    }
  }
  const double by_id_cpu_ms = by_id_cpu.PerCall(by_id.size());

  // One turn (both messages) into a user's collection, as the indexer writes
  // it, then that user's next recall: does a write make the next read cold?
  std::vector<double> adds, after_add;
  adds.reserve(static_cast<size_t>(o.adds));
  double add_cpu_total = 0;
  for (int i = 0; i < o.adds; ++i) {
    int user = sampled[pick(rng)];
    const std::string id = UserName(user);
    int j = o.messages + 2 * i;
    std::vector<chatd::StoredMessage> turn = {MakeMessage(id, user, j, dims), MakeMessage(id, user, j + 1, dims)};
    CpuMeter add_cpu(o.pid);
    auto call_started = Clock::now();
    chatd::Status s = store.Upsert(turn);
    adds.push_back(MsSince(call_started));
    add_cpu_total += add_cpu.PerCall(1);
    if (!s.ok()) {
      ++failures;
      std::fprintf(stderr, "chroma_bench: add: %s\n", s.message().c_str());
    }
    recall(user, after_add);
  }
  const double add_cpu_ms = o.pid > 0 && o.adds > 0 ? add_cpu_total / o.adds : -1;

  // Throughput: the same kind of queries from several threads at once.
  std::atomic<int> next{0};
  CpuMeter parallel_cpu(o.pid);
  std::atomic<int> parallel_failures{0};
  Samples parallel;
  auto started = Clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < o.threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 local(kSeed + static_cast<uint64_t>(t) + 1);
      std::uniform_int_distribution<size_t> local_pick(0, sampled.size() - 1);
      while (next.fetch_add(1) < o.queries) {
        int user = sampled[local_pick(local)];
        std::vector<float> embedding = QueryEmbedding(local, dims);
        auto call_started = Clock::now();
        auto r = store.Recall(ParsedUser(user), embedding, kRecallK, ExcludedIds(user, o.messages));
        parallel.Add(MsSince(call_started));
        if (!r.ok()) parallel_failures.fetch_add(1);
      }
    });
  }
  for (auto& w : workers) w.join();
  double parallel_seconds = MsSince(started) / 1000.0;
  const double parallel_cpu_ms = parallel_cpu.PerCall(static_cast<size_t>(o.queries));
  failures += parallel_failures.load();

  std::printf(
      "{\"users\":%d,\"sampled_users\":%zu,\"first_query_ms\":%s,\"query_ms\":%s,\"http_calls_per_query\":%s,"
      "\"query_before_ts_ms\":%s,\"query_before_ts_short_answers\":%d,\"query_before_ts_cpu_ms\":%s,"
      "\"recall_by_id_ms\":%s,\"recall_by_id_short_answers\":%d,\"recall_by_id_cpu_ms\":%s,"
      "\"recall_by_id_client_cpu_ms\":%s,"
      "\"add_turn_ms\":%s,\"query_after_add_ms\":%s,"
      "\"chroma_cpu_ms_per_call\":{\"first_query\":%s,\"query\":%s,\"add_turn\":%s,\"parallel_query\":%s},"
      "\"parallel\":{\"threads\":%d,\"queries\":%d,\"seconds\":%s,\"qps\":%s,\"query_ms\":%s},"
      "\"short_answers\":%d,\"failures\":%d}\n",
      o.users, sampled.size(), Series(std::move(first)).c_str(), Series(std::move(random)).c_str(),
      Num(static_cast<double>(calls_per_query_x1000) / 1000.0).c_str(), Series(std::move(ranged)).c_str(), range_short,
      Num(range_cpu_ms).c_str(), Series(std::move(by_id)).c_str(), by_id_short, Num(by_id_cpu_ms).c_str(),
      Series(std::move(by_id_worker_cpu)).c_str(), Series(std::move(adds)).c_str(),
      Series(std::move(after_add)).c_str(), Num(first_cpu_ms).c_str(), Num(query_cpu_ms).c_str(),
      Num(add_cpu_ms).c_str(), Num(parallel_cpu_ms).c_str(),
      o.threads, o.queries, Num(parallel_seconds).c_str(),
      Num(parallel_seconds > 0 ? o.queries / parallel_seconds : 0).c_str(), Series(parallel.Take()).c_str(), empty,
      failures);
  return failures == 0 ? 0 : 1;
}

// Raw calls, so that the collection lookup and the query are timed apart.
class RawChroma {
 public:
  explicit RawChroma(const Options& o) : api_(o.url + kApiPrefix), timeout_ms_(o.timeout_ms), shards_(o.shards) {}

  chatd::Result<chatd::HttpResponse> Send(const char* method, const std::string& url, std::string body) {
    chatd::HttpCall call;
    call.method = method;
    call.url = url;
    call.body = std::move(body);
    if (!call.body.empty()) call.headers.push_back("Content-Type: application/json");
    call.connect_timeout_ms = kConnectTimeoutMs;
    call.timeout_ms = timeout_ms_;
    return client_.Send(call);
  }

  chatd::Result<std::string> CollectionId(const std::string& user_id) {
    auto r = Send("GET", api_ + "/collections/" + chatd::ChromaShardName(chatd::ChromaShardOf(user_id, shards_), shards_),
                  "");
    if (!r.ok()) return r.status();
    if (r->status != 200) return chatd::Unavailable("lookup", "collection lookup: HTTP " + std::to_string(r->status));
    return chatd::chroma_json::ParseCollectionId(r->body);
  }

  chatd::Status Query(const std::string& collection_id, const std::string& user_id, const std::vector<float>& e) {
    auto body = chatd::chroma_json::QueryRequest(e, static_cast<int64_t>(kRecallK + kRecentExcluded), user_id);
    if (!body.ok()) return body.status();
    auto r = Send("POST", api_ + "/collections/" + collection_id + "/query", body.value());
    if (!r.ok()) return r.status();
    if (r->status != 200) return chatd::Unavailable("query", "query: HTTP " + std::to_string(r->status));
    auto records = chatd::chroma_json::ParseQueryResponse(r->body, user_id);
    return records.ok() ? chatd::Status::Ok() : records.status();
  }

 private:
  chatd::HttpClient client_;
  std::string api_;
  int64_t timeout_ms_;
  int shards_;
};

int RunCold(const Options& o) {
  RawChroma chroma(o);
  const size_t dims = static_cast<size_t>(o.dims);
  std::mt19937_64 rng(kSeed + 99);
  std::uniform_int_distribution<int> pick(0, o.users - 1);
  int failures = 0;
  auto note = [&failures](const chatd::Status& s, const char* what) {
    if (s.ok()) return;
    ++failures;
    std::fprintf(stderr, "chroma_bench: %s: %s\n", what, s.message().c_str());
  };

  // The very first request after the restart pays for whatever Chroma loads
  // lazily at start, on top of the collection.
  double very_first_lookup = 0, very_first_query = 0;
  {
    const std::string id = UserName(pick(rng));
    auto started = Clock::now();
    auto cid = chroma.CollectionId(id);
    very_first_lookup = MsSince(started);
    note(cid.status(), "lookup");
    if (cid.ok()) {
      started = Clock::now();
      note(chroma.Query(cid.value(), id, QueryEmbedding(rng, dims)), "query");
      very_first_query = MsSince(started);
    }
  }

  std::vector<double> lookups, cold, warm;
  std::map<int, bool> seen;
  while (static_cast<int>(seen.size()) < std::min(o.sample, o.users - 1)) {
    int user = pick(rng);
    if (seen.count(user) != 0) continue;
    seen[user] = true;
    const std::string id = UserName(user);
    auto started = Clock::now();
    auto cid = chroma.CollectionId(id);
    lookups.push_back(MsSince(started));
    note(cid.status(), "lookup");
    if (!cid.ok()) continue;
    started = Clock::now();
    note(chroma.Query(cid.value(), id, QueryEmbedding(rng, dims)), "query");
    cold.push_back(MsSince(started));
    started = Clock::now();
    note(chroma.Query(cid.value(), id, QueryEmbedding(rng, dims)), "query");
    warm.push_back(MsSince(started));
  }
  std::printf(
      "{\"very_first_lookup_ms\":%s,\"very_first_query_ms\":%s,\"lookup_ms\":%s,\"cold_query_ms\":%s,"
      "\"warm_query_ms\":%s,\"failures\":%d}\n",
      Num(very_first_lookup).c_str(), Num(very_first_query).c_str(), Series(std::move(lookups)).c_str(),
      Series(std::move(cold)).c_str(), Series(std::move(warm)).c_str(), failures);
  return failures == 0 ? 0 : 1;
}

bool ParseArgs(int argc, char** argv, Options& o) {
  const IntFlag<int> flags[] = {
      {"--users", 2, 1000000, &o.users},       {"--messages", 6, 100000, &o.messages},
      {"--dims", 1, 16384, &o.dims},           {"--threads", 1, 256, &o.threads},
      {"--queries", 0, 10000000, &o.queries},  {"--adds", 0, 10000000, &o.adds},
      {"--sample", 1, 100000, &o.sample},      {"--first", 0, 1000000, &o.first},
      {"--pid", 1, 4194304, &o.pid},          {"--shards", 1, chatd::kMaxChromaShards, &o.shards},
      {"--sync-threshold", 2, 1000000, &o.sync_threshold},
      {"--hnsw-max-neighbors", 2, 1000, &o.hnsw_max_neighbors},
      {"--hnsw-ef-construction", 1, 100000, &o.hnsw_ef_construction},
      {"--first-user", 0, 1000000, &o.first_user},   {"--batch-users", 1, 10000, &o.batch_users},
      {"--range-queries", 0, 1000000, &o.range_queries},
  };
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "load" || arg == "query" || arg == "cold") {
      o.command = arg;
      continue;
    }
    if (i + 1 >= argc) return false;
    const char* value = argv[++i];
    if (arg == "--url") {
      o.url = value;
      continue;
    }
    int64_t v = 0;
    if (arg == "--timeout-ms") {
      if (!ParseInt(value, 1, 600000, v)) return false;
      o.timeout_ms = v;
      continue;
    }
    if (ParseIntFlag(arg, value, flags) != FlagParse::kSet) return false;
  }
  return !o.url.empty() && !o.command.empty();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!ParseArgs(argc, argv, o)) {
    std::fprintf(stderr,
                 "usage: chroma_bench --url URL [--users N] [--messages M] [--dims D] [--threads P] "
                 "[--first F] [--queries Q] [--adds A] [--sample S] [--timeout-ms T] [--pid PID] [--shards N] "
                 "[--sync-threshold S] [--hnsw-max-neighbors M] [--hnsw-ef-construction E] [--first-user U] [--batch-users B] [--range-queries R] load|query|cold\n");
    return 2;
  }
  chatd::InitHttpGlobal();
  if (o.command == "load") return RunLoad(o);
  if (o.command == "query") return RunQuery(o);
  return RunCold(o);
}
