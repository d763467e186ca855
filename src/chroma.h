// Long-term memory in Chroma (server `chroma run`, HTTP API v2).
//
// Layout: a fixed number of shard collections, "chatd-s<N>-<i>", i = a hash of
// the user id modulo N (CHATD_CHROMA_SHARDS). Records of many users share a
// shard; each carries its user in the metadata and in its id
// ("<user>/<turn>:u|a"), every query and read filters on the user, and every
// record that comes back is checked against the caller anyway, so a store
// that ignored the filter would still leak nothing. Why shards and not one
// collection per user: Chroma's write cost grows with the number of
// collections (docs/performance.md), while a shard's grows with its records
// only slowly. Space "l2" over unit vectors, which ranks as cosine does.
//
// The previous layout, one collection per user ("chatd-u-<hex of the id>"),
// is still readable for `chatd-cleanup migrate` (the Legacy* calls).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "chroma_json.h"
#include "http_client.h"
#include "chatd/memory.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

inline constexpr int kDefaultChromaShards = 16;
inline constexpr int kMaxChromaShards = 4096;

struct ChromaOptions {
  std::string base_url = "http://127.0.0.1:8000";
  int64_t timeout_ms = 1000;          // each HTTP call, whole
  int64_t connect_timeout_ms = 500;
  // How new shard collections build their HNSW graph. chatd only ever searches
  // with a `where user` filter, for which a sparser graph found the same
  // records; building the graph was half of Chroma's CPU per record written
  // (docs/memory.md).
  chroma_json::HnswBuild hnsw;
  int shards = kDefaultChromaShards;  // fixed for a deployment: changing it needs a migration
  // Incremented once per HTTP call to Chroma (may be null): the benchmark
  // reports Chroma calls per chat request from the pool's metrics.
  std::atomic<uint64_t>* call_counter = nullptr;
  // Where the collections live; both must exist (the operator creates them).
  // Validated by LoadConfig: they become URL path segments.
  std::string tenant = "default_tenant";
  std::string database = "default_database";
  // Sent on every call when not empty: "Authorization: Bearer <token>", or
  // "<token_header>: <token>" for another header name (X-Chroma-Token).
  std::string token;
  std::string token_header = "Authorization";
};

// The shard of a user: FNV-1a 64 of the id's bytes, modulo `shards`. Stable
// across builds and hosts, since it decides where records live.
int ChromaShardOf(std::string_view user_id, int shards);
std::string ChromaShardName(int shard, int shards);

// Thread-safe. A failure to reach Chroma is reason "chroma_unreachable"
// (kDeadlineExceeded on a timeout, else kUnavailable); a 5xx, 408, 412 or 429
// answer is kUnavailable "chroma_unavailable"; an
// embedding whose size differs from the collection's is kUnavailable with
// reason "dimension_mismatch" (retrying cannot help); another 4xx means we
// sent something wrong: kInternal "chroma_rejected". Chroma's own error text
// never reaches the Status.
class ChromaStore : public LongTermStore {
 public:
  explicit ChromaStore(ChromaOptions options);

  Result<RecallResult> Recall(const UserId& user_id, const std::vector<float>& embedding, size_t k,
                              const std::vector<std::string>& exclude_ids) override;
  // One /get by id with embeddings, ranked here by the distance Chroma's "l2"
  // space uses.
  Result<RecallResult> RecallAmong(const UserId& user_id, const std::vector<float>& embedding, size_t k,
                                   const std::vector<std::string>& message_ids) override;
  // One call per shard touched (in chunks of a bounded size).
  Status Upsert(const std::vector<StoredMessage>& messages) override;

  // For chatd-cleanup and tests: exact per-user reads and deletes. They read
  // with a filter on the user and then keep only records whose metadata and
  // id both name the user, so a filter Chroma ignored can neither export nor
  // delete another user's records.
  Result<int64_t> Count(const UserId& user_id);
  Result<std::vector<StoredMessage>> ExportAll(const UserId& user_id);  // with embeddings
  Result<std::vector<StoredMessage>> ListMessages(const UserId& user_id);  // ids and metadata only
  // Deletes by id what ExportAll-style reads found, then checks the count is 0.
  // Returns how many records were deleted; their message ids go to
  // `deleted_ids` when given.
  Result<int64_t> DeleteUser(const UserId& user_id, std::vector<std::string>* deleted_ids = nullptr);
  // The user's messages of these message ids ("<turn>:u|a"), with documents,
  // no embeddings: one call, by id and filtered on the user. Ids it does not
  // hold are simply absent. For the history, a page at a time.
  Result<std::vector<StoredMessage>> GetMessages(const UserId& user_id, const std::vector<std::string>& message_ids);
  Status Heartbeat();

  // The per-user layout, for `chatd-cleanup migrate`. Users whose collection
  // still exists, up to `limit` of them (a migrated user's is deleted).
  Result<std::vector<UserId>> ListLegacyUsers(size_t limit);
  Result<std::vector<StoredMessage>> ExportLegacy(const UserId& user_id);
  Status DeleteLegacy(const UserId& user_id);  // no collection is success

 private:
  // One call on the user's shard collection, whose id is resolved (and the
  // collection created) on first use and resolved again once if Chroma says
  // it is gone. `suffix` is the record endpoint ("/query", "/get", ...).
  Result<HttpResponse> ShardCall(int shard, const char* suffix, const std::string& body,
                                 const char* method = "POST");
  // One /get of these message ids of the user: with embeddings and no user
  // filter (recall), or without them and filtered (the history). The body,
  // or nullopt when the user's shard holds nothing yet.
  Result<std::optional<std::string>> GetByIds(const UserId& user_id, const std::vector<std::string>& message_ids,
                                              bool with_embeddings);
  // Whether a failed read of `shard` only means nothing was ever written to
  // it (then the user has no records there).
  Result<bool> UnwrittenShard(int shard, const HttpResponse& read);
  // The same on a per-user collection of the old layout; nullopt when it does
  // not exist.
  Result<std::optional<HttpResponse>> LegacyCall(const UserId& user_id, const char* suffix,
                                                 const std::string& body);
  // Every record of the user on its shard (filtered, checked), paged.
  Result<std::vector<StoredMessage>> ReadUser(const UserId& user_id, bool with_embeddings);
  Result<std::string> ShardId(int shard);
  void ForgetShard(int shard, const std::string& id);
  // One HTTP call, transport failures mapped to "chroma_unavailable".
  Result<HttpResponse> Call(const char* method, const std::string& url, std::string body);

  ChromaOptions options_;
  std::string base_;  // base_url without a trailing slash
  std::string api_;   // base_ + the tenant and database prefix
  std::string token_line_;  // the token header, or empty

  std::mutex mu_;
  std::vector<std::string> shard_ids_;  // guarded by mu_; empty until resolved
};

}  // namespace chatd
