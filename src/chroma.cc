#include "chatd/chroma.h"

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cctype>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <string>
#include <unordered_set>
#include <utility>

#include "chatd/json.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// Each /get page carries up to this many records with their embeddings: at
// 1536 dimensions a page stays around 2 MB, far below the response cap.
constexpr int64_t kExportPageSize = 100;
// Upserts are split so one request stays far below Chroma's batch and body
// limits even with large embeddings.
constexpr size_t kMaxUpsertBatch = 256;
constexpr size_t kUuidLength = 36;

// Our metadata vocabulary in Chroma. It is a storage format: changing a name
// orphans every record already written.
constexpr char kMetaRole[] = "role";
constexpr char kMetaTs[] = "ts";
constexpr char kMetaUser[] = "user";
constexpr char kMetaTurn[] = "turn";
constexpr char kRoleUser[] = "user";
constexpr char kRoleAssistant[] = "assistant";

using JsonWriter = rapidjson::Writer<rapidjson::StringBuffer, rapidjson::UTF8<>, rapidjson::UTF8<>,
                                     rapidjson::CrtAllocator, rapidjson::kWriteValidateEncodingFlag>;
constexpr unsigned kParseFlags = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag;

Status BadResponse(std::string message) {
  return Unavailable("chroma_unavailable", "malformed Chroma answer: " + std::move(message));
}

bool WriteString(JsonWriter& w, std::string_view s) {
  return w.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
}

// Shortest text that reads back as the same float: about half the bytes of
// Writer::Double, which prints the widened double with 17 digits.
bool WriteFloat(JsonWriter& w, float x) {
  if (!std::isfinite(x)) return false;
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), x);
  if (ec != std::errc()) return false;
  return w.RawValue(buf, static_cast<size_t>(end - buf), rapidjson::kNumberType);
}

bool WriteVector(JsonWriter& w, const std::vector<float>& v) {
  bool ok = w.StartArray();
  for (float x : v) ok = ok && WriteFloat(w, x);
  return ok && w.EndArray();
}

std::string Finish(const rapidjson::StringBuffer& buffer) {
  return std::string(buffer.GetString(), buffer.GetSize());
}

bool IsUuid(std::string_view s) {
  if (s.size() != kUuidLength) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? s[i] != '-' : !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
  }
  return true;
}

std::string_view View(const rapidjson::Value& v) {
  return std::string_view(v.GetString(), v.GetStringLength());
}

// An array member of `obj`, or nullptr.
const rapidjson::Value* ArrayMember(const rapidjson::Value& obj, const char* name) {
  auto it = obj.FindMember(name);
  if (it == obj.MemberEnd() || !it->value.IsArray()) return nullptr;
  return &it->value;
}

// Our metadata back into a StoredMessage; refuses another user's record, so a
// mix-up below us can never hand one user's memory to another.
Status ReadMetadata(const rapidjson::Value& meta, std::string_view user_id, StoredMessage& out) {
  if (!meta.IsObject()) return BadResponse("metadata is not an object");
  auto role = meta.FindMember(kMetaRole);
  if (role == meta.MemberEnd() || !role->value.IsString()) return BadResponse("metadata has no role");
  if (View(role->value) == kRoleUser) {
    out.role = Role::kUser;
  } else if (View(role->value) == kRoleAssistant) {
    out.role = Role::kAssistant;
  } else {
    return BadResponse("metadata has an unknown role");
  }
  auto ts = meta.FindMember(kMetaTs);
  if (ts == meta.MemberEnd() || !ts->value.IsInt64()) return BadResponse("metadata has no integer ts");
  out.ts_ms = ts->value.GetInt64();
  auto turn = meta.FindMember(kMetaTurn);
  if (turn == meta.MemberEnd() || !turn->value.IsString()) return BadResponse("metadata has no turn");
  out.turn_id.assign(View(turn->value));
  auto user = meta.FindMember(kMetaUser);
  if (user == meta.MemberEnd() || !user->value.IsString()) return BadResponse("metadata has no user");
  if (View(user->value) != user_id) {
    return Status(Code::kInternal, "chroma_foreign_record", "a Chroma record belongs to another user");
  }
  out.user_id.assign(user_id);
  return Status::Ok();
}

