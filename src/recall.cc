#include "chatd/recall.h"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace chatd {

namespace {
// Partial sums of a distance: 8 floats fill one AVX register.
constexpr size_t kDistanceLanes = 8;
}  // namespace

double SquaredL2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return std::numeric_limits<double>::infinity();
  // Independent float lanes, summed at the end, let the compiler use SIMD
  // (one running sum cannot be reordered without -ffast-math); Chroma's HNSW
  // sums in SIMD lanes too. Identical vectors still give exactly 0.
  float lanes[kDistanceLanes] = {};
  const size_t n = a.size();
  const size_t whole = n - n % kDistanceLanes;
  for (size_t i = 0; i < whole; i += kDistanceLanes) {
    for (size_t j = 0; j < kDistanceLanes; ++j) {
      const float d = a[i + j] - b[i + j];
      lanes[j] += d * d;
    }
  }
  float sum = 0;
  for (size_t i = whole; i < n; ++i) {
    const float d = a[i] - b[i];
    sum += d * d;
  }
  for (float lane : lanes) sum += lane;
  return sum;
}

namespace {

bool Nearer(double distance_x, int64_t ts_x, double distance_y, int64_t ts_y) {
  if (distance_x != distance_y) return distance_x < distance_y;
  return ts_x > ts_y;  // a tie goes to the newer message
}

bool NearerMessage(const RecalledMessage& x, const RecalledMessage& y) {
  return Nearer(x.distance, x.message.ts_ms, y.distance, y.message.ts_ms);
}

}  // namespace

std::vector<RecalledMessage> RankHot(const std::vector<StoredMessage>& hot, const std::vector<float>& query,
                                     size_t k, const std::unordered_set<std::string>& exclude) {
  std::vector<RecalledMessage> out;
  if (k == 0) return out;
  // Rank (distance, index) pairs and copy only the k kept messages: a hot set
  // is up to CHATD_RECALL_HOT_MESSAGES messages of a vector each, and copying
  // them all cost more than the distances.
  struct Candidate {
    double distance;
    const StoredMessage* message;
  };
  std::vector<Candidate> candidates;
  candidates.reserve(hot.size());
  for (const StoredMessage& m : hot) {
    if (m.embedding.size() != query.size() || exclude.count(m.id) != 0) continue;
    candidates.push_back(Candidate{SquaredL2(m.embedding, query), &m});
  }
  const size_t keep = std::min(k, candidates.size());
  std::partial_sort(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(keep), candidates.end(),
                    [](const Candidate& x, const Candidate& y) {
                      return Nearer(x.distance, x.message->ts_ms, y.distance, y.message->ts_ms);
                    });
  out.reserve(keep);
  for (size_t i = 0; i < keep; ++i) out.push_back(RecalledMessage{*candidates[i].message, candidates[i].distance});
  return out;
}

std::vector<RecalledMessage> MergeNearest(std::vector<RecalledMessage> a, std::vector<RecalledMessage> b,
                                          size_t k) {
  for (RecalledMessage& r : b) a.push_back(std::move(r));
  std::stable_sort(a.begin(), a.end(), NearerMessage);
  std::vector<RecalledMessage> out;
  std::unordered_set<std::string> seen;
  for (RecalledMessage& r : a) {
    if (out.size() == k) break;
    if (seen.insert(r.message.id).second) out.push_back(std::move(r));
  }
  return out;
}

}  // namespace chatd
