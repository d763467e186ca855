#include "chroma.h"

#include <algorithm>
#include <charconv>
#include <string>
#include <unordered_set>
#include <utility>

#include "chatd/user_id.h"
#include "chroma_json.h"
#include "recall.h"

namespace chatd {

namespace {

// Each /get page carries up to this many records with their embeddings: at
// 1536 dimensions a page stays around 2 MB, far below the response cap.
constexpr int64_t kExportPageSize = 100;
// Upserts are split so one request stays far below Chroma's batch and body
// limits even with large embeddings.
constexpr size_t kMaxUpsertBatch = 256;
// Ids-only pages (counts and deletes) are small: 1,000 ids is about 60 kB.
constexpr int64_t kIdPageSize = 1000;
// What Chroma 1.5.9 answers (500) when asked to read a collection that has
// never been written to.
constexpr char kNoSegmentOnDisk[] = "Nothing found on disk";
// Collections listed per page when looking for the old per-user layout.
constexpr int64_t kListPageSize = 100;

// The collection behind a cached id no longer exists: 404, or 412 "Missing
// metadata segment" while a concurrent delete is still under way (1.5.9).
bool CollectionGone(const HttpResponse& response) { return response.status == 404 || response.status == 412; }

Status HttpError(const HttpResponse& response, std::string_view what) {
  return chroma_json::ErrorFromResponse(response.status, response.body, what);
}

}  // namespace

int ChromaShardOf(std::string_view user_id, int shards) {
  // FNV-1a 64: simple, well spread over short ids, and fixed forever.
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : user_id) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return static_cast<int>(h % static_cast<uint64_t>(shards));
}

std::string ChromaShardName(int shard, int shards) {
  // The shard count is part of the name, so a deployment that changes it
  // starts on new collections instead of looking for users in the wrong one.
  return "chatd-s" + std::to_string(shards) + "-" + std::to_string(shard);
}

ChromaStore::ChromaStore(ChromaOptions options) : options_(std::move(options)) {
  base_ = options_.base_url;
  while (!base_.empty() && base_.back() == '/') base_.pop_back();
  api_ = base_ + "/api/v2/tenants/" + options_.tenant + "/databases/" + options_.database;
  options_.shards = std::clamp(options_.shards, 1, kMaxChromaShards);
  shard_ids_.resize(static_cast<size_t>(options_.shards));
  if (!options_.token.empty()) {
    token_line_ = options_.token_header == "Authorization" ? "Authorization: Bearer " + options_.token
                                                          : options_.token_header + ": " + options_.token;
  }
}

Result<HttpResponse> ChromaStore::Call(const char* method, const std::string& url, std::string body) {
  HttpCall call;
  call.method = method;
  call.url = url;
  call.body = std::move(body);
  if (!call.body.empty()) call.headers.push_back("Content-Type: application/json");
  if (!token_line_.empty()) call.headers.push_back(token_line_);
  call.connect_timeout_ms = options_.connect_timeout_ms;
  call.timeout_ms = options_.timeout_ms;
  if (options_.call_counter != nullptr) options_.call_counter->fetch_add(1, std::memory_order_relaxed);
  auto response = ThreadHttpClient().Send(call);
  if (response.ok()) return response;
  // "unreachable", not "unavailable": no answer at all says nothing about
  // what we sent, which the indexer needs to know (indexer.h).
  if (response.status().code() == Code::kDeadlineExceeded) {
    return Status(Code::kDeadlineExceeded, "chroma_unreachable",
                  "Chroma did not answer within " + std::to_string(options_.timeout_ms) + " ms");
  }
  return Unavailable("chroma_unreachable", "Chroma unreachable: " + response.status().message());
}

Result<std::string> ChromaStore::ShardId(int shard) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const std::string& cached = shard_ids_[static_cast<size_t>(shard)];
    if (!cached.empty()) return cached;
  }
  // get_or_create: shards are shared, so whoever comes first creates one,
  // and an empty shard costs nothing.
  auto response = Call("POST", api_ + "/collections",
                       chroma_json::CreateCollectionRequest(ChromaShardName(shard, options_.shards), options_.hnsw));
  if (!response.ok()) return response.status();
  if (response->status != 200) return HttpError(*response, "create collection");
  auto id = chroma_json::ParseCollectionId(response->body);
  if (!id.ok()) return id.status();
  std::lock_guard<std::mutex> lock(mu_);
  shard_ids_[static_cast<size_t>(shard)] = id.value();
  return id;
}

void ChromaStore::ForgetShard(int shard, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  // Another thread may have cached the new id already: keep that one.
  std::string& cached = shard_ids_[static_cast<size_t>(shard)];
  if (cached == id) cached.clear();
}

