// The JSON of the Chroma API (chroma_json.h): builders and parsers, no I/O.
#include "chroma_json.h"

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cctype>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "json.h"
#include "json_document.h"
#include "json_writer.h"

namespace chatd {

namespace {

constexpr size_t kUuidLength = 36;

// Our metadata vocabulary in Chroma. It is a storage format: changing a name
// orphans every record already written.
constexpr char kMetaRole[] = "role";
constexpr char kMetaTs[] = "ts";
constexpr char kMetaUser[] = "user";
constexpr char kMetaTurn[] = "turn";
// The message's text travels in the metadata, not as Chroma's document:
// Chroma keeps every document in a full-text index (an SQLite FTS5 trigram
// table, rewritten on every upsert) that chatd never queries, and that index
// cost 15-19% of Chroma's CPU per record written (docs/performance.md).
// Records written before carry their text as the document; readers take
// either, the metadata first.
constexpr char kMetaText[] = "text";
constexpr char kRoleUser[] = "user";
constexpr char kRoleAssistant[] = "assistant";
// A message's id says its turn and role (MessageId), so neither is written as
// metadata for such a message: ReadRecord takes them from the id. Every
// metadata key is one more row, and index entries, in Chroma's SQLite for
// every record; leaving these two out made a write about 10% cheaper
// (docs/memory.md). Records written before carry them, and readers prefer them.
bool IdSaysTurnAndRole(const StoredMessage& m) {
  const std::optional<TurnAndRole> parts = SplitMessageId(m.id);
  return parts && parts->turn == m.turn_id && parts->role == m.role;
}

constexpr unsigned kParseFlags = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag;

Status BadResponse(std::string message) {
  return Unavailable("chroma_unavailable", "malformed Chroma answer: " + std::move(message));
}

bool WriteString(StrictJsonWriter& w, std::string_view s) {
  return w.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
}

// Shortest text that reads back as the same float: about half the bytes of
// Writer::Double, which prints the widened double with 17 digits.
bool WriteFloat(StrictJsonWriter& w, float x) {
  if (!std::isfinite(x)) return false;
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), x);
  if (ec != std::errc()) return false;
  return w.RawValue(buf, static_cast<size_t>(end - buf), rapidjson::kNumberType);
}

bool WriteVector(StrictJsonWriter& w, const std::vector<float>& v) {
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

// Our metadata back into a StoredMessage. kNotFound "chroma_foreign_record"
// for a record of another user, by metadata or by id; the callers drop it and
// count it, so a mix-up below us can never hand one user's memory to another.
Status ReadRecord(const rapidjson::Value& id, const rapidjson::Value& meta, std::string_view user_id,
                  StoredMessage& out) {
  if (!id.IsString()) return BadResponse("record id is not a string");
  if (!meta.IsObject()) return BadResponse("metadata is not an object");
  auto user = meta.FindMember(kMetaUser);
  if (user == meta.MemberEnd() || !user->value.IsString()) return BadResponse("metadata has no user");
  std::string_view raw = View(id);
  const size_t slash = raw.find('/');
  // Shared collections prefix the user; the old per-user ones did not.
  const bool foreign_id = slash != std::string_view::npos && raw.substr(0, slash) != user_id;
  if (View(user->value) != user_id || foreign_id) {
    return Status(Code::kNotFound, "chroma_foreign_record", "a Chroma record belongs to another user");
  }
  out.id.assign(slash == std::string_view::npos ? raw : raw.substr(slash + 1));
  const std::optional<TurnAndRole> from_id = SplitMessageId(out.id);
  auto role = meta.FindMember(kMetaRole);
  if (role != meta.MemberEnd()) {
    if (!role->value.IsString()) return BadResponse("metadata has a role that is not a string");
    if (View(role->value) == kRoleUser) {
      out.role = Role::kUser;
    } else if (View(role->value) == kRoleAssistant) {
      out.role = Role::kAssistant;
    } else {
      return BadResponse("metadata has an unknown role");
    }
  } else if (from_id) {
    out.role = from_id->role;
  } else {
    return BadResponse("record has no role");
  }
  auto ts = meta.FindMember(kMetaTs);
  if (ts == meta.MemberEnd() || !ts->value.IsInt64()) return BadResponse("metadata has no integer ts");
  out.ts_ms = ts->value.GetInt64();
  auto turn = meta.FindMember(kMetaTurn);
  if (turn != meta.MemberEnd()) {
    if (!turn->value.IsString()) return BadResponse("metadata has a turn that is not a string");
    out.turn_id.assign(View(turn->value));
  } else if (from_id) {
    out.turn_id.assign(from_id->turn);
  } else {
    return BadResponse("record has no turn");
  }
  out.user_id.assign(user_id);
  return Status::Ok();
}

bool IsForeign(const Status& s) { return s.reason() == "chroma_foreign_record"; }

// A record's text: its metadata's, else (a record written before the text
// moved there) its document.
Status ReadText(const rapidjson::Value& meta, const rapidjson::Value& document, std::string& out) {
  auto text = meta.FindMember(kMetaText);
  if (text != meta.MemberEnd()) {
    if (!text->value.IsString()) return BadResponse("record text is not a string");
    out.assign(View(text->value));
    return Status::Ok();
  }
  if (!document.IsString()) return BadResponse("record has no text");
  out.assign(View(document));
  return Status::Ok();
}

bool WriteUserFilter(StrictJsonWriter& w, std::string_view user_id) {
  return w.Key("where") && w.StartObject() && w.Key(kMetaUser) && WriteString(w, user_id) && w.EndObject();
}

}  // namespace

