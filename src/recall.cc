#include "chatd/recall.h"

#include <algorithm>
#include <limits>

namespace chatd {

double SquaredL2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return std::numeric_limits<double>::infinity();
  // float accumulation, as Chroma's HNSW does: identical vectors give 0.
  float sum = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const float d = a[i] - b[i];
    sum += d * d;
  }
  return sum;
}

namespace {

bool Nearer(const RecalledMessage& x, const RecalledMessage& y) {
  if (x.distance != y.distance) return x.distance < y.distance;
  return x.message.ts_ms > y.message.ts_ms;  // a tie goes to the newer message
}

}  // namespace

std::vector<RecalledMessage> RankHot(const std::vector<StoredMessage>& hot, const std::vector<float>& query,
                                     size_t k, const std::unordered_set<std::string>& exclude) {
  std::vector<RecalledMessage> out;
  if (k == 0) return out;
  out.reserve(hot.size());
  for (const StoredMessage& m : hot) {
    if (m.embedding.size() != query.size() || exclude.count(m.id) != 0) continue;
    out.push_back(RecalledMessage{m, SquaredL2(m.embedding, query)});
  }
  const size_t keep = std::min(k, out.size());
  std::partial_sort(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(keep), out.end(), Nearer);
  out.resize(keep);
  return out;
}

std::vector<RecalledMessage> MergeNearest(std::vector<RecalledMessage> a, std::vector<RecalledMessage> b,
                                          size_t k) {
  for (RecalledMessage& r : b) a.push_back(std::move(r));
  std::stable_sort(a.begin(), a.end(), Nearer);
  std::vector<RecalledMessage> out;
  std::unordered_set<std::string> seen;
  for (RecalledMessage& r : a) {
    if (out.size() == k) break;
    if (seen.insert(r.message.id).second) out.push_back(std::move(r));
  }
  return out;
}

}  // namespace chatd
