// The JSON codec of the Chroma API (HTTP API v2), without the transport.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/memory.h"
#include "chatd/status.h"

namespace chatd {

// The JSON of the Chroma API, separated from the transport so unit tests can
// check it without a server. Builders refuse invalid UTF-8 and non-finite
// floats (kInvalidArgument); parsers check every type and answer kUnavailable
// "chroma_unavailable" for a malformed body.
namespace chroma_json {

inline constexpr int64_t kMaxQueryResults = 1000;

// How Chroma builds a new collection's HNSW graph. Chroma fixes these when it
// creates the collection; get_or_create on an existing one keeps its own.
struct HnswBuild {
  int sync_threshold = 1000;
  int max_neighbors = 8;
  int ef_construction = 40;
};

// `name` with get_or_create, the l2 space and `hnsw`.
std::string CreateCollectionRequest(std::string_view name, const HnswBuild& hnsw);
// The collection's id, which must look like a UUID (it becomes part of URLs).
Result<std::string> ParseCollectionId(std::string_view body);
// Names of a GET /collections page.
Result<std::vector<std::string>> ParseCollectionNames(std::string_view body);

// The record id of a message in a shared collection: "<user>/<message id>".
std::string RecordId(std::string_view user_id, std::string_view message_id);

// Messages of any users; each names its user.
Result<std::string> UpsertRequest(const std::vector<StoredMessage>& messages);
// A query within one user's records. No time range: Chroma 1.5.9 evaluates a
// range filter over every record of the database, whatever the collection
// (measured: 1.3 s at 500k records), so older messages are found by
// excluding the newer ones by id instead.
Result<std::string> QueryRequest(const std::vector<float>& embedding, int64_t n_results, std::string_view user_id);
// A page of one user's records (user_id empty: every record, for the old
// per-user collections). Ids and metadatas always; documents and embeddings
// when `full`.
std::string GetPageRequest(std::string_view user_id, int64_t limit, int64_t offset, bool full);
std::string DeleteIdsRequest(const std::vector<std::string>& record_ids);
// These records of one user, by id and with the user filter, with documents
// and metadatas.
Result<std::string> GetIdsRequest(std::string_view user_id, const std::vector<std::string>& record_ids);
// These records by id alone, with documents, metadatas and embeddings. No
// user filter: Chroma 1.5.9 evaluates one by joining over the shard's
// metadata, which costs more than the lookups themselves; ids name their user,
// and ParseGetResponse checks every record's user anyway.
Result<std::string> GetIdsWithEmbeddingsRequest(const std::vector<std::string>& record_ids);

// Records of a /query answer for one query embedding, nearest first. Records
// of another user (by metadata or id) are dropped and counted.
Result<RecallResult> ParseQueryResponse(std::string_view body, std::string_view user_id);
// Records of a /get answer; with `full`, documents and embeddings too.
// Records of other users are skipped and counted in `*foreign`. `raw_ids`
// gets the record ids as stored (for deletes).
Result<std::vector<StoredMessage>> ParseGetResponse(std::string_view body, std::string_view user_id, bool full,
                                                    size_t* foreign, std::vector<std::string>* raw_ids,
                                                    size_t* page_size);
// Records of a /get answer with documents but no embeddings (GetIdsRequest).
Result<std::vector<StoredMessage>> ParseGetDocumentsResponse(std::string_view body, std::string_view user_id,
                                                             size_t* foreign);
// /count answers a bare integer.
Result<int64_t> ParseCount(std::string_view body);

// The Status for a non-2xx answer of Chroma; `what` names the call.
Status ErrorFromResponse(long http_status, std::string_view body, std::string_view what);

}  // namespace chroma_json

}  // namespace chatd