Result<HttpResponse> ChromaStore::ShardCall(int shard, const char* suffix, const std::string& body,
                                            const char* method) {
  // A second round only when the cached collection was deleted under us
  // (an operator dropped it): it is created again, empty.
  for (int attempt = 0;; ++attempt) {
    auto id = ShardId(shard);
    if (!id.ok()) return id.status();
    auto response = Call(method, api_ + "/collections/" + id.value() + suffix, body);
    if (!response.ok() || !CollectionGone(*response) || attempt == 1) return response;
    ForgetShard(shard, id.value());
  }
}

Result<bool> ChromaStore::UnwrittenShard(int shard, const HttpResponse& read) {
  if (read.status == 200 || read.body.find(kNoSegmentOnDisk) == std::string::npos) return false;
  // Chroma 1.5.9 cannot read a shard nothing was written to yet. Only a count
  // of zero makes that "no records"; anything else stays an error.
  auto count = ShardCall(shard, "/count", "", "GET");
  if (!count.ok()) return count.status();
  if (count->status != 200) return false;
  auto n = chroma_json::ParseCount(count->body);
  return n.ok() && *n == 0;
}

Result<std::optional<HttpResponse>> ChromaStore::LegacyCall(const UserId& user_id, const char* suffix,
                                                            const std::string& body) {
  auto found = Call("GET", api_ + "/collections/" + ChromaCollectionName(user_id), "");
  if (!found.ok()) return found.status();
  if (found->status == 404) return std::optional<HttpResponse>();
  if (found->status != 200) return HttpError(*found, "get collection");
  auto id = chroma_json::ParseCollectionId(found->body);
  if (!id.ok()) return id.status();
  auto response = Call("POST", api_ + "/collections/" + id.value() + suffix, body);
  if (!response.ok()) return response.status();
  if (CollectionGone(*response)) return std::optional<HttpResponse>();
  return std::optional<HttpResponse>(std::move(response).value());
}

Result<RecallResult> ChromaStore::Recall(const UserId& user_id, const std::vector<float>& embedding, size_t k,
                                         const std::vector<std::string>& exclude_ids) {
  if (k == 0) return RecallResult{};
  const int64_t n_results = std::min<int64_t>(static_cast<int64_t>(k + exclude_ids.size()),
                                              chroma_json::kMaxQueryResults);
  auto body = chroma_json::QueryRequest(embedding, n_results, user_id);
  if (!body.ok()) return body.status();
  auto response = ShardCall(ChromaShardOf(user_id, options_.shards), "/query", body.value());
  if (!response.ok()) return response.status();
  if (response->status != 200) return HttpError(*response, "query");
  auto records = chroma_json::ParseQueryResponse(response->body, user_id);
  if (!records.ok()) return records.status();

  const std::unordered_set<std::string_view> excluded(exclude_ids.begin(), exclude_ids.end());
  RecallResult out;
  out.foreign_dropped = records->foreign_dropped;
  out.messages.reserve(k);
  for (RecalledMessage& r : records->messages) {
    if (out.messages.size() == k) break;
    if (excluded.count(r.message.id) == 0) out.messages.push_back(std::move(r));
  }
  return out;
}

Result<std::optional<std::string>> ChromaStore::GetByIds(const UserId& user_id,
                                                         const std::vector<std::string>& message_ids,
                                                         bool with_embeddings) {
  std::vector<std::string> ids;
  ids.reserve(message_ids.size());
  for (const std::string& id : message_ids) ids.push_back(chroma_json::RecordId(user_id, id));
  auto request = with_embeddings ? chroma_json::GetIdsWithEmbeddingsRequest(ids)
                                 : chroma_json::GetIdsRequest(user_id, ids);
  if (!request.ok()) return request.status();
  const int shard = ChromaShardOf(user_id, options_.shards);
  auto response = ShardCall(shard, "/get", *request);
  if (!response.ok()) return response.status();
  if (response->status != 200) {
    // A failed count leaves the read's own error, which says more.
    auto unwritten = UnwrittenShard(shard, *response);
    if (unwritten.ok() && *unwritten) return std::optional<std::string>();
    return HttpError(*response, "get");
  }
  return std::optional<std::string>(std::move(response->body));
}

