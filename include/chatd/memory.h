// Per-user memory: short-term (the last few messages, word for word) and
// long-term (every message, recalled by similarity). The chat service sees only
// these interfaces; Redis and Chroma adapters implement them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

namespace chatd {

enum class Role { kUser, kAssistant };
std::string_view RoleName(Role role);  // "user" / "assistant"

struct Message {
  Role role = Role::kUser;
  std::string content;
  int64_t ts_ms = 0;  // wall-clock time the turn was recorded
  std::string id;     // deterministic: "<turn id>:u" or "<turn id>:a"
};

// One finished exchange: recorded all at once or not at all.
struct Turn {
  std::string user_id;
  std::string turn_id;
  std::string user_message;
  std::string assistant_message;
  // The user message's embedding, computed once on the request path and reused
  // by the indexer; empty when embedding failed (the indexer computes it then).
  std::vector<float> user_embedding;
  // When set, the store also releases this concurrency lease of the user's
  // (RateDecision::lease_id) in the same atomic step: the chat then needs no
  // extra round trip to give its slot back. Set only when the lease lives in
  // the store's Redis.
  std::string release_lease_id;
};

// Thread-safe.
class ShortTermStore {
 public:
  virtual ~ShortTermStore() = default;
  // Oldest first. kUnavailable when the store is down.
  virtual Result<std::vector<Message>> Recent(std::string_view user_id) = 0;
  // Atomically appends both halves of the turn, trims to the configured size,
  // queues the turn for long-term indexing and marks the user active.
  virtual Status RecordTurn(const Turn& turn) = 0;
};

// A message as stored in (or recalled from) the long-term store.
struct StoredMessage {
  std::string id;
  std::string user_id;
  std::string turn_id;
  Role role = Role::kUser;
  std::string content;
  int64_t ts_ms = 0;
  std::vector<float> embedding;
};

struct RecalledMessage {
  StoredMessage message;
  double distance = 0;  // smaller is closer
};

// Thread-safe.
class LongTermStore {
 public:
  virtual ~LongTermStore() = default;
  // Up to k messages closest to `embedding`, skipping ids in `exclude_ids`.
  // A user with no memory yet gets an empty list, not an error.
  virtual Result<std::vector<RecalledMessage>> Recall(std::string_view user_id,
                                                      const std::vector<float>& embedding, size_t k,
                                                      const std::vector<std::string>& exclude_ids) = 0;
  // Idempotent: writing the same ids again changes nothing.
  virtual Status Upsert(std::string_view user_id, const std::vector<StoredMessage>& messages) = 0;
};

}  // namespace chatd