Result<std::vector<float>> ReadVector(const rapidjson::Value& v) {
  if (!v.IsArray()) return BadResponse("embedding is not an array");
  std::vector<float> out;
  out.reserve(v.Size());
  for (const auto& x : v.GetArray()) {
    if (!x.IsNumber()) return BadResponse("embedding holds a non-number");
    float f;
    if (!JsonToFloat(x.GetDouble(), &f)) return BadResponse("embedding value out of float range");
    out.push_back(f);
  }
  return out;
}

}  // namespace

namespace chroma_json {

std::string CreateCollectionRequest(std::string_view name, std::string_view user_id, int sync_threshold) {
  rapidjson::StringBuffer buffer;
  JsonWriter w(buffer);
  w.StartObject();
  w.Key("name");
  WriteString(w, name);
  w.Key("get_or_create");
  w.Bool(true);
  w.Key("configuration");
  w.StartObject();
  w.Key("hnsw");
  w.StartObject();
  w.Key("space");
  // Squared L2 ranks our unit-length vectors exactly as cosine would (|a-b|^2
  // = 2 - 2cos), and unlike cosine Chroma then stores them untouched, so an
  // archive and its restore are bit-exact.
  w.String("l2");
  w.Key("sync_threshold");
  w.Int(sync_threshold);
  w.EndObject();
  w.EndObject();
  w.Key("metadata");
  w.StartObject();
  w.Key("chatd_user");
  WriteString(w, user_id);  // valid user ids are ASCII, so this cannot fail
  w.EndObject();
  w.EndObject();
  return Finish(buffer);
}

Result<std::string> ParseCollectionId(std::string_view body) {
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsObject()) return BadResponse("collection is not a JSON object");
  auto id = doc.FindMember("id");
  if (id == doc.MemberEnd() || !id->value.IsString() || !IsUuid(View(id->value))) {
    return BadResponse("collection has no UUID id");
  }
  return std::string(View(id->value));
}

Result<std::string> UpsertRequest(std::string_view user_id, const std::vector<StoredMessage>& messages) {
  for (const StoredMessage& m : messages) {
    if (m.id.empty()) return InvalidArgument("missing_id", "a long-term record has no id");
    if (m.embedding.empty()) {
      return InvalidArgument("missing_embedding", "a long-term record has no embedding");
    }
    if (!m.user_id.empty() && m.user_id != user_id) {
      return InvalidArgument("wrong_user", "a long-term record belongs to another user");
    }
  }
  rapidjson::StringBuffer buffer;
  JsonWriter w(buffer);
  bool ok = w.StartObject();
  ok = ok && w.Key("ids") && w.StartArray();
  for (const StoredMessage& m : messages) ok = ok && WriteString(w, m.id);
  ok = ok && w.EndArray();
  ok = ok && w.Key("embeddings") && w.StartArray();
  for (const StoredMessage& m : messages) ok = ok && WriteVector(w, m.embedding);
  ok = ok && w.EndArray();
  if (!ok) return InvalidArgument("bad_embedding", "an embedding holds a value that is not a finite number");
  ok = w.Key("documents") && w.StartArray();
  for (const StoredMessage& m : messages) ok = ok && WriteString(w, m.content);
  ok = ok && w.EndArray();
  ok = ok && w.Key("metadatas") && w.StartArray();
  for (const StoredMessage& m : messages) {
    ok = ok && w.StartObject();
    ok = ok && w.Key(kMetaRole) && w.String(m.role == Role::kUser ? kRoleUser : kRoleAssistant);
    ok = ok && w.Key(kMetaTs) && w.Int64(m.ts_ms);
    ok = ok && w.Key(kMetaUser) && WriteString(w, user_id);
    ok = ok && w.Key(kMetaTurn) && WriteString(w, m.turn_id);
    ok = ok && w.EndObject();
  }
  ok = ok && w.EndArray() && w.EndObject();
  if (!ok) return InvalidArgument("invalid_utf8", "a long-term record is not valid UTF-8");
  return Finish(buffer);
}

