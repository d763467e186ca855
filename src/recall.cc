#include "recall.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>
#include <unordered_set>

#include "hot_record.h"

namespace chatd {

double SquaredL2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  return SquaredL2Packed(reinterpret_cast<const char*>(a.data()), b.data(), a.size());
}

namespace {

bool Nearer(double distance_x, int64_t ts_x, double distance_y, int64_t ts_y) {
  if (distance_x != distance_y) return distance_x < distance_y;
  return ts_x > ts_y;  // a tie goes to the newer message
}

bool NearerMessage(const RecalledMessage& x, const RecalledMessage& y) {
  return Nearer(x.distance, x.message.ts_ms, y.distance, y.message.ts_ms);
}

// Whether the record's message id (MessageId) is one of `ids`, without
// building it: a handful of recent ids, compared for every record.
bool IsExcluded(const HotRecordView& record, const std::vector<std::string>& ids) {
  const std::string_view suffix = MessageIdSuffix(record.role);
  for (const std::string& id : ids) {
    std::string_view v(id);
    if (v.size() == record.turn_id.size() + suffix.size() && v.starts_with(record.turn_id) &&
        v.ends_with(suffix)) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::vector<RecalledMessage> RankHot(const std::vector<std::string>& hot, const std::vector<float>& query,
                                     size_t k, const std::vector<std::string>& exclude_ids) {
  std::vector<RecalledMessage> out;
  if (k == 0) return out;
  // Rank the records in place and decode only the k kept: a hot set is up
  // to CHATD_RECALL_HOT_MESSAGES records of a vector each, and decoding them
  // all cost more than the distances.
  struct Candidate {
    double distance;
    int64_t ts_ms;
    const std::string* record;
  };
  std::vector<Candidate> candidates;
  candidates.reserve(hot.size());
  HotRecordView view;
  for (const std::string& record : hot) {
    // A corrupt record costs recall one candidate; the chat goes on.
    if (!ViewHotRecord(record, view) || view.dimensions() != query.size() || IsExcluded(view, exclude_ids)) {
      continue;
    }
    candidates.push_back(
        Candidate{SquaredL2Packed(view.embedding.data(), query.data(), query.size()), view.ts_ms, &record});
  }
  const size_t keep = std::min(k, candidates.size());
  std::partial_sort(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(keep), candidates.end(),
                    [](const Candidate& x, const Candidate& y) {
                      return Nearer(x.distance, x.ts_ms, y.distance, y.ts_ms);
                    });
  out.reserve(keep);
  for (size_t i = 0; i < keep; ++i) {
    Result<StoredMessage> m = UnpackHotRecord(*candidates[i].record);  // viewed above: cannot fail
    if (m.ok()) out.push_back(RecalledMessage{std::move(*m), candidates[i].distance});
  }
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
