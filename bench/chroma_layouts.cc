// chroma_layouts: how Chroma's costs grow with the number of users under two
// layouts of long-term memory, spoken over Chroma's HTTP API v2 directly (no
// chatd::ChromaStore, so the figures do not depend on the adapter's version).
//
//   chroma_layouts --url URL --layout shards|per-user [--shards 8] --to USERS
//                  [--from 0] [--messages 50] [--dims 256] [--threads 2]
//                  [--batch 128] [--queries 500] [--adds 50] [--timeout-ms 30000]
//                  [--pid PID] [--data-dir DIR] [--hnsw '{"sync_threshold":100}']
//
//   shards    users hashed to N collections (FNV-1a 64 of the user id, mod N);
//             every record carries the user in its metadata; the load writes
//             upserts of --batch records of one shard (several users in one
//             batch, as an indexer flushing its queue would); a recall is a
//             query with where {"user": U}.
//   per-user  one collection per user, created on the user's first write, and
//             one upsert of all of the user's messages.
//
// One run is one stage of a store that grows: it loads users [from, to) into
// whatever the Chroma at URL already holds, then measures with all `to` users
// present: --queries recalls of random users one at a time, the same number
// with a `ts` range added to the user's filter (older memories), --adds
// single-turn (2-record) upserts, and Chroma's RSS, open files and data size.
// With --pid (the `chroma run` process), Chroma's CPU time (utime + stime of
// it and its descendants, /proc) is reported per record, per call and per
// turn. Prints one JSON object on stdout; latencies in milliseconds. Exit
// status 0 when every call succeeded, 1 when some failed (the JSON counts
// them), 2 on a usage error.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "bench_util.h"
#include "chatd/embeddings.h"
#include "http_client.h"
#include "chatd/status.h"
#include "local_embedder.h"

namespace {

using namespace bench;  // NOLINT: the shared bench helpers, bench_util.h

constexpr char kApiPrefix[] = "/api/v2/tenants/default_tenant/databases/default_database";
constexpr size_t kResults = 9;  // as a recall asks: k = 5 plus the 4 recent messages it excludes
constexpr int64_t kConnectTimeoutMs = 2000;
constexpr uint64_t kSeed = 20261130;
constexpr int64_t kFirstTs = 1700000000000;
constexpr int64_t kTsStep = 60000;  // one message a minute
constexpr int kGrowthBuckets = 10;  // per-user layout: write cost in this many slices of the load

using JsonWriter = rapidjson::Writer<rapidjson::StringBuffer>;

struct Options {
  std::string url;
  std::string layout;
  int shards = 8;
  int from = 0;
  int to = 0;
  int messages = 50;
  int dims = 256;
  int threads = 2;
  int batch = 128;
  int queries = 500;
  int adds = 50;
  int64_t timeout_ms = 30000;
  int pid = 0;
  std::string data_dir;
  std::string hnsw_extra;  // members merged into configuration.hnsw, as JSON
};

// ---------------------------------------------------------------------------
// /proc: Chroma's CPU, memory and open files (the process and its descendants).

std::string ReadFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return "";
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  std::fclose(f);
  return out;
}