Result<RecallResult> ChromaStore::RecallAmong(const UserId& user_id, const std::vector<float>& embedding,
                                              size_t k, const std::vector<std::string>& message_ids) {
  RecallResult out;
  if (k == 0 || message_ids.empty()) return out;
  auto body = GetByIds(user_id, message_ids, /*with_embeddings=*/true);
  if (!body.ok()) return body.status();
  if (!body->has_value()) return out;  // a shard nothing was written to
  auto records = chroma_json::ParseGetResponse(**body, user_id, /*full=*/true, &out.foreign_dropped, nullptr,
                                               nullptr);
  if (!records.ok()) return records.status();
  out.messages.reserve(records->size());
  for (StoredMessage& m : *records) {
    const double distance = SquaredL2(m.embedding, embedding);
    m.embedding = {};  // the prompt needs the text only
    out.messages.push_back({std::move(m), distance});
  }
  const auto nearer = [](const RecalledMessage& a, const RecalledMessage& b) { return a.distance < b.distance; };
  const size_t keep = std::min(k, out.messages.size());
  std::partial_sort(out.messages.begin(), out.messages.begin() + static_cast<std::ptrdiff_t>(keep),
                    out.messages.end(), nearer);
  out.messages.resize(keep);
  return out;
}

Status ChromaStore::Upsert(const std::vector<StoredMessage>& messages) {
  std::vector<std::vector<const StoredMessage*>> by_shard(static_cast<size_t>(options_.shards));
  for (const StoredMessage& m : messages) {
    by_shard[static_cast<size_t>(ChromaShardOf(m.user_id, options_.shards))].push_back(&m);
  }
  for (int shard = 0; shard < options_.shards; ++shard) {
    const auto& list = by_shard[static_cast<size_t>(shard)];
    for (size_t start = 0; start < list.size(); start += kMaxUpsertBatch) {
      std::vector<StoredMessage> batch;
      for (size_t i = start; i < std::min(list.size(), start + kMaxUpsertBatch); ++i) batch.push_back(*list[i]);
      auto body = chroma_json::UpsertRequest(batch);
      if (!body.ok()) return body.status();
      auto response = ShardCall(shard, "/upsert", body.value());
      if (!response.ok()) return response.status();
      if (response->status != 200 && response->status != 201) return HttpError(*response, "upsert");
    }
  }
  return Status::Ok();
}

Result<std::vector<StoredMessage>> ChromaStore::ReadUser(const UserId& user_id, bool with_embeddings) {
  const int shard = ChromaShardOf(user_id, options_.shards);
  std::vector<StoredMessage> out;
  const int64_t page = with_embeddings ? kExportPageSize : kIdPageSize;
  // Offsets count the records the filter matched; nothing of this user is
  // written meanwhile (the cleanup holds the user's lock), so pages are stable.
  for (int64_t offset = 0;; offset += page) {
    auto response = ShardCall(shard, "/get", chroma_json::GetPageRequest(user_id, page, offset, with_embeddings));
    if (!response.ok()) return response.status();
    if (offset == 0) {
      auto unwritten = UnwrittenShard(shard, *response);
      if (!unwritten.ok()) return unwritten.status();
      if (*unwritten) return out;
    }
    if (response->status != 200) return HttpError(*response, "get");
    size_t foreign = 0, got = 0;
    auto records = chroma_json::ParseGetResponse(response->body, user_id, with_embeddings, &foreign, nullptr, &got);
    if (!records.ok()) return records.status();
    if (foreign > 0) {
      // The filter was ignored: offsets no longer count this user's records,
      // so no exact answer can be built from these pages.
      return Status(Code::kInternal, "chroma_foreign_record", "Chroma returned records of other users");
    }
    for (StoredMessage& m : records.value()) out.push_back(std::move(m));
    if (static_cast<int64_t>(got) < page) break;
  }
  return out;
}

Result<int64_t> ChromaStore::Count(const UserId& user_id) {
  auto records = ReadUser(user_id, /*with_embeddings=*/false);
  if (!records.ok()) return records.status();
  return static_cast<int64_t>(records->size());
}

Result<std::vector<StoredMessage>> ChromaStore::ListMessages(const UserId& user_id) {
  return ReadUser(user_id, /*with_embeddings=*/false);
}

Result<std::vector<StoredMessage>> ChromaStore::ExportAll(const UserId& user_id) {
  return ReadUser(user_id, /*with_embeddings=*/true);
}

Result<std::vector<StoredMessage>> ChromaStore::GetMessages(const UserId& user_id,
                                                           const std::vector<std::string>& message_ids) {
  std::vector<StoredMessage> out;
  if (message_ids.empty()) return out;
  auto body = GetByIds(user_id, message_ids, /*with_embeddings=*/false);
  if (!body.ok()) return body.status();
  if (!body->has_value()) return out;  // a shard nothing was written to
  size_t foreign = 0;
  auto records = chroma_json::ParseGetDocumentsResponse(**body, user_id, &foreign);
  if (!records.ok()) return records.status();
  if (foreign > 0) return Status(Code::kInternal, "chroma_foreign_record", "Chroma returned records of other users");
  return records;
}

