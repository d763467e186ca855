#include "chatd/embeddings.h"

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "http_client.h"
#include "json.h"
#include "json_document.h"
#include "json_writer.h"
#include "openai_embedder.h"
#include "local_embedder.h"

namespace chatd {

namespace {

constexpr uint64_t kFnvOffset = 14695981039346656037ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;
constexpr double kWordWeight = 1.0;
constexpr double kTrigramWeight = 0.5;

// OpenAI accepts up to 2048 inputs per call; smaller batches keep each
// request well inside its token limit and our timeout.
constexpr size_t kMaxInputsPerCall = 128;

inline uint64_t FnvByte(uint64_t h, unsigned char b) { return (h ^ b) * kFnvPrime; }

constexpr uint64_t FnvPrefix(char a, char b) {
  return ((((kFnvOffset ^ static_cast<unsigned char>(a)) * kFnvPrime) ^ static_cast<unsigned char>(b)) *
          kFnvPrime);
}
// Every feature starts with one of two fixed prefixes, so their hash state is
// computed once and each feature continues from it.
constexpr uint64_t kWordSeed = FnvPrefix('w', ':');
constexpr uint64_t kTrigramSeed = FnvPrefix('c', ':');

inline bool IsTokenByte(unsigned char b) {
  return (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || (b >= '0' && b <= '9') || b >= 0x80;
}

inline unsigned char Lower(unsigned char b) { return (b >= 'A' && b <= 'Z') ? b + ('a' - 'A') : b; }

inline void AddFeature(double* v, size_t dimensions, uint64_t h, double weight) {
  const size_t bucket = static_cast<size_t>(h % dimensions);
  v[bucket] += (h >> 63) ? -weight : weight;
}

// One token's features: the word, then every trigram of "^" + token + "$".
void AddToken(const unsigned char* token, size_t len, double* v, size_t dimensions) {
  uint64_t word = kWordSeed;
  for (size_t i = 0; i < len; ++i) word = FnvByte(word, Lower(token[i]));
  AddFeature(v, dimensions, word, kWordWeight);

  // Byte j of the padded token "^" + token + "$" (j in [0, len + 1]).
  auto padded = [token, len](size_t j) -> unsigned char {
    if (j == 0) return '^';
    if (j == len + 1) return '$';
    return Lower(token[j - 1]);
  };
  // len + 2 padded bytes give len windows of three.
  for (size_t i = 0; i < len; ++i) {
    uint64_t h = kTrigramSeed;
    h = FnvByte(h, padded(i));
    h = FnvByte(h, padded(i + 1));
    h = FnvByte(h, padded(i + 2));
    AddFeature(v, dimensions, h, kTrigramWeight);
  }
}

// Scales to unit length in place; false when every component was zero or the
// vector holds something that is not a finite number.
bool Normalise(std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x * x;
  if (!(sum > 0) || !std::isfinite(sum)) return false;
  const double norm = std::sqrt(sum);
  for (double& x : v) x /= norm;
  return true;
}

std::vector<float> ToFloats(const std::vector<double>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i]);
  return out;
}

Status EmbedderUnavailable(std::string message) {
  return Unavailable("embedder_unavailable", std::move(message));
}

}  // namespace

std::vector<float> LocalEmbed(std::string_view text, size_t dimensions) {
  if (dimensions == 0) return {};
  std::vector<double> v(dimensions, 0.0);
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    if (!IsTokenByte(bytes[i])) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < n && IsTokenByte(bytes[end])) ++end;
    AddToken(bytes + i, end - i, v.data(), dimensions);
    i = end;
  }
  if (!Normalise(v)) {
    // No tokens (or features that cancelled out): a fixed unit vector, so the
    // vector store still gets a valid, normalised embedding.
    std::vector<float> unit(dimensions, 0.0f);
    unit[0] = 1.0f;
    return unit;
  }
  return ToFloats(v);
}

Result<std::vector<std::vector<float>>> LocalEmbedder::Embed(const std::vector<std::string>& texts) {
  std::vector<std::vector<float>> out;
  out.reserve(texts.size());
  for (const std::string& text : texts) out.push_back(LocalEmbed(text, dimensions_));
  return out;
}

Result<std::string> BuildEmbeddingsRequest(std::string_view model, const std::vector<std::string>& texts,
                                           size_t dimensions) {
  rapidjson::StringBuffer buffer;
  StrictJsonWriter writer(buffer);
  bool ok = writer.StartObject();
  ok = ok && writer.Key("model") &&
       writer.String(model.data(), static_cast<rapidjson::SizeType>(model.size()));
  ok = ok && writer.Key("input") && writer.StartArray();
  for (const std::string& text : texts) {
    ok = ok && writer.String(text.data(), static_cast<rapidjson::SizeType>(text.size()));
  }
  ok = ok && writer.EndArray();
  ok = ok && writer.Key("dimensions") && writer.Uint64(dimensions);
  ok = ok && writer.EndObject();
  if (!ok) return InvalidArgument("invalid_utf8", "text to embed is not valid UTF-8");
  return std::string(buffer.GetString(), buffer.GetSize());
}