namespace chroma_json {

std::string CreateCollectionRequest(std::string_view name, const HnswBuild& hnsw) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
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
  w.Int(hnsw.sync_threshold);
  w.Key("max_neighbors");
  w.Int(hnsw.max_neighbors);
  w.Key("ef_construction");
  w.Int(hnsw.ef_construction);
  w.EndObject();
  w.EndObject();
  w.EndObject();
  return Finish(buffer);
}

Result<std::string> ParseCollectionId(std::string_view body) {
  LocalJsonDocument doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsObject()) return BadResponse("collection is not a JSON object");
  auto id = doc.FindMember("id");
  if (id == doc.MemberEnd() || !id->value.IsString() || !IsUuid(View(id->value))) {
    return BadResponse("collection has no UUID id");
  }
  return std::string(View(id->value));
}

Result<std::vector<std::string>> ParseCollectionNames(std::string_view body) {
  LocalJsonDocument doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsArray()) return BadResponse("collection list is not an array");
  std::vector<std::string> names;
  for (const auto& c : doc.GetArray()) {
    if (!c.IsObject()) return BadResponse("collection is not an object");
    auto name = c.FindMember("name");
    if (name == c.MemberEnd() || !name->value.IsString()) return BadResponse("collection has no name");
    names.emplace_back(View(name->value));
  }
  return names;
}

std::string RecordId(std::string_view user_id, std::string_view message_id) {
  std::string id;
  id.reserve(user_id.size() + 1 + message_id.size());
  id.append(user_id).append("/").append(message_id);
  return id;
}