Result<std::string> QueryRequest(const std::vector<float>& embedding, int64_t n_results) {
  if (embedding.empty()) return InvalidArgument("missing_embedding", "recall needs an embedding");
  rapidjson::StringBuffer buffer;
  JsonWriter w(buffer);
  bool ok = w.StartObject() && w.Key("query_embeddings") && w.StartArray() && WriteVector(w, embedding) &&
            w.EndArray();
  ok = ok && w.Key("n_results") && w.Int64(n_results);
  ok = ok && w.Key("include") && w.StartArray() && w.String("documents") && w.String("metadatas") &&
       w.String("distances") && w.EndArray();
  ok = ok && w.EndObject();
  if (!ok) return InvalidArgument("bad_embedding", "the embedding holds a value that is not a finite number");
  return Finish(buffer);
}

std::string GetPageRequest(int64_t limit, int64_t offset) {
  rapidjson::StringBuffer buffer;
  JsonWriter w(buffer);
  w.StartObject();
  w.Key("limit");
  w.Int64(limit);
  w.Key("offset");
  w.Int64(offset);
  w.Key("include");
  w.StartArray();
  w.String("documents");
  w.String("metadatas");
  w.String("embeddings");
  w.EndArray();
  w.EndObject();
  return Finish(buffer);
}

Result<std::vector<RecalledMessage>> ParseQueryResponse(std::string_view body, std::string_view user_id) {
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsObject()) return BadResponse("query answer is not a JSON object");
  // Each field is a list with one entry per query embedding; we send one.
  const rapidjson::Value* columns[4];
  const char* names[4] = {"ids", "documents", "metadatas", "distances"};
  for (int i = 0; i < 4; ++i) {
    const rapidjson::Value* outer = ArrayMember(doc, names[i]);
    if (outer == nullptr || outer->Size() != 1 || !(*outer)[0].IsArray()) {
      return BadResponse(std::string("query answer has no ") + names[i]);
    }
    columns[i] = &(*outer)[0];
  }
  const auto& ids = *columns[0];
  const auto& documents = *columns[1];
  const auto& metadatas = *columns[2];
  const auto& distances = *columns[3];
  const rapidjson::SizeType n = ids.Size();
  if (documents.Size() != n || metadatas.Size() != n || distances.Size() != n) {
    return BadResponse("query answer columns differ in length");
  }
  std::vector<RecalledMessage> out;
  out.reserve(n);
  for (rapidjson::SizeType i = 0; i < n; ++i) {
    RecalledMessage r;
    if (!ids[i].IsString()) return BadResponse("record id is not a string");
    // A record caught in a concurrent delete of its collection comes back
    // with null document and metadata (seen on 1.5.9): it is gone, skip it.
    if (documents[i].IsNull() && metadatas[i].IsNull()) continue;
    r.message.id.assign(View(ids[i]));
    if (!documents[i].IsString()) return BadResponse("record document is not a string");
    r.message.content.assign(View(documents[i]));
    if (Status s = ReadMetadata(metadatas[i], user_id, r.message); !s.ok()) return s;
    if (!distances[i].IsNumber() || !std::isfinite(distances[i].GetDouble())) {
      return BadResponse("record distance is not a number");
    }
    r.distance = distances[i].GetDouble();
    out.push_back(std::move(r));
  }
  // Chroma answers nearest first; make it a guarantee rather than an
  // assumption about the server.
  std::stable_sort(out.begin(), out.end(), [](const RecalledMessage& a, const RecalledMessage& b) {
    return a.distance < b.distance;
  });
  return out;
}