// The fields of /proc/PID/stat after the command name (which may hold spaces).
std::vector<std::string> StatFields(int pid) {
  std::string s = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  size_t close = s.rfind(')');
  std::vector<std::string> fields;
  if (close == std::string::npos) return fields;
  size_t i = close + 2;
  while (i < s.size()) {
    size_t j = s.find(' ', i);
    if (j == std::string::npos) j = s.size();
    fields.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return fields;  // fields[0] is state (field 3 of proc(5))
}

std::vector<int> ProcessTree(int root) {
  std::vector<int> tree;
  if (root <= 0) return tree;
  std::map<int, std::vector<int>> children;
  if (DIR* d = opendir("/proc")) {
    while (dirent* e = readdir(d)) {
      int pid = std::atoi(e->d_name);
      if (pid <= 0) continue;
      std::vector<std::string> f = StatFields(pid);
      if (f.size() > 1) children[std::atoi(f[1].c_str())].push_back(pid);
    }
    closedir(d);
  }
  tree.push_back(root);
  for (size_t i = 0; i < tree.size(); ++i) {
    for (int c : children[tree[i]]) tree.push_back(c);
  }
  return tree;
}

// utime + stime of the tree, in ms; -1 when there is no process. The tree is
// found once (walking /proc per call would cost more than a query).
double TreeCpuMs(int root) {
  static const std::vector<int> tree = ProcessTree(root);
  double ticks = 0;
  bool any = false;
  for (int pid : tree) {
    std::vector<std::string> f = StatFields(pid);
    if (f.size() < 13) continue;
    ticks += std::strtod(f[11].c_str(), nullptr) + std::strtod(f[12].c_str(), nullptr);
    any = true;
  }
  return any ? ticks * 1000.0 / static_cast<double>(sysconf(_SC_CLK_TCK)) : -1;
}

// Busy time of the whole machine (/proc/stat, all but idle and iowait), in ms.
double MachineBusyMs() {
  std::string s = ReadFile("/proc/stat");
  unsigned long long v[8] = {};
  if (std::sscanf(s.c_str(), "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                  &v[5], &v[6], &v[7]) != 8) {
    return -1;
  }
  double busy = static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
  return busy * 1000.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
}

class CpuMeter {
 public:
  explicit CpuMeter(int pid) : pid_(pid), start_(TreeCpuMs(pid)), machine_start_(MachineBusyMs()) {}
  double Ms() const {
    double now = TreeCpuMs(pid_);
    return start_ < 0 || now < 0 ? -1 : now - start_;
  }
  double MachineMs() const { return MachineBusyMs() - machine_start_; }

 private:
  int pid_;
  double start_;
  double machine_start_;
};

std::string ProcessJson(int root) {
  std::vector<int> tree = ProcessTree(root);
  long rss_kib = 0;
  long fds = 0;
  for (int pid : tree) {
    std::string status = ReadFile("/proc/" + std::to_string(pid) + "/status");
    size_t at = status.find("VmRSS:");
    if (at != std::string::npos) rss_kib += std::strtol(status.c_str() + at + 6, nullptr, 10);
    if (DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
      while (dirent* e = readdir(d)) {
        if (e->d_name[0] != '.') ++fds;
      }
      closedir(d);
    }
  }
  return "{\"processes\":" + std::to_string(tree.size()) + ",\"rss_mib\":" + Num(rss_kib / 1024.0) +
         ",\"open_files\":" + std::to_string(fds) + "}";
}

std::string DataJson(const std::string& dir) {
  if (dir.empty()) return "null";
  unsigned long long bytes = 0, allocated = 0, files = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    struct stat st;
    if (lstat(it->path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      bytes += static_cast<unsigned long long>(st.st_size);
      allocated += static_cast<unsigned long long>(st.st_blocks) * 512;
      ++files;
    }
  }
  return "{\"files\":" + std::to_string(files) + ",\"mib\":" + Num(bytes / 1048576.0) +
         ",\"allocated_mib\":" + Num(allocated / 1048576.0) + "}";
}

// ---------------------------------------------------------------------------
// The synthetic store: users, messages, ids, shards.

std::string UserId(int user) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "bench-user-%05d", user);
  return buf;
}