Result<std::string> UpsertRequest(const std::vector<StoredMessage>& messages) {
  for (const StoredMessage& m : messages) {
    if (m.id.empty()) return InvalidArgument("missing_id", "a long-term record has no id");
    if (m.user_id.empty()) return InvalidArgument("missing_user", "a long-term record names no user");
    if (m.embedding.empty()) {
      return InvalidArgument("missing_embedding", "a long-term record has no embedding");
    }
  }
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  bool ok = w.StartObject();
  ok = ok && w.Key("ids") && w.StartArray();
  for (const StoredMessage& m : messages) ok = ok && WriteString(w, RecordId(m.user_id, m.id));
  ok = ok && w.EndArray();
  ok = ok && w.Key("embeddings") && w.StartArray();
  for (const StoredMessage& m : messages) ok = ok && WriteVector(w, m.embedding);
  ok = ok && w.EndArray();
  if (!ok) return InvalidArgument("bad_embedding", "an embedding holds a value that is not a finite number");
  ok = w.Key("metadatas") && w.StartArray();
  for (const StoredMessage& m : messages) {
    ok = ok && w.StartObject();
    if (!IdSaysTurnAndRole(m)) {
      ok = ok && w.Key(kMetaRole) && w.String(m.role == Role::kUser ? kRoleUser : kRoleAssistant);
      ok = ok && w.Key(kMetaTurn) && WriteString(w, m.turn_id);
    }
    ok = ok && w.Key(kMetaTs) && w.Int64(m.ts_ms);
    ok = ok && w.Key(kMetaUser) && WriteString(w, m.user_id);
    ok = ok && w.Key(kMetaText) && WriteString(w, m.content);
    ok = ok && w.EndObject();
  }
  ok = ok && w.EndArray() && w.EndObject();
  if (!ok) return InvalidArgument("invalid_utf8", "a long-term record is not valid UTF-8");
  return Finish(buffer);
}

Result<std::string> QueryRequest(const std::vector<float>& embedding, int64_t n_results, std::string_view user_id) {
  if (embedding.empty()) return InvalidArgument("missing_embedding", "recall needs an embedding");
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  bool ok = w.StartObject() && w.Key("query_embeddings") && w.StartArray() && WriteVector(w, embedding) &&
            w.EndArray();
  if (!ok) return InvalidArgument("bad_embedding", "the embedding holds a value that is not a finite number");
  ok = w.Key("n_results") && w.Int64(n_results);
  ok = ok && WriteUserFilter(w, user_id);
  ok = ok && w.Key("include") && w.StartArray() && w.String("documents") && w.String("metadatas") &&
       w.String("distances") && w.EndArray();
  ok = ok && w.EndObject();
  if (!ok) return InvalidArgument("invalid_user", "the user id cannot be written");
  return Finish(buffer);
}

std::string GetPageRequest(std::string_view user_id, int64_t limit, int64_t offset, bool full) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  w.StartObject();
  if (!user_id.empty()) WriteUserFilter(w, user_id);  // valid user ids are ASCII: cannot fail
  w.Key("limit");
  w.Int64(limit);
  w.Key("offset");
  w.Int64(offset);
  w.Key("include");
  w.StartArray();
  w.String("metadatas");
  if (full) {
    w.String("documents");
    w.String("embeddings");
  }
  w.EndArray();
  w.EndObject();
  return Finish(buffer);
}

Result<std::string> GetIdsRequest(std::string_view user_id, const std::vector<std::string>& record_ids) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  bool ok = w.StartObject() && w.Key("ids") && w.StartArray();
  for (const std::string& id : record_ids) ok = ok && WriteString(w, id);
  ok = ok && w.EndArray() && WriteUserFilter(w, user_id) && w.Key("include") && w.StartArray() &&
       w.String("documents") && w.String("metadatas") && w.EndArray() && w.EndObject();
  if (!ok) return InvalidArgument("invalid_utf8", "a record id is not valid UTF-8");
  return Finish(buffer);
}

Result<std::string> GetIdsWithEmbeddingsRequest(const std::vector<std::string>& record_ids) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  bool ok = w.StartObject() && w.Key("ids") && w.StartArray();
  for (const std::string& id : record_ids) ok = ok && WriteString(w, id);
  ok = ok && w.EndArray() && w.Key("include") && w.StartArray() && w.String("documents") &&
       w.String("metadatas") && w.String("embeddings") && w.EndArray() && w.EndObject();
  if (!ok) return InvalidArgument("invalid_utf8", "a record id is not valid UTF-8");
  return Finish(buffer);
}

std::string DeleteIdsRequest(const std::vector<std::string>& record_ids) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter w(buffer);
  w.StartObject();
  w.Key("ids");
  w.StartArray();
  for (const std::string& id : record_ids) WriteString(w, id);  // ids we read back: valid UTF-8
  w.EndArray();
  w.EndObject();
  return Finish(buffer);
}