Result<std::vector<StoredMessage>> ParseGetResponse(std::string_view body, std::string_view user_id) {
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsObject()) return BadResponse("get answer is not a JSON object");
  const rapidjson::Value* ids = ArrayMember(doc, "ids");
  const rapidjson::Value* documents = ArrayMember(doc, "documents");
  const rapidjson::Value* metadatas = ArrayMember(doc, "metadatas");
  const rapidjson::Value* embeddings = ArrayMember(doc, "embeddings");
  if (ids == nullptr || documents == nullptr || metadatas == nullptr || embeddings == nullptr) {
    return BadResponse("get answer lacks ids, documents, metadatas or embeddings");
  }
  const rapidjson::SizeType n = ids->Size();
  if (documents->Size() != n || metadatas->Size() != n || embeddings->Size() != n) {
    return BadResponse("get answer columns differ in length");
  }
  std::vector<StoredMessage> out;
  out.reserve(n);
  for (rapidjson::SizeType i = 0; i < n; ++i) {
    StoredMessage m;
    if (!(*ids)[i].IsString()) return BadResponse("record id is not a string");
    m.id.assign(View((*ids)[i]));
    if (!(*documents)[i].IsString()) return BadResponse("record document is not a string");
    m.content.assign(View((*documents)[i]));
    if (Status s = ReadMetadata((*metadatas)[i], user_id, m); !s.ok()) return s;
    auto embedding = ReadVector((*embeddings)[i]);
    if (!embedding.ok()) return embedding.status();
    m.embedding = std::move(embedding).value();
    out.push_back(std::move(m));
  }
  return out;
}

Result<int64_t> ParseCount(std::string_view body) {
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsInt64() || doc.GetInt64() < 0) return BadResponse("count is not a count");
  return doc.GetInt64();
}

Status ErrorFromResponse(long http_status, std::string_view body, std::string_view what) {
  // Chroma's error kind ("InvalidArgumentError") is a fixed word and safe to
  // show; its message can quote our request and stays out of the Status.
  std::string kind;
  bool mentions_dimension = false;
  rapidjson::Document doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (!doc.HasParseError() && doc.IsObject()) {
    auto error = doc.FindMember("error");
    if (error != doc.MemberEnd() && error->value.IsString() && error->value.GetStringLength() <= 64) {
      for (char c : View(error->value)) {
        if (std::isalnum(static_cast<unsigned char>(c))) kind.push_back(c);
      }
    }
    auto message = doc.FindMember("message");
    if (message != doc.MemberEnd() && message->value.IsString()) {
      std::string lower(View(message->value));
      std::transform(lower.begin(), lower.end(), lower.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      mentions_dimension = lower.find("dimension") != std::string::npos;
    }
  }
  std::string detail = std::string(what) + ": Chroma answered HTTP " + std::to_string(http_status);
  if (!kind.empty()) detail += " " + kind;
  if (http_status == 400 && mentions_dimension) {
    return Unavailable("dimension_mismatch",
                       std::string(what) + ": the embedding's dimension differs from the collection's");
  }
  // 408, 429 and 412 (a collection in the middle of being deleted) pass.
  const bool transient = http_status == 408 || http_status == 412 || http_status == 429;
  if (http_status >= 400 && http_status < 500 && !transient) {
    return Status(Code::kInternal, "chroma_rejected", detail);
  }
  return Unavailable("chroma_unavailable", detail);
}

}  // namespace chroma_json

namespace {

// The collection behind a cached id no longer exists: 404, or 412 "Missing
// metadata segment" while a concurrent delete is still under way (1.5.9).
bool CollectionGone(const HttpResponse& response) { return response.status == 404 || response.status == 412; }

Status HttpError(const HttpResponse& response, std::string_view what) {
  return chroma_json::ErrorFromResponse(response.status, response.body, what);
}

}  // namespace

