// Recall in process: the hot set (memory.h, UserMemory::hot) ranked by the
// same distance Chroma uses, and merged with what the long-term store found
// among older messages. Ranking a few dozen vectors costs microseconds, which
// is why most chats need no vector database call at all.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "chatd/memory.h"

namespace chatd {

// Squared L2 distance, as Chroma's "l2" space computes it; for unit vectors it
// ranks exactly as cosine does. Vectors of different sizes are infinitely far.
double SquaredL2(const std::vector<float>& a, const std::vector<float>& b);

// The k messages of `hot` (records as hot_record.h packs them) nearest to
// `query`, nearest first, skipping the message ids in `exclude_ids`, records
// whose embedding has another size, and records that do not decode.
std::vector<RecalledMessage> RankHot(const std::vector<std::string>& hot, const std::vector<float>& query,
                                     size_t k, const std::vector<std::string>& exclude_ids);

// The k nearest of both lists, nearest first, each id once.
std::vector<RecalledMessage> MergeNearest(std::vector<RecalledMessage> a, std::vector<RecalledMessage> b,
                                          size_t k);

}  // namespace chatd
