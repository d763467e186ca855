// Long-term memory in Chroma (server `chroma run`, HTTP API v2): one collection
// per user (squared-L2 space over unit vectors, which ranks as cosine does),
// records addressed by message id.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "chatd/http_client.h"
#include "chatd/memory.h"
#include "chatd/status.h"

namespace chatd {

struct ChromaOptions {
  std::string base_url = "http://127.0.0.1:8000";
  int64_t timeout_ms = 1000;          // each HTTP call, whole
  int64_t connect_timeout_ms = 500;
  int sync_threshold = 100;           // HNSW persistence interval of new collections
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

// Thread-safe. Every failure to reach Chroma, or a 5xx from it, is reason
// "chroma_unavailable" (kDeadlineExceeded on a timeout, else kUnavailable); an
// embedding whose size differs from the collection's is kUnavailable with
// reason "dimension_mismatch" (retrying cannot help); another 4xx means we
// sent something wrong: kInternal "chroma_rejected". Chroma's own error text
// never reaches the Status.
class ChromaStore : public LongTermStore {
 public:
  explicit ChromaStore(ChromaOptions options);

  // A user without a collection gets an empty list; nothing is created.
  Result<std::vector<RecalledMessage>> Recall(std::string_view user_id, const std::vector<float>& embedding,
                                              size_t k, const std::vector<std::string>& exclude_ids) override;
  // Creates the user's collection on first write.
  Status Upsert(std::string_view user_id, const std::vector<StoredMessage>& messages) override;

  // For chatd-cleanup and tests.
  Result<int64_t> Count(std::string_view user_id);  // 0 when there is no collection
  Result<std::vector<StoredMessage>> ExportAll(std::string_view user_id);  // with embeddings
  Status DeleteCollection(std::string_view user_id);  // no collection is success
  Status Heartbeat();

 private:
  // The user's collection id, from the cache or from Chroma. Without `create`,
  // a missing collection is kNotFound.
  Result<std::string> CollectionId(const std::string& name, std::string_view user_id, bool create);
  void Forget(const std::string& name, const std::string& id);
  // One HTTP call, transport failures mapped to "chroma_unavailable".
  Result<HttpResponse> Call(const char* method, const std::string& url, std::string body);

  ChromaOptions options_;
  std::string base_;  // base_url without a trailing slash
  std::string api_;   // base_ + the tenant and database prefix
  std::string token_line_;  // the token header, or empty

  std::mutex mu_;
  std::unordered_map<std::string, std::string> ids_;  // collection name -> id
};

// The JSON of the Chroma API, separated from the transport so unit tests can
// check it without a server. Builders refuse invalid UTF-8 and non-finite
// floats (kInvalidArgument); parsers check every type and answer kUnavailable
// "chroma_unavailable" for a malformed body.
namespace chroma_json {

inline constexpr int64_t kMaxQueryResults = 1000;

std::string CreateCollectionRequest(std::string_view name, std::string_view user_id, int sync_threshold);
// The collection's id, which must look like a UUID (it becomes part of URLs).
Result<std::string> ParseCollectionId(std::string_view body);

Result<std::string> UpsertRequest(std::string_view user_id, const std::vector<StoredMessage>& messages);
Result<std::string> QueryRequest(const std::vector<float>& embedding, int64_t n_results);
std::string GetPageRequest(int64_t limit, int64_t offset);

// Records of a /query answer for one query embedding, nearest first. Records
// whose metadata names another user are refused (reason "chroma_foreign_record").
Result<std::vector<RecalledMessage>> ParseQueryResponse(std::string_view body, std::string_view user_id);
// Records of a /get answer that included documents, metadatas and embeddings.
Result<std::vector<StoredMessage>> ParseGetResponse(std::string_view body, std::string_view user_id);
// /count answers a bare integer.
Result<int64_t> ParseCount(std::string_view body);

// The Status for a non-2xx answer of Chroma; `what` names the call.
Status ErrorFromResponse(long http_status, std::string_view body, std::string_view what);

}  // namespace chroma_json

}  // namespace chatd
