// In-memory fakes of chatd's own interfaces, for unit tests of the chat service
// and the HTTP contract. Integration tests use the real adapters instead.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "chatd/chat_service.h"
#include "chatd/config.h"
#include "chatd/embeddings.h"
#include "hot_record.h"
#include "chatd/idempotency.h"
#include "chatd/llm.h"
#include "chatd/memory.h"
#include "chatd/rate_limiter.h"
#include "chatd/user_id.h"
#include "uid.h"

namespace chatd::testing {

class FakeLimiter : public RateLimiter {
 public:
  Result<RateDecision> Check(const UserId&) override {
    ++calls;
    if (!status.ok()) return status;
    RateDecision d;
    if (too_many_concurrent) {
      d.too_many_concurrent = true;
      d.limit = 30;
      d.remaining = 29;
      d.retry_after_ms = kTooManyConcurrentRetryAfterMs;
      d.window_s = 60;
      return d;
    }
    d.allowed = allowed;
    if (allowed && !lease_id.empty()) {
      d.lease_id = lease_id;
      held.push_back(lease_id);
    }
    d.limit = 30;
    d.remaining = allowed ? 29 : 0;
    d.reset_ms = 1500;
    d.retry_after_ms = allowed ? 0 : 1500;
    d.window_s = 60;
    return d;
  }
  Status Release(const UserId&, std::string_view lease) override {
    released.emplace_back(lease);
    return release_status;
  }
  bool allowed = true;
  bool too_many_concurrent = false;
  std::string lease_id;  // handed out with each admission when set
  std::vector<std::string> held, released;
  Status status, release_status;
  int calls = 0;
};

// Keys in a map, with the Redis adapter's semantics; Complete() is what the
// record script does with a recorded turn's key.
class FakeIdempotency : public IdempotencyStore {
 public:
  struct Entry {
    std::string fingerprint, token, turn_id, response;
  };
  Result<KeyClaim> Claim(const UserId& user, const IdempotencyTicket& t) override {
    ++claim_calls;
    if (!status.ok()) return status;
    KeyClaim claim;
    auto [it, fresh] = keys.try_emplace(user.str() + "/" + t.key, Entry{t.fingerprint, t.token, "", ""});
    if (fresh) return claim;
    if (it->second.fingerprint != t.fingerprint) {
      claim.state = KeyState::kReused;
    } else if (!it->second.turn_id.empty()) {
      claim.state = KeyState::kCompleted;
      claim.turn_id = it->second.turn_id;
      claim.response = it->second.response;
    } else {
      claim.state = KeyState::kInProgress;
    }
    return claim;
  }
  Status Release(const UserId& user, const IdempotencyTicket& t) override {
    ++release_calls;
    auto it = keys.find(user.str() + "/" + t.key);
    if (it != keys.end() && it->second.token == t.token) keys.erase(it);
    return Status::Ok();
  }
  void Complete(const UserId& user, const IdempotencyTicket& t, const std::string& turn_id,
                const std::string& response) {
    keys[user.str() + "/" + t.key] = Entry{t.fingerprint, "", turn_id, response};
  }
  std::map<std::string, Entry> keys;
  Status status;
  int claim_calls = 0, release_calls = 0;
};

class FakeShortTerm : public ShortTermStore {
 public:
  Result<UserMemory> Read(const UserId& user) override {
    ++recent_calls;
    if (!recent_status.ok()) return recent_status;
    UserMemory m;
    m.recent = messages[user.str()];
    for (const StoredMessage& h : hot[user.str()]) m.hot.push_back(PackHotRecord(h));
    m.older_in_long_term = older[user.str()];
    if (auto o = older_ids.find(user.str()); o != older_ids.end()) {
      m.older_ids = o->second;
      m.older_listed = true;
    }
    m.fence = tombstone[user.str()];
    return m;
  }
  Status RecordTurn(const Turn& turn) override {
    ++record_calls;
    if (!record_status.ok() && !record_status_after_write) return record_status;
    // The erase fence, as the record script applies it.
    auto t = tombstone.find(turn.user_id.str());
    if (t != tombstone.end() && !t->second.empty() && t->second != turn.fence) {
      return Status(Code::kConflict, "memory_erased", "erased meanwhile");
    }
    if (!turn.release_lease_id.empty()) released_leases.push_back(turn.release_lease_id);
    if (turn.idempotency != nullptr && idempotency != nullptr) {
      idempotency->Complete(turn.user_id, *turn.idempotency, turn.turn_id, turn.assistant_message);
    }
    turns.push_back(turn);
    auto& list = messages[turn.user_id.str()];
    list.push_back({Role::kUser, turn.user_message, 1, turn.turn_id + ":u"});
    list.push_back({Role::kAssistant, turn.assistant_message, 1, turn.turn_id + ":a"});
    while (list.size() > 4) list.erase(list.begin());
    return record_status;
  }
  std::map<std::string, std::vector<Message>> messages;
  std::map<std::string, std::vector<StoredMessage>> hot;
  std::map<std::string, bool> older;
  std::map<std::string, std::vector<std::string>> older_ids;  // listed older messages, when set
  std::map<std::string, std::string> tombstone;  // user -> the erase's tombstone
  std::vector<Turn> turns;
  std::vector<std::string> released_leases;  // released with a recorded turn
  Status recent_status, record_status;
  // record_status is returned after the turn was written (an answer lost in
  // transit), not instead of writing it.
  bool record_status_after_write = false;
  FakeIdempotency* idempotency = nullptr;  // keeps the answer of a keyed turn, as the record script does
  int recent_calls = 0, record_calls = 0;
};

class FakeLongTerm : public LongTermStore {
 public:
  Result<RecallResult> Recall(const UserId&, const std::vector<float>&, size_t k,
                              const std::vector<std::string>& exclude) override {
    ++recall_calls;
    last_exclude = exclude;
    if (!status.ok()) return status;
    RecallResult out;
    out.foreign_dropped = foreign_dropped;
    for (const auto& m : memories) {
      bool excluded = false;
      for (const auto& id : exclude) excluded |= (id == m.message.id);
      if (!excluded && out.messages.size() < k) out.messages.push_back(m);
    }
    return out;
  }
  Result<RecallResult> RecallAmong(const UserId&, const std::vector<float>&, size_t k,
                                   const std::vector<std::string>& ids) override {
    ++recall_among_calls;
    last_among = ids;
    if (!status.ok()) return status;
    RecallResult out;
    out.foreign_dropped = foreign_dropped;
    for (const auto& m : memories) {
      bool listed = false;
      for (const auto& id : ids) listed |= (id == m.message.id);
      if (listed && out.messages.size() < k) out.messages.push_back(m);
    }
    return out;
  }
  Status Upsert(const std::vector<StoredMessage>& messages) override {
    ++upsert_calls;
    if (!upsert_status.ok()) return upsert_status;
    for (const StoredMessage& m : messages) {
      if (!poison.empty() && m.content.find(poison) != std::string::npos) return poison_status;
    }
    for (const StoredMessage& m : messages) stored.push_back(m);
    return Status::Ok();
  }
  std::vector<RecalledMessage> memories;
  std::vector<std::string> last_exclude;
  std::vector<std::string> last_among;
  size_t foreign_dropped = 0;
  Status status;
  int recall_calls = 0, recall_among_calls = 0;
  // Upsert: everything fails with upsert_status, or a batch holding a text
  // containing `poison` fails with poison_status.
  Status upsert_status;
  std::string poison;
  Status poison_status;
  std::vector<StoredMessage> stored;
  int upsert_calls = 0;
};

class FakeEmbedder : public Embedder {
 public:
  size_t dimensions() const override { return 4; }
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& texts) override {
    ++calls;
    if (!status.ok()) return status;
    return std::vector<std::vector<float>>(texts.size(), std::vector<float>{1, 0, 0, 0});
  }
  Status status;
  int calls = 0;
};

class FakeLlm : public Llm {
 public:
  Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline) override {
    ++calls;
    last_prompt = messages;
    if (during) during();  // something that happens while the model thinks
    if (!status.ok()) return status;
    LlmReply r;
    r.content = "reply to " + messages.back().content;
    r.attempts = 1;
    return r;
  }
  std::vector<ChatMessage> last_prompt;
  std::function<void()> during;
  Status status;
  int calls = 0;
};

// The chat service's stores and limiter, for fixtures that bring their own model.
struct FakeServiceDeps {
  FakeLimiter limiter;
  FakeShortTerm recent;
  FakeLongTerm long_term;
  FakeEmbedder embedder;
};

// Every dependency of a ChatService, faked, with the short-term store
// keeping keyed answers where the record script would.
struct ServiceFakes : FakeServiceDeps {
  FakeLlm llm;
  FakeIdempotency keys;
  ServiceFakes() { recent.idempotency = &keys; }
};

// A chat service on fakes, for tests of the HTTP layer.
struct ChatServiceFakes : ServiceFakes {
  Config config;
  ChatService service{limiter, recent, long_term, embedder, llm, ChatServiceOptions{}, &keys};
};

}  // namespace chatd::testing