Result<RecallResult> ParseQueryResponse(std::string_view body, std::string_view user_id) {
  LocalJsonDocument doc;
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
  RecallResult out;
  out.messages.reserve(n);
  for (rapidjson::SizeType i = 0; i < n; ++i) {
    RecalledMessage r;
    // A record caught in a concurrent delete comes back with null document
    // and metadata (seen on 1.5.9): it is gone, skip it.
    if (documents[i].IsNull() && metadatas[i].IsNull()) continue;
    if (Status s = ReadRecord(ids[i], metadatas[i], user_id, r.message); !s.ok()) {
      if (!IsForeign(s)) return s;
      ++out.foreign_dropped;
      continue;
    }
    if (Status s = ReadText(metadatas[i], documents[i], r.message.content); !s.ok()) return s;
    if (!distances[i].IsNumber() || !std::isfinite(distances[i].GetDouble())) {
      return BadResponse("record distance is not a number");
    }
    r.distance = distances[i].GetDouble();
    out.messages.push_back(std::move(r));
  }
  // Chroma answers nearest first; make it a guarantee rather than an
  // assumption about the server.
  std::stable_sort(out.messages.begin(), out.messages.end(),
                   [](const RecalledMessage& a, const RecalledMessage& b) { return a.distance < b.distance; });
  return out;
}