ChromaStore::ChromaStore(ChromaOptions options) : options_(std::move(options)) {
  base_ = options_.base_url;
  while (!base_.empty() && base_.back() == '/') base_.pop_back();
  api_ = base_ + "/api/v2/tenants/" + options_.tenant + "/databases/" + options_.database;
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
  if (response.status().code() == Code::kDeadlineExceeded) {
    return Status(Code::kDeadlineExceeded, "chroma_unavailable",
                  "Chroma did not answer within " + std::to_string(options_.timeout_ms) + " ms");
  }
  return Unavailable("chroma_unavailable", "Chroma unreachable: " + response.status().message());
}

Result<std::string> ChromaStore::CollectionId(const std::string& name, std::string_view user_id,
                                              bool create) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = ids_.find(name);
    if (it != ids_.end()) return it->second;
  }
  Result<HttpResponse> response =
      create ? Call("POST", api_ + "/collections",
                    chroma_json::CreateCollectionRequest(name, user_id, options_.sync_threshold))
             : Call("GET", api_ + "/collections/" + name, "");
  if (!response.ok()) return response.status();
  if (!create && response->status == 404) {
    return Status(Code::kNotFound, "no_collection", "the user has no long-term memory yet");
  }
  if (response->status != 200) {
    return HttpError(*response, create ? "create collection" : "get collection");
  }
  auto id = chroma_json::ParseCollectionId(response->body);
  if (!id.ok()) return id.status();
  std::lock_guard<std::mutex> lock(mu_);
  ids_[name] = id.value();
  return id;
}

void ChromaStore::Forget(const std::string& name, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ids_.find(name);
  // Another thread may have cached the new id already: keep that one.
  if (it != ids_.end() && it->second == id) ids_.erase(it);
}

Result<std::vector<RecalledMessage>> ChromaStore::Recall(std::string_view user_id,
                                                         const std::vector<float>& embedding, size_t k,
                                                         const std::vector<std::string>& exclude_ids) {
  if (k == 0) return std::vector<RecalledMessage>{};
  const int64_t n_results = std::min<int64_t>(static_cast<int64_t>(k + exclude_ids.size()),
                                              chroma_json::kMaxQueryResults);
  auto body = chroma_json::QueryRequest(embedding, n_results);
  if (!body.ok()) return body.status();
  const std::string name = ChromaCollectionName(user_id);

  // A second round only when the cached collection was deleted under us.
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto id = CollectionId(name, user_id, /*create=*/false);
    if (!id.ok()) {
      if (id.status().code() == Code::kNotFound) return std::vector<RecalledMessage>{};
      return id.status();
    }
    auto response = Call("POST", api_ + "/collections/" + id.value() + "/query", body.value());
    if (!response.ok()) return response.status();
    if (CollectionGone(*response)) {
      Forget(name, id.value());
      continue;
    }
    if (response->status != 200) return HttpError(*response, "query");
    auto records = chroma_json::ParseQueryResponse(response->body, user_id);
    if (!records.ok()) return records.status();

    const std::unordered_set<std::string_view> excluded(exclude_ids.begin(), exclude_ids.end());
    std::vector<RecalledMessage> out;
    out.reserve(k);
    for (RecalledMessage& r : records.value()) {
      if (out.size() == k) break;
      if (excluded.count(r.message.id) == 0) out.push_back(std::move(r));
    }
    return out;
  }
  // Deleted twice in a row: the collection is gone, so is the memory.
  return std::vector<RecalledMessage>{};
}