Result<std::vector<std::vector<float>>> ParseEmbeddingsResponse(std::string_view body, size_t count,
                                                                size_t dimensions) {
  LocalJsonDocument doc;
  doc.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag>(body.data(), body.size());
  if (doc.HasParseError()) return EmbedderUnavailable("embeddings API answered invalid JSON");
  if (!doc.IsObject()) return EmbedderUnavailable("embeddings API answered a non-object");
  auto data = doc.FindMember("data");
  if (data == doc.MemberEnd() || !data->value.IsArray()) {
    return EmbedderUnavailable("embeddings API answer has no data array");
  }
  if (data->value.Size() != count) {
    return EmbedderUnavailable("embeddings API answered " + std::to_string(data->value.Size()) +
                               " vectors for " + std::to_string(count) + " inputs");
  }
  std::vector<std::vector<float>> out(count);
  std::vector<bool> seen(count, false);
  for (const auto& item : data->value.GetArray()) {
    if (!item.IsObject()) return EmbedderUnavailable("embeddings API data item is not an object");
    auto index = item.FindMember("index");
    if (index == item.MemberEnd() || !index->value.IsUint64() || index->value.GetUint64() >= count) {
      return EmbedderUnavailable("embeddings API data item has no valid index");
    }
    const size_t at = static_cast<size_t>(index->value.GetUint64());
    if (seen[at]) {
      return EmbedderUnavailable("embeddings API answered index " + std::to_string(at) + " twice");
    }
    seen[at] = true;
    auto embedding = item.FindMember("embedding");
    if (embedding == item.MemberEnd() || !embedding->value.IsArray()) {
      return EmbedderUnavailable("embeddings API data item has no embedding array");
    }
    if (embedding->value.Size() != dimensions) {
      return Unavailable("dimension_mismatch", "embedding model answered " +
                                                   std::to_string(embedding->value.Size()) +
                                                   " dimensions, configured " + std::to_string(dimensions));
    }
    std::vector<double> v;
    v.reserve(dimensions);
    for (const auto& x : embedding->value.GetArray()) {
      if (!x.IsNumber()) return EmbedderUnavailable("embedding holds a non-number");
      float f;
      if (!JsonToFloat(x.GetDouble(), &f)) {
        return EmbedderUnavailable("embedding holds a value out of float range");
      }
      v.push_back(f);
    }
    // The API promises unit vectors, but compatible servers differ, and
    // cosine recall assumes them.
    if (!Normalise(v)) return EmbedderUnavailable("embedding is a zero vector");
    out[at] = ToFloats(v);
  }
  // count items with distinct in-range indexes cover every input.
  return out;
}

OpenAIEmbedder::OpenAIEmbedder(OpenAIEmbedderOptions options) : options_(std::move(options)) {
  url_ = options_.base_url;
  while (!url_.empty() && url_.back() == '/') url_.pop_back();
  url_ += "/embeddings";
}

Result<std::vector<std::vector<float>>> OpenAIEmbedder::Embed(const std::vector<std::string>& texts) {
  std::vector<std::vector<float>> out;
  out.reserve(texts.size());
  for (size_t start = 0; start < texts.size(); start += kMaxInputsPerCall) {
    const size_t end = std::min(texts.size(), start + kMaxInputsPerCall);
    const std::vector<std::string> batch(texts.begin() + static_cast<std::ptrdiff_t>(start),
                                         texts.begin() + static_cast<std::ptrdiff_t>(end));
    auto body = BuildEmbeddingsRequest(options_.model, batch, options_.dimensions);
    if (!body.ok()) return body.status();

    HttpCall call;
    call.method = "POST";
    call.url = url_;
    call.body = std::move(body).value();
    call.headers.push_back("Content-Type: application/json");
    if (!options_.api_key.empty()) call.headers.push_back("Authorization: Bearer " + options_.api_key);
    call.connect_timeout_ms = options_.connect_timeout_ms;
    call.timeout_ms = options_.timeout_ms;
    auto response = ThreadHttpClient().Send(call);
    if (!response.ok()) {
      return EmbedderUnavailable("embeddings API unreachable: " + response.status().message());
    }
    if (response->status < 200 || response->status > 299) {
      return EmbedderUnavailable("embeddings API answered HTTP " + std::to_string(response->status));
    }
    auto vectors = ParseEmbeddingsResponse(response->body, batch.size(), options_.dimensions);
    if (!vectors.ok()) return vectors.status();
    for (auto& v : vectors.value()) out.push_back(std::move(v));
  }
  return out;
}

}  // namespace chatd