namespace {

// The first position from `pos` on that is not JSON whitespace.
size_t SkipJsonSpace(std::string_view text, size_t pos) {
  while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\r' || text[pos] == '\t')) ++pos;
  return pos;
}

// Where the value of the member `name` of the top-level object in `text`
// starts, or npos. A structural scan only: strings are skipped with their
// escapes and brackets counted; the parse that follows validates the rest.
size_t FindTopLevelValue(std::string_view text, std::string_view name) {
  int depth = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      size_t end = i + 1;
      for (;;) {
        end = text.find_first_of("\"\\", end);
        if (end == std::string_view::npos) return std::string_view::npos;
        if (text[end] == '"') break;
        end += 2;  // an escape: the next character never ends the string
      }
      if (depth == 1 && text.substr(i + 1, end - i - 1) == name) {
        const size_t colon = SkipJsonSpace(text, end + 1);
        if (colon < text.size() && text[colon] == ':') return SkipJsonSpace(text, colon + 1);  // a key, not a value
      }
      i = end;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return std::string_view::npos;
}

// Powers of ten a double holds exactly.
constexpr double kExactPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
constexpr int kMaxExactPow10 = 22;
constexpr int kMaxFastDigits = 19;  // a uint64 holds any 19 decimal digits
constexpr int kMaxExponentDigits = 6;

// One JSON number at `first` as the float nearest to it, or nullptr. Chroma
// prints each stored float as the shortest text of its double (17 digits):
// up to 19 digits and a small exponent make a double within about one ulp of
// the text (one rounding for the digits, one for the power of ten), and that
// decides the float unless the text lies near the middle between two floats.
// A float's own text lies on a float; anything near a middle, and anything
// longer or larger, goes to std::from_chars, which rounds exactly. This keeps
// 256-number vectors from costing a recall more than the rest of the chat.
const char* ReadFloat(const char* first, const char* last, float* out) {
  const char* p = first;
  const bool negative = p < last && *p == '-';
  if (negative) ++p;
  uint64_t mantissa = 0;
  int digits = 0, exponent = 0;
  bool any = false;
  for (; p < last && *p >= '0' && *p <= '9'; ++p) {
    any = true;
    if (digits == 0 && *p == '0') continue;  // leading zeros carry nothing
    if (digits++ < kMaxFastDigits) {
      mantissa = mantissa * 10 + static_cast<uint64_t>(*p - '0');
    } else {
      ++exponent;  // only reached past kMaxFastDigits: the slow path below
    }
  }
  if (p < last && *p == '.') {
    ++p;
    for (; p < last && *p >= '0' && *p <= '9'; ++p) {
      any = true;
      if (digits == 0 && *p == '0') {
        --exponent;
        continue;
      }
      if (digits++ < kMaxFastDigits) {
        mantissa = mantissa * 10 + static_cast<uint64_t>(*p - '0');
        --exponent;
      }
    }
  }
  if (!any) return nullptr;
  bool exponent_read = true;  // false: let from_chars judge
  if (p < last && (*p == 'e' || *p == 'E')) {
    ++p;
    const bool minus = p < last && *p == '-';
    if (p < last && (*p == '-' || *p == '+')) ++p;
    int e = 0, e_digits = 0;
    for (; p < last && *p >= '0' && *p <= '9'; ++p) {
      if (e_digits++ < kMaxExponentDigits) e = e * 10 + (*p - '0');
    }
    exponent_read = e_digits > 0 && e_digits <= kMaxExponentDigits;  // else malformed or huge
    exponent += minus ? -e : e;
  }
  if (exponent_read && digits <= kMaxFastDigits && exponent >= -kMaxExactPow10 && exponent <= kMaxExactPow10) {
    if (mantissa == 0) {
      *out = negative ? -0.0f : 0.0f;
      return p;
    }
    double d = static_cast<double>(mantissa);
    d = exponent < 0 ? d / kExactPow10[-exponent] : d * kExactPow10[exponent];
    float f = 0;
    if (JsonToFloat(d, &f) && std::fabs(f) < FLT_MAX && std::fabs(f) >= FLT_MIN) {
      // The float is decided when d sits well inside its rounding interval:
      // within a quarter of the smaller gap to a neighbour (d errs by ~1e-16
      // relative; a quarter gap is ~1.5e-8).
      const double gap = std::min(static_cast<double>(std::nextafter(f, HUGE_VALF)) - f,
                                  f - static_cast<double>(std::nextafter(f, -HUGE_VALF)));
      if (std::fabs(d - f) <= gap / 4) {
        *out = negative ? -f : f;
        return p;
      }
    }
  }
  double d = 0;
  auto [end, ec] = std::from_chars(first, last, d);
  if (ec != std::errc() || !JsonToFloat(d, out)) return nullptr;
  return end;
}

// The embeddings column of a /get answer, from text[pos] (a '['): a JSON array
// of arrays of numbers, read straight into floats. Returns the position after
// it. Recall by id reads up to 128 vectors of 256 numbers; as DOM values,
// through RapidJSON's number reader, they cost the worker four times what the
// rest of a chat does. ReadFloat is a little laxer than JSON's grammar ("1."
// and "01" pass); it never yields a value JSON could not spell, and infinities
// and NaN are refused.
Result<size_t> ReadVectorColumn(std::string_view text, size_t pos, std::vector<std::vector<float>>& out) {
  const auto skip_space = [&] { pos = SkipJsonSpace(text, pos); };
  const auto at = [&](char c) { return pos < text.size() && text[pos] == c; };
  // After an element of either array: a comma (another follows), the closing
  // bracket (passed), or anything else (malformed).
  enum class Next { kMore, kEnd, kBad };
  const auto next = [&] {
    skip_space();
    if (at(',')) {
      ++pos;
      skip_space();
      return Next::kMore;
    }
    if (!at(']')) return Next::kBad;
    ++pos;
    return Next::kEnd;
  };
  if (!at('[')) return BadResponse("embeddings are not an array");
  ++pos;
  skip_space();
  if (at(']')) return pos + 1;
  size_t dimensions = 0;
  for (;;) {
    if (!at('[')) return BadResponse("embedding is not an array");
    ++pos;
    skip_space();
    std::vector<float>& v = out.emplace_back();
    v.reserve(dimensions);
    if (at(']')) {
      ++pos;
    } else {
      for (;;) {
        const char* first = text.data() + pos;
        const char* last = text.data() + text.size();
        if (pos >= text.size() || !(*first == '-' || (*first >= '0' && *first <= '9'))) {
          return BadResponse("embedding holds a non-number");
        }
        float f = 0;
        const char* end = ReadFloat(first, last, &f);
        if (end == nullptr) return BadResponse("embedding value out of float range");
        v.push_back(f);
        pos = static_cast<size_t>(end - text.data());
        const Next after = next();
        if (after == Next::kBad) return BadResponse("embedding holds a non-number");
        if (after == Next::kEnd) break;
      }
    }
    dimensions = v.size();
    const Next after = next();
    if (after == Next::kBad) return BadResponse("embeddings are not an array of vectors");
    if (after == Next::kEnd) return pos;
  }
}

// A /get answer with documents when `with_documents`, embeddings when
// `with_embeddings`.
Result<std::vector<StoredMessage>> ParseGet(std::string_view body, std::string_view user_id, bool with_documents,
                                            bool with_embeddings, size_t* foreign, std::vector<std::string>* raw_ids,
                                            size_t* page_size) {
  // The embeddings column is read aside; the document parses the rest, with
  // a null in the column's place.
  std::vector<std::vector<float>> vectors;
  std::string rest;
  std::string_view json = body;
  bool column_read = false;
  if (with_embeddings) {
    const size_t at = FindTopLevelValue(body, "embeddings");
    if (at != std::string_view::npos && body[at] == '[') {
      auto end = ReadVectorColumn(body, at, vectors);
      if (!end.ok()) return end.status();
      rest.reserve(body.size() - (*end - at) + 4);
      rest.append(body.substr(0, at)).append("null").append(body.substr(*end));
      json = rest;
      column_read = true;
    }
  }
  LocalJsonDocument doc;
  doc.Parse<kParseFlags>(json.data(), json.size());
  if (doc.HasParseError() || !doc.IsObject()) return BadResponse("get answer is not a JSON object");
  const rapidjson::Value* ids = ArrayMember(doc, "ids");
  const rapidjson::Value* metadatas = ArrayMember(doc, "metadatas");
  const rapidjson::Value* documents = with_documents ? ArrayMember(doc, "documents") : nullptr;
  if (ids == nullptr || metadatas == nullptr || (with_documents && documents == nullptr) ||
      (with_embeddings && !column_read)) {
    return BadResponse("get answer lacks ids, documents, metadatas or embeddings");
  }
  const rapidjson::SizeType n = ids->Size();
  if (metadatas->Size() != n || (with_documents && documents->Size() != n) ||
      (with_embeddings && vectors.size() != n)) {
    return BadResponse("get answer columns differ in length");
  }
  if (page_size != nullptr) *page_size = n;
  std::vector<StoredMessage> out;
  out.reserve(n);
  for (rapidjson::SizeType i = 0; i < n; ++i) {
    StoredMessage m;
    if (Status s = ReadRecord((*ids)[i], (*metadatas)[i], user_id, m); !s.ok()) {
      if (!IsForeign(s)) return s;
      if (foreign != nullptr) ++*foreign;
      continue;
    }
    if (with_documents) {
      if (Status s = ReadText((*metadatas)[i], (*documents)[i], m.content); !s.ok()) return s;
    }
    if (with_embeddings) m.embedding = std::move(vectors[i]);
    if (raw_ids != nullptr) raw_ids->emplace_back(View((*ids)[i]));
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace

Result<std::vector<StoredMessage>> ParseGetResponse(std::string_view body, std::string_view user_id, bool full,
                                                    size_t* foreign, std::vector<std::string>* raw_ids,
                                                    size_t* page_size) {
  return ParseGet(body, user_id, full, full, foreign, raw_ids, page_size);
}

Result<std::vector<StoredMessage>> ParseGetDocumentsResponse(std::string_view body, std::string_view user_id,
                                                             size_t* foreign) {
  return ParseGet(body, user_id, true, false, foreign, nullptr, nullptr);
}

Result<int64_t> ParseCount(std::string_view body) {
  LocalJsonDocument doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsInt64() || doc.GetInt64() < 0) return BadResponse("count is not a count");
  return doc.GetInt64();
}

Status ErrorFromResponse(long http_status, std::string_view body, std::string_view what) {
  // Chroma's error kind ("InvalidArgumentError") is a fixed word and safe to
  // show; its message can quote our request and stays out of the Status.
  std::string kind;
  bool mentions_dimension = false;
  LocalJsonDocument doc;
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

}  // namespace chatd
