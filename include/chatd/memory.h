// Per-user memory: short-term (the last few messages, word for word) and
// long-term (every message, recalled by similarity). The chat service sees only
// these interfaces; Redis and Chroma adapters implement them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/idempotency.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

enum class Role { kUser, kAssistant };
std::string_view RoleName(Role role);  // "user" / "assistant"

// A message's id: its turn's id and its half of the turn, "<turn id>:u" for
// the user's message and "<turn id>:a" for the answer. The same everywhere a
// message is kept (the recent list, the hot set, Chroma, archives), so one
// message is one id; the record-turn script writes it too (redis_schema.cc).
std::string_view MessageIdSuffix(Role role);  // ":u" / ":a"
std::string MessageId(std::string_view turn_id, Role role);
struct TurnAndRole {
  std::string_view turn;
  Role role = Role::kUser;
};
// What an id says (its turn views into `id`); nullopt when it does not end
// with a half's suffix.
std::optional<TurnAndRole> SplitMessageId(std::string_view id);

struct Message {
  Role role = Role::kUser;
  std::string content;
  int64_t ts_ms = 0;  // wall-clock time the turn was recorded
  std::string id;     // deterministic: "<turn id>:u" or "<turn id>:a"
};

// One finished exchange: recorded all at once or not at all.
struct Turn {
  // A turn is always some user's: there is no turn without its parsed id.
  explicit Turn(UserId user) : user_id(std::move(user)) {}

  UserId user_id;
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
  // When the request carried an Idempotency-Key: its claim. The store then
  // keeps the answer under the key in the same atomic step as the turn, so no
  // crash between the two can let a retry record the turn again.
  const IdempotencyTicket* idempotency = nullptr;
  // The user's erase tombstone as the chat read it when it started
  // (UserMemory::fence): the store refuses the turn when it differs now, i.e.
  // when the user's memory was erased while the chat was in flight.
  std::string fence;
};

// RecordTurn's reasons besides ok (recorded now, or already by an earlier try
// of the same turn id):
// - the store could not be asked, or refused before writing: not recorded
//   (kUnavailable, any other reason);
// - the store did not answer, even when asked again: the turn may or may not
//   have been recorded (kUnavailable, kRecordOutcomeUnknown);
// - the idempotency key is no longer this request's (its claim expired and
//   another request took it): not recorded (kConflict, kKeyInProgress or
//   kKeyCompleted).
inline constexpr std::string_view kRecordOutcomeUnknown = "record_outcome_unknown";
inline constexpr std::string_view kKeyInProgress = "idempotency_in_progress";
inline constexpr std::string_view kKeyCompleted = "idempotency_key_completed";

// A message as stored in (or recalled from) the long-term store.
struct StoredMessage {
  std::string id;       // "<turn id>:u" or "<turn id>:a", unique within the user
  std::string user_id;
  std::string turn_id;
  Role role = Role::kUser;
  std::string content;
  int64_t ts_ms = 0;
  std::vector<float> embedding;
};

struct RecalledMessage {
  StoredMessage message;
  double distance = 0;  // squared L2 between unit vectors: smaller is closer
};

// What the request path reads of a user's memory, in one round trip.
struct UserMemory {
  std::vector<Message> recent;  // the last few messages, oldest first
  // The user's latest indexed messages, with their embeddings, ranked in
  // process (recall.h) so that recall usually needs no vector database call.
  // Everything here is also in the long-term store. Kept as records packed by
  // hot_record.h, because a chat ranks them all but decodes only the k kept.
  std::vector<std::string> hot;
  // True once the hot set was trimmed: older messages then live only in the
  // long-term store, and recall asks it for those (all but the hot ones).
  // False means the hot set is the user's whole long-term memory,
  // so a user without memory costs no long-term call at all.
  bool older_in_long_term = false;
  // With older_in_long_term: when the user has at most
  // CHATD_RECALL_BY_ID_MAX messages older than the hot set, their message ids
  // (newest first; some may not be indexed yet) and older_listed. Recall then
  // reads exactly those by id and ranks them in process, which costs the vector
  // database a few lookups instead of a filtered search (memory.md). Otherwise
  // empty, and recall searches.
  std::vector<std::string> older_ids;
  bool older_listed = false;
  // The user's erase tombstone at the time of the read (empty: none). Carried
  // to Turn::fence, so that a chat in flight during an erase keeps nothing.
  std::string fence;
};

// Thread-safe.
class ShortTermStore {
 public:
  virtual ~ShortTermStore() = default;
  // The recent messages and the hot set. kUnavailable when the store is down.
  virtual Result<UserMemory> Read(const UserId& user_id) = 0;
  // Atomically appends both halves of the turn, trims to the configured size,
  // queues the turn for long-term indexing and marks the user active.
  // Idempotent by turn id: a second call with the same turn changes nothing
  // and is ok, so a call that failed in transit can be retried safely.
  // kConflict "memory_erased" when the user's memory was erased since the
  // chat read turn.fence: nothing is recorded.
  virtual Status RecordTurn(const Turn& turn) = 0;
};

struct RecallResult {
  std::vector<RecalledMessage> messages;  // nearest first
  // Records of other users the store returned and recall dropped: never more
  // than zero unless the store ignored our filter. Counted and logged.
  size_t foreign_dropped = 0;
};

// Thread-safe.
class LongTermStore {
 public:
  virtual ~LongTermStore() = default;
  // Up to k of the user's messages closest to `embedding`, skipping ids in
  // `exclude_ids` (the recent messages and the hot set, which the caller has
  // already). A user
  // with no memory gets an empty list, not an error. Every returned record is
  // checked to belong to the user.
  virtual Result<RecallResult> Recall(const UserId& user_id, const std::vector<float>& embedding, size_t k,
                                      const std::vector<std::string>& exclude_ids) = 0;
  // Up to k of the user's messages among `message_ids` closest to
  // `embedding`, read by id and ranked by the caller: no vector search, so the
  // cost follows the number of ids (which the caller bounds), not the store's
  // size. Ids the store does not hold are skipped; every returned record is
  // checked to belong to the user.
  virtual Result<RecallResult> RecallAmong(const UserId& user_id, const std::vector<float>& embedding, size_t k,
                                           const std::vector<std::string>& message_ids) = 0;
  // Many users' messages in as few calls as the layout allows (each message
  // names its user). Idempotent: writing the same ids again changes nothing.
  virtual Status Upsert(const std::vector<StoredMessage>& messages) = 0;
};

}  // namespace chatd