Result<int64_t> ChromaStore::DeleteUser(const UserId& user_id, std::vector<std::string>* deleted_ids) {
  auto records = ReadUser(user_id, /*with_embeddings=*/false);
  if (!records.ok()) return records.status();
  if (deleted_ids != nullptr) {
    for (const StoredMessage& m : *records) deleted_ids->push_back(m.id);
  }
  const int shard = ChromaShardOf(user_id, options_.shards);
  // By id, never by a filter: ids we built and checked name only this user.
  for (size_t start = 0; start < records->size(); start += kMaxUpsertBatch) {
    std::vector<std::string> ids;
    for (size_t i = start; i < std::min(records->size(), start + kMaxUpsertBatch); ++i) {
      ids.push_back(chroma_json::RecordId(user_id, (*records)[i].id));
    }
    auto response = ShardCall(shard, "/delete", chroma_json::DeleteIdsRequest(ids));
    if (!response.ok()) return response.status();
    if (response->status != 200) return HttpError(*response, "delete");
  }
  auto left = Count(user_id);
  if (!left.ok()) return left.status();
  if (*left != 0) return Unavailable("chroma_unavailable", "records of the user remained after the delete");
  return static_cast<int64_t>(records->size());
}

Status ChromaStore::Heartbeat() {
  auto response = Call("GET", base_ + "/api/v2/heartbeat", "");
  if (!response.ok()) return response.status();
  if (response->status != 200) return HttpError(*response, "heartbeat");
  return Status::Ok();
}

Result<std::vector<UserId>> ChromaStore::ListLegacyUsers(size_t limit) {
  std::vector<UserId> users;
  static constexpr std::string_view kLegacyPrefix = "chatd-u-";
  for (int64_t offset = 0; users.size() < limit; offset += kListPageSize) {
    auto response = Call("GET", api_ + "/collections?limit=" + std::to_string(kListPageSize) +
                                    "&offset=" + std::to_string(offset), "");
    if (!response.ok()) return response.status();
    if (response->status != 200) return HttpError(*response, "list collections");
    auto names = chroma_json::ParseCollectionNames(response->body);
    if (!names.ok()) return names.status();
    for (const std::string& name : *names) {
      if (name.rfind(kLegacyPrefix, 0) != 0) continue;
      std::string user;
      std::string_view hex = std::string_view(name).substr(kLegacyPrefix.size());
      bool ok = hex.size() % 2 == 0 && !hex.empty();
      for (size_t i = 0; ok && i < hex.size(); i += 2) {
        unsigned value = 0;
        auto [end, ec] = std::from_chars(hex.data() + i, hex.data() + i + 2, value, 16);
        ok = ec == std::errc() && end == hex.data() + i + 2;
        user.push_back(static_cast<char>(value));
      }
      // Only names this mapping produces from a valid id: anything else is not ours.
      std::optional<UserId> id = ok ? UserId::Parse(user) : std::nullopt;
      if (id && ChromaCollectionName(*id) == name) users.push_back(std::move(*id));
      if (users.size() == limit) break;
    }
    if (static_cast<int64_t>(names->size()) < kListPageSize) break;
  }
  return users;
}

Result<std::vector<StoredMessage>> ChromaStore::ExportLegacy(const UserId& user_id) {
  std::vector<StoredMessage> out;
  for (int64_t offset = 0;; offset += kExportPageSize) {
    auto response = LegacyCall(user_id, "/get", chroma_json::GetPageRequest("", kExportPageSize, offset, true));
    if (!response.ok()) return response.status();
    if (!response->has_value()) {
      // Gone mid-read: a partial export must not pass for a whole one.
      if (offset > 0) return Unavailable("chroma_unavailable", "the collection was deleted while being read");
      return out;
    }
    const HttpResponse& r = **response;
    if (r.status != 200) return HttpError(r, "export");
    size_t foreign = 0, got = 0;
    auto page = chroma_json::ParseGetResponse(r.body, user_id, true, &foreign, nullptr, &got);
    if (!page.ok()) return page.status();
    if (foreign > 0) return Internal("chroma_foreign_record", "a per-user collection holds another user's record");
    for (StoredMessage& m : page.value()) out.push_back(std::move(m));
    if (static_cast<int64_t>(got) < kExportPageSize) break;
  }
  return out;
}

Status ChromaStore::DeleteLegacy(const UserId& user_id) {
  auto response = Call("DELETE", api_ + "/collections/" + ChromaCollectionName(user_id), "");
  if (!response.ok()) return response.status();
  if (response->status != 200 && response->status != 404) return HttpError(*response, "delete collection");
  return Status::Ok();
}

}  // namespace chatd