Status ChromaStore::Upsert(std::string_view user_id, const std::vector<StoredMessage>& messages) {
  const std::string name = ChromaCollectionName(user_id);
  for (size_t start = 0; start < messages.size(); start += kMaxUpsertBatch) {
    const size_t end = std::min(messages.size(), start + kMaxUpsertBatch);
    const std::vector<StoredMessage> batch(messages.begin() + static_cast<std::ptrdiff_t>(start),
                                           messages.begin() + static_cast<std::ptrdiff_t>(end));
    auto body = chroma_json::UpsertRequest(user_id, batch);
    if (!body.ok()) return body.status();
    bool written = false;
    for (int attempt = 0; attempt < 2 && !written; ++attempt) {
      auto id = CollectionId(name, user_id, /*create=*/true);
      if (!id.ok()) return id.status();
      auto response = Call("POST", api_ + "/collections/" + id.value() + "/upsert", body.value());
      if (!response.ok()) return response.status();
      if (CollectionGone(*response)) {
        Forget(name, id.value());
        continue;
      }
      if (response->status != 200 && response->status != 201) {
        return HttpError(*response, "upsert");
      }
      written = true;
    }
    if (!written) {
      return Unavailable("chroma_unavailable", "upsert: the collection vanished twice while writing");
    }
  }
  return Status::Ok();
}

Result<int64_t> ChromaStore::Count(std::string_view user_id) {
  const std::string name = ChromaCollectionName(user_id);
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto id = CollectionId(name, user_id, /*create=*/false);
    if (!id.ok()) {
      if (id.status().code() == Code::kNotFound) return int64_t{0};
      return id.status();
    }
    auto response = Call("GET", api_ + "/collections/" + id.value() + "/count", "");
    if (!response.ok()) return response.status();
    if (CollectionGone(*response)) {
      Forget(name, id.value());
      continue;
    }
    if (response->status != 200) return HttpError(*response, "count");
    return chroma_json::ParseCount(response->body);
  }
  return int64_t{0};
}

Result<std::vector<StoredMessage>> ChromaStore::ExportAll(std::string_view user_id) {
  const std::string name = ChromaCollectionName(user_id);
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto id = CollectionId(name, user_id, /*create=*/false);
    if (!id.ok()) {
      if (id.status().code() == Code::kNotFound) return std::vector<StoredMessage>{};
      return id.status();
    }
    std::vector<StoredMessage> out;
    bool stale_id = false;
    for (int64_t offset = 0;; offset += kExportPageSize) {
      auto response = Call("POST", api_ + "/collections/" + id.value() + "/get",
                           chroma_json::GetPageRequest(kExportPageSize, offset));
      if (!response.ok()) return response.status();
      if (CollectionGone(*response)) {
        Forget(name, id.value());
        // Deleted mid-export: a partial export must not pass for a whole one.
        if (offset > 0) {
          return Unavailable("chroma_unavailable", "export: the collection was deleted while being read");
        }
        stale_id = true;
        break;
      }
      if (response->status != 200) return HttpError(*response, "export");
      auto page = chroma_json::ParseGetResponse(response->body, user_id);
      if (!page.ok()) return page.status();
      const size_t got = page->size();
      for (StoredMessage& m : page.value()) out.push_back(std::move(m));
      if (static_cast<int64_t>(got) < kExportPageSize) break;
    }
    if (!stale_id) return out;
  }
  return std::vector<StoredMessage>{};
}

Status ChromaStore::DeleteCollection(std::string_view user_id) {
  const std::string name = ChromaCollectionName(user_id);
  auto response = Call("DELETE", api_ + "/collections/" + name, "");
  if (!response.ok()) return response.status();
  if (response->status != 200 && response->status != 404) {
    return HttpError(*response, "delete collection");
  }
  std::lock_guard<std::mutex> lock(mu_);
  ids_.erase(name);
  return Status::Ok();
}

Status ChromaStore::Heartbeat() {
  auto response = Call("GET", base_ + "/api/v2/heartbeat", "");
  if (!response.ok()) return response.status();
  if (response->status != 200) return HttpError(*response, "heartbeat");
  return Status::Ok();
}

}  // namespace chatd
