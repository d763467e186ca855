#include "hot_record.h"

#include <cstring>
#include <limits>

namespace chatd {

namespace {

constexpr uint8_t kHotRecordVersion = 1;
constexpr uint8_t kHotRoleUser = 0;
constexpr uint8_t kHotRoleAssistant = 1;
// Partial sums of a distance: 8 floats fill one AVX register.
constexpr size_t kDistanceLanes = 8;

template <typename T>
void AppendLe(std::string& out, T v) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));  // x86-64 and arm64 are little-endian
  out.append(bytes, sizeof(T));
}

template <typename T>
bool ReadLe(std::string_view& in, T& v) {
  if (in.size() < sizeof(T)) return false;
  std::memcpy(&v, in.data(), sizeof(T));
  in.remove_prefix(sizeof(T));
  return true;
}

float FloatAt(const char* bytes, size_t i) {
  float f;
  std::memcpy(&f, bytes + i * sizeof(float), sizeof(float));  // the record's floats are not aligned
  return f;
}

}  // namespace

std::string PackEmbedding(const std::vector<float>& v) {
  static_assert(sizeof(float) == 4);
  std::string out(v.size() * sizeof(float), '\0');
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());  // x86-64 and arm64 are little-endian
  return out;
}

bool UnpackEmbedding(std::string_view bytes, std::vector<float>& out) {
  if (bytes.size() % sizeof(float) != 0) return false;
  out.resize(bytes.size() / sizeof(float));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return true;
}

std::string PackHotRecord(const StoredMessage& m) {
  std::string out;
  out.reserve(1 + 8 + 1 + 2 + m.turn_id.size() + 4 + m.content.size() + m.embedding.size() * sizeof(float));
  AppendLe<uint8_t>(out, kHotRecordVersion);
  AppendLe<int64_t>(out, m.ts_ms);
  AppendLe<uint8_t>(out, m.role == Role::kUser ? kHotRoleUser : kHotRoleAssistant);
  AppendLe<uint16_t>(out, static_cast<uint16_t>(m.turn_id.size()));  // turn ids are 32 hex characters
  out += m.turn_id;
  AppendLe<uint32_t>(out, static_cast<uint32_t>(m.content.size()));  // messages are bounded far below 4 GiB
  out += m.content;
  out += PackEmbedding(m.embedding);
  return out;
}

bool ViewHotRecord(std::string_view in, HotRecordView& out) {
  uint8_t version = 0, role = 0;
  uint16_t turn_len = 0;
  uint32_t content_len = 0;
  if (!ReadLe(in, version) || version != kHotRecordVersion || !ReadLe(in, out.ts_ms) || !ReadLe(in, role) ||
      role > kHotRoleAssistant || !ReadLe(in, turn_len) || in.size() < turn_len) {
    return false;
  }
  out.role = role == kHotRoleUser ? Role::kUser : Role::kAssistant;
  out.turn_id = in.substr(0, turn_len);
  in.remove_prefix(turn_len);
  if (!ReadLe(in, content_len) || in.size() < content_len) return false;
  out.content = in.substr(0, content_len);
  in.remove_prefix(content_len);
  if (in.empty() || in.size() % sizeof(float) != 0) return false;
  out.embedding = in;
  return true;
}

Result<StoredMessage> UnpackHotRecord(std::string_view bytes) {
  HotRecordView view;
  if (!ViewHotRecord(bytes, view)) return Internal("bad_hot_record", "a hot-set record is malformed");
  StoredMessage m;
  m.ts_ms = view.ts_ms;
  m.role = view.role;
  m.turn_id.assign(view.turn_id);
  m.content.assign(view.content);
  UnpackEmbedding(view.embedding, m.embedding);  // a multiple of 4: checked by the view
  m.id = MessageId(m.turn_id, m.role);
  return m;
}

double SquaredL2Packed(const char* packed, const float* query, size_t n) {
  if (n == 0) return std::numeric_limits<double>::infinity();
  // Independent float lanes, summed at the end, let the compiler use SIMD
  // (one running sum cannot be reordered without -ffast-math); Chroma's HNSW
  // sums in SIMD lanes too. Identical vectors still give exactly 0.
  float lanes[kDistanceLanes] = {};
  const size_t whole = n - n % kDistanceLanes;
  for (size_t i = 0; i < whole; i += kDistanceLanes) {
    for (size_t j = 0; j < kDistanceLanes; ++j) {
      const float d = FloatAt(packed, i + j) - query[i + j];
      lanes[j] += d * d;
    }
  }
  float sum = 0;
  for (size_t i = whole; i < n; ++i) {
    const float d = FloatAt(packed, i) - query[i];
    sum += d * d;
  }
  for (float lane : lanes) sum += lane;
  return sum;
}

}  // namespace chatd