// 64-bit FNV-1a.
uint64_t Fnv1a64(std::string_view s) {
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

int ShardOf(const std::string& user_id, int shards) {
  return static_cast<int>(Fnv1a64(user_id) % static_cast<uint64_t>(shards));
}

struct Record {
  std::string id;
  std::string user;
  std::string role;
  std::string turn;
  int64_t ts = 0;
  std::string document;
  std::vector<float> embedding;
};

// Message j of a user; ids are unique per user and message. Documents are
// 120 to 160 bytes, like short chat messages.
Record MakeRecord(int user, int j, const std::string& tag, size_t dims) {
  Record r;
  r.user = UserId(user);
  r.turn = tag + "t" + std::to_string(j / 2);
  r.role = j % 2 == 0 ? "user" : "assistant";
  r.id = r.user + ":" + r.turn + (j % 2 == 0 ? ":u" : ":a");
  r.ts = kFirstTs + static_cast<int64_t>(j) * kTsStep;
  const char* topic = kTopics[static_cast<size_t>(user * 7 + j) % kTopicCount];
  r.document = (j % 2 == 0 ? "Could you tell me more about " : "Here is what I know about ") + std::string(topic) +
               "? This is message " + std::to_string(j) + " of user " + std::to_string(user) +
               ", padded to the length of a typical chat message.";
  r.embedding = chatd::LocalEmbed(r.document, dims);
  return r;
}

std::vector<float> QueryEmbedding(std::mt19937_64& rng, size_t dims) {
  return chatd::LocalEmbed(std::string("Tell me again about ") + kTopics[rng() % kTopicCount] + ".", dims);
}

// ---------------------------------------------------------------------------
// Chroma over HTTP.

std::string Finish(const rapidjson::StringBuffer& b) { return std::string(b.GetString(), b.GetSize()); }

void WriteStr(JsonWriter& w, std::string_view s) { w.String(s.data(), static_cast<rapidjson::SizeType>(s.size())); }

void WriteFloats(JsonWriter& w, const std::vector<float>& v) {
  w.StartArray();
  for (float x : v) {
    char buf[32];
    auto res = std::to_chars(buf, buf + sizeof(buf), x);
    w.RawValue(buf, static_cast<size_t>(res.ptr - buf), rapidjson::kNumberType);
  }
  w.EndArray();
}

std::string UpsertBody(const std::vector<const Record*>& records) {
  rapidjson::StringBuffer b;
  JsonWriter w(b);
  w.StartObject();
  w.Key("ids");
  w.StartArray();
  for (const Record* r : records) WriteStr(w, r->id);
  w.EndArray();
  w.Key("embeddings");
  w.StartArray();
  for (const Record* r : records) WriteFloats(w, r->embedding);
  w.EndArray();
  w.Key("documents");
  w.StartArray();
  for (const Record* r : records) WriteStr(w, r->document);
  w.EndArray();
  w.Key("metadatas");
  w.StartArray();
  for (const Record* r : records) {
    w.StartObject();
    w.Key("user");
    WriteStr(w, r->user);
    w.Key("role");
    WriteStr(w, r->role);
    w.Key("ts");
    w.Int64(r->ts);
    w.Key("turn");
    WriteStr(w, r->turn);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  return Finish(b);
}

// A recall: the user's filter, and with ts_before > 0 a `ts` range too.
std::string QueryBody(const std::vector<float>& embedding, const std::string& user, int64_t ts_before) {
  rapidjson::StringBuffer b;
  JsonWriter w(b);
  w.StartObject();
  w.Key("query_embeddings");
  w.StartArray();
  WriteFloats(w, embedding);
  w.EndArray();
  w.Key("n_results");
  w.Uint(kResults);
  w.Key("where");
  w.StartObject();
  if (ts_before > 0) {
    w.Key("$and");
    w.StartArray();
    w.StartObject();
    w.Key("user");
    WriteStr(w, user);
    w.EndObject();
    w.StartObject();
    w.Key("ts");
    w.StartObject();
    w.Key("$lt");
    w.Int64(ts_before);
    w.EndObject();
    w.EndObject();
    w.EndArray();
  } else {
    w.Key("user");
    WriteStr(w, user);
  }
  w.EndObject();
  w.Key("include");
  w.StartArray();
  w.String("documents");
  w.String("metadatas");
  w.String("distances");
  w.EndArray();
  w.EndObject();
  return Finish(b);
}

class Chroma {
 public:
  explicit Chroma(const Options& o) : api_(o.url + kApiPrefix), timeout_ms_(o.timeout_ms), hnsw_(o.hnsw_extra) {}

  // An HTTP status of 2xx, or an error that says what came back.
  chatd::Result<std::string> Call(const std::string& path, std::string body) {
    chatd::HttpCall call;
    call.method = "POST";
    call.url = api_ + path;
    call.body = std::move(body);
    call.headers.push_back("Content-Type: application/json");
    call.connect_timeout_ms = kConnectTimeoutMs;
    call.timeout_ms = timeout_ms_;
    auto r = chatd::ThreadHttpClient().Send(call);
    if (!r.ok()) return r.status();
    if (r->status < 200 || r->status > 299) {
      return chatd::Status(chatd::Code::kUpstream, "http_" + std::to_string(r->status),
                           path + ": " + std::to_string(r->status) + " " + r->body.substr(0, 300));
    }
    return std::move(r->body);
  }

  // The id of the collection `name`, created when missing.
  chatd::Result<std::string> Collection(const std::string& name) {
    std::string body = "{\"name\":\"" + name + "\",\"get_or_create\":true,\"configuration\":{\"hnsw\":{\"space\":\"l2\"" +
                       (hnsw_.empty() ? "" : "," + hnsw_) + "}}}";
    auto r = Call("/collections", std::move(body));
    if (!r.ok()) return r.status();
    rapidjson::Document doc;
    doc.Parse(r->c_str());
    if (doc.HasParseError() || !doc.IsObject() || !doc.HasMember("id") || !doc["id"].IsString()) {
      return chatd::Status(chatd::Code::kUpstream, "bad_collection", "no id in " + r->substr(0, 300));
    }
    return std::string(doc["id"].GetString());
  }

 private:
  std::string api_;
  int64_t timeout_ms_;
  std::string hnsw_;
};

// One try, and one more after a pause: a transient error of a loaded Chroma
// should not end a stage, but it is counted.
chatd::Result<std::string> CallWithRetry(Chroma& chroma, const std::string& path, const std::string& body,
                                         std::atomic<int>* retries) {
  auto r = chroma.Call(path, body);
  if (r.ok()) return r;
  std::fprintf(stderr, "chroma_layouts: %s (retrying once)\n", r.status().message().c_str());
  retries->fetch_add(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  return chroma.Call(path, body);
}

// ---------------------------------------------------------------------------

struct Stage {
  const Options& o;
  Chroma chroma;
  std::map<int, std::string> shard_ids;  // shard -> collection id
  std::atomic<int> failures{0};
  std::atomic<int> retries{0};

  explicit Stage(const Options& opts) : o(opts), chroma(opts) {}

  bool Sharded() const { return o.layout == "shards"; }
  std::string ShardName(int shard) const {
    return "mem-" + std::to_string(o.shards) + "-" + std::to_string(shard);
  }

  // The collection id that holds `user`; per-user collections are created here.
  chatd::Result<std::string> CollectionOf(int user) {
    if (Sharded()) return shard_ids.at(ShardOf(UserId(user), o.shards));
    return chroma.Collection("mem-" + UserId(user));
  }

  // Loads users [from, to); returns the JSON of the load.
  std::string Load() {
    const size_t dims = static_cast<size_t>(o.dims);
    // Work: batches of records; per-user: one batch per user.
    std::vector<std::vector<int>> work;  // users of each unit of work, in order
    if (Sharded()) {
      std::vector<std::vector<int>> by_shard(static_cast<size_t>(o.shards));
      for (int u = o.from; u < o.to; ++u) by_shard[static_cast<size_t>(ShardOf(UserId(u), o.shards))].push_back(u);
      for (auto& users : by_shard) {
        if (!users.empty()) work.push_back(std::move(users));
      }
    } else {
      for (int u = o.from; u < o.to; ++u) work.push_back({u});
    }
    Samples batch_ms, create_ms;
    std::atomic<size_t> next{0};
    std::atomic<size_t> calls{0};
    std::atomic<size_t> records{0};
    // Per-user layout: the write cost in slices of the load, to see it grow.
    const size_t slice = std::max<size_t>(1, work.size() / kGrowthBuckets);
    std::mutex growth_mu;
    std::vector<std::string> growth;
    std::atomic<size_t> done{0};
    double slice_cpu = TreeCpuMs(o.pid);
    auto slice_start = Clock::now();
    std::vector<double> slice_write_ms;

    CpuMeter cpu(o.pid);
    auto started = Clock::now();
    auto worker = [&] {
      // Sharded: each unit is one shard's users, split in batches here, one
      // shard per thread at a time; per-user: one unit per user.
      for (size_t i = next.fetch_add(1); i < work.size(); i = next.fetch_add(1)) {
        const std::vector<int>& users = work[i];
        auto create_started = Clock::now();
        auto collection = CollectionOf(users.front());
        if (!Sharded()) create_ms.Add(MsSince(create_started));
        if (!collection.ok()) {
          std::fprintf(stderr, "chroma_layouts: collection: %s\n", collection.status().message().c_str());
          failures.fetch_add(1);
          continue;
        }
        const std::string path = "/collections/" + collection.value() + "/upsert";
        std::vector<Record> pending;
        auto flush = [&] {
          std::vector<const Record*> refs;
          for (const Record& r : pending) refs.push_back(&r);
          std::string body = UpsertBody(refs);
          auto call_started = Clock::now();
          auto r = CallWithRetry(chroma, path, body, &retries);
          double ms = MsSince(call_started);
          batch_ms.Add(ms);
          calls.fetch_add(1);
          if (!r.ok()) {
            failures.fetch_add(1);
            std::fprintf(stderr, "chroma_layouts: upsert: %s\n", r.status().message().c_str());
          } else {
            records.fetch_add(pending.size());
          }
          pending.clear();
          return ms;
        };
        double write_ms = 0;
        for (int u : users) {
          for (int j = 0; j < o.messages; ++j) {
            pending.push_back(MakeRecord(u, j, "", dims));
            if (Sharded() && static_cast<int>(pending.size()) == o.batch) flush();
          }
        }
        if (!pending.empty()) write_ms = flush();
        if (!Sharded()) {
          std::lock_guard<std::mutex> lock(growth_mu);
          slice_write_ms.push_back(write_ms);
          size_t n = done.fetch_add(1) + 1;
          if (n % slice == 0 || n == work.size()) {
            double now_cpu = TreeCpuMs(o.pid);
            double mean = 0;
            for (double x : slice_write_ms) mean += x;
            mean /= static_cast<double>(slice_write_ms.size());
            growth.push_back("{\"collections\":" + std::to_string(o.from + static_cast<int>(n)) +
                             ",\"writes\":" + std::to_string(slice_write_ms.size()) +
                             ",\"write_ms_mean\":" + Num(mean) + ",\"chroma_cpu_ms_per_user\":" +
                             Num((now_cpu - slice_cpu) / static_cast<double>(slice_write_ms.size())) +
                             ",\"seconds\":" + Num(MsSince(slice_start) / 1000.0) + "}");
            slice_cpu = now_cpu;
            slice_start = Clock::now();
            slice_write_ms.clear();
          }
        }
      }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < o.threads; ++t) threads.emplace_back(worker);
    for (auto& t : threads) t.join();
    const double seconds = MsSince(started) / 1000.0;
    const double cpu_ms = cpu.Ms();
    const double n = static_cast<double>(records.load());
    std::string out = "{\"users\":" + std::to_string(o.to - o.from) + ",\"records\":" + std::to_string(records.load()) +
                      ",\"upserts\":" + std::to_string(calls.load()) + ",\"seconds\":" + Num(seconds) +
                      ",\"records_per_s\":" + Num(seconds > 0 ? n / seconds : 0) +
                      ",\"upsert_ms\":" + Series(batch_ms.Take()) + ",\"chroma_cpu_ms\":" + Num(cpu_ms) +
                      ",\"chroma_cpu_ms_per_record\":" + Num(cpu_ms >= 0 && n > 0 ? cpu_ms / n : -1) +
                      ",\"chroma_cpu_ms_per_turn\":" + Num(cpu_ms >= 0 && n > 0 ? 2 * cpu_ms / n : -1) +
                      ",\"machine_busy_ms\":" + Num(cpu.MachineMs());
    if (!Sharded()) {
      out += ",\"create_collection_ms\":" + Series(create_ms.Take()) + ",\"growth\":[";
      for (size_t i = 0; i < growth.size(); ++i) out += (i ? "," : "") + growth[i];
      out += "]";
    }
    return out + "}";
  }

  // Checks one query answer: kResults records, all of `user`, and older than
  // ts_before when it is set. Returns "" or what is wrong.
  static std::string CheckAnswer(const std::string& body, const std::string& user, int64_t ts_before) {
    rapidjson::Document doc;
    doc.Parse<rapidjson::kParseIterativeFlag>(body.c_str());
    if (doc.HasParseError() || !doc.IsObject() || !doc.HasMember("metadatas")) return "unparsable";
    const rapidjson::Value& metas = doc["metadatas"];
    if (!metas.IsArray() || metas.Size() != 1 || !metas[0].IsArray()) return "no metadatas";
    const rapidjson::Value& list = metas[0];
    if (list.Size() != kResults) return "short";
    for (const auto& m : list.GetArray()) {
      if (!m.IsObject() || !m.HasMember("user") || !m["user"].IsString() || user != m["user"].GetString()) {
        return "wrong user";
      }
      if (ts_before > 0 && (!m.HasMember("ts") || !m["ts"].IsInt64() || m["ts"].GetInt64() >= ts_before)) {
        return "wrong ts";
      }
    }
    return "";
  }

  // n recalls of random users among [0, to), one at a time; with a ts range
  // (the older half of the user's loaded messages) when `ranged`.
  std::string Queries(bool ranged, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> pick(0, o.to - 1);
    std::vector<double> ms;
    double cpu_total = 0;
    int short_answers = 0, wrong = 0;
    const int64_t ts_before = ranged ? kFirstTs + static_cast<int64_t>(o.messages / 2) * kTsStep : 0;
    for (int i = 0; i < o.queries; ++i) {
      int user = pick(rng);
      auto collection = CollectionOf(user);
      if (!collection.ok()) {
        failures.fetch_add(1);
        continue;
      }
      std::string body = QueryBody(QueryEmbedding(rng, static_cast<size_t>(o.dims)), UserId(user), ts_before);
      CpuMeter cpu(o.pid);  // the query alone: per-user collections are looked up above
      auto started = Clock::now();
      auto r = CallWithRetry(chroma, "/collections/" + collection.value() + "/query", body, &retries);
      ms.push_back(MsSince(started));
      cpu_total += cpu.Ms();
      if (!r.ok()) {
        failures.fetch_add(1);
        std::fprintf(stderr, "chroma_layouts: query: %s\n", r.status().message().c_str());
        continue;
      }
      std::string bad = CheckAnswer(r.value(), UserId(user), ts_before);
      if (bad == "short") {
        ++short_answers;
      } else if (!bad.empty()) {
        ++wrong;
        if (wrong <= 3) std::fprintf(stderr, "chroma_layouts: query answer: %s\n", bad.c_str());
      }
    }
    const double cpu_ms = o.pid > 0 && !ms.empty() ? cpu_total / static_cast<double>(ms.size()) : -1;
    return "{\"ms\":" + Series(std::move(ms)) + ",\"chroma_cpu_ms_per_query\":" + Num(cpu_ms) +
           ",\"short_answers\":" + std::to_string(short_answers) + ",\"wrong_answers\":" + std::to_string(wrong) +
           (ranged ? ",\"ts_lt\":" + std::to_string(ts_before) : std::string()) + "}";
  }

  // Single-turn upserts (2 records) to random users, one at a time, with ids
  // of this stage (so they add records rather than overwrite).
  std::string Adds() {
    std::mt19937_64 rng(kSeed + static_cast<uint64_t>(o.to));
    std::uniform_int_distribution<int> pick(0, o.to - 1);
    std::vector<double> ms;
    double cpu_total = 0;
    const std::string tag = "s" + std::to_string(o.to) + "-";
    for (int i = 0; i < o.adds; ++i) {
      int user = pick(rng);
      auto collection = CollectionOf(user);
      if (!collection.ok()) {
        failures.fetch_add(1);
        continue;
      }
      int j = o.messages + 2 * i;
      Record a = MakeRecord(user, j, tag, static_cast<size_t>(o.dims));
      Record b = MakeRecord(user, j + 1, tag, static_cast<size_t>(o.dims));
      std::string body = UpsertBody({&a, &b});
      CpuMeter cpu(o.pid);
      auto started = Clock::now();
      auto r = CallWithRetry(chroma, "/collections/" + collection.value() + "/upsert", body, &retries);
      ms.push_back(MsSince(started));
      cpu_total += cpu.Ms();
      if (!r.ok()) {
        failures.fetch_add(1);
        std::fprintf(stderr, "chroma_layouts: add: %s\n", r.status().message().c_str());
      }
    }
    return "{\"ms\":" + Series(std::move(ms)) + ",\"chroma_cpu_ms_per_turn\":" +
           Num(o.pid > 0 && o.adds > 0 ? cpu_total / o.adds : -1) + "}";
  }
};

std::string LoadAvg() {
  std::string s = ReadFile("/proc/loadavg");
  double a = 0, b = 0, c = 0;
  std::sscanf(s.c_str(), "%lf %lf %lf", &a, &b, &c);
  return "[" + Num(a) + "," + Num(b) + "," + Num(c) + "]";
}

bool ParseArgs(int argc, char** argv, Options& o) {
  const IntFlag<int> ints[] = {
      {"--shards", 0, 100000, &o.shards},  {"--from", 0, 10000000, &o.from}, {"--to", 1, 10000000, &o.to},
      {"--messages", 2, 10000, &o.messages}, {"--dims", 1, 4096, &o.dims},   {"--threads", 1, 64, &o.threads},
      {"--batch", 1, 10000, &o.batch},     {"--queries", 0, 1000000, &o.queries}, {"--adds", 0, 100000, &o.adds},
      {"--pid", 0, 1 << 30, &o.pid},
  };
  for (int i = 1; i < argc; ++i) {
    std::string_view flag = argv[i];
    if (i + 1 >= argc) return false;
    const char* value = argv[++i];
    const FlagParse number = ParseIntFlag(flag, value, ints);
    if (number == FlagParse::kBad) return false;
    if (number == FlagParse::kSet) continue;
    if (flag == "--url") {
      o.url = value;
    } else if (flag == "--layout") {
      o.layout = value;
    } else if (flag == "--timeout-ms") {
      if (!ParseInt(value, 1, 600000, o.timeout_ms)) return false;
    } else if (flag == "--data-dir") {
      o.data_dir = value;
    } else if (flag == "--hnsw") {
      o.hnsw_extra = value;
    } else {
      return false;
    }
  }
  return !o.url.empty() && ((o.layout == "shards" && o.shards > 0) || o.layout == "per-user") && o.to > o.from;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!ParseArgs(argc, argv, o)) {
    std::fprintf(stderr,
                 "usage: chroma_layouts --url URL --layout shards|per-user [--shards N] --to USERS [--from 0]\n"
                 "       [--messages 50] [--dims 256] [--threads 2] [--batch 128] [--queries 500] [--adds 50]\n"
                 "       [--timeout-ms 30000] [--pid PID] [--data-dir DIR] [--hnsw JSON-MEMBERS]\n");
    return 2;
  }
  if (!o.hnsw_extra.empty()) {
    // Members of an object, e.g. "sync_threshold":100: check they parse.
    rapidjson::Document d;
    if (d.Parse(("{" + o.hnsw_extra + "}").c_str()).HasParseError()) {
      std::fprintf(stderr, "chroma_layouts: --hnsw is not JSON object members\n");
      return 2;
    }
  }
  chatd::InitHttpGlobal();
  Stage stage(o);
  if (stage.Sharded()) {
    for (int s = 0; s < o.shards; ++s) {
      auto id = stage.chroma.Collection(stage.ShardName(s));
      if (!id.ok()) {
        std::fprintf(stderr, "chroma_layouts: %s\n", id.status().message().c_str());
        return 1;
      }
      stage.shard_ids[s] = id.value();
    }
  }
  const std::string loadavg_before = LoadAvg();
  const std::string load = stage.Load();
  const std::string after_load = ProcessJson(o.pid);
  const std::string query = stage.Queries(false, kSeed);
  const std::string query_ts = stage.Queries(true, kSeed + 1);
  const std::string add = stage.Adds();
  std::printf(
      "{\"layout\":\"%s\",\"shards\":%d,\"hnsw\":{\"space\":\"l2\"%s%s},\"users\":%d,\"users_before\":%d,"
      "\"messages_per_user\":%d,\"dims\":%d,\"threads\":%d,\"batch\":%d,\"loadavg_before\":%s,\"load\":%s,"
      "\"chroma_after_load\":%s,\"query\":%s,\"query_ts_range\":%s,\"add_turn\":%s,\"chroma\":%s,\"data\":%s,"
      "\"loadavg_after\":%s,\"retries\":%d,\"failures\":%d}\n",
      o.layout.c_str(), stage.Sharded() ? o.shards : o.to, o.hnsw_extra.empty() ? "" : ",", o.hnsw_extra.c_str(),
      o.to, o.from, o.messages, o.dims, o.threads, stage.Sharded() ? o.batch : o.messages, loadavg_before.c_str(),
      load.c_str(), after_load.c_str(), query.c_str(), query_ts.c_str(), add.c_str(), ProcessJson(o.pid).c_str(),
      DataJson(o.data_dir).c_str(), LoadAvg().c_str(), stage.retries.load(), stage.failures.load());
  std::fflush(stdout);
  return stage.failures.load() == 0 ? 0 : 1;
}
