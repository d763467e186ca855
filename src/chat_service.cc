#include "chatd/chat_service.h"

#include <algorithm>
#include <cstdint>
#include <unordered_set>

#include "chatd/log.h"
#include "chatd/prompt.h"
#include "chatd/random_id.h"
#include "chatd/recall.h"
#include "chatd/user_data.h"

namespace chatd {

namespace {

// Holds an admission's concurrency lease and gives it back when the chat ends,
// whichever way it ends: every early return below releases it. Dismiss() when
// the lease was released otherwise (with the recorded turn).
class LeaseGuard {
 public:
  LeaseGuard(RateLimiter& limiter, const std::string& user_id, std::string lease_id)
      : limiter_(limiter), user_id_(user_id), lease_id_(std::move(lease_id)) {}
  ~LeaseGuard() {
    if (lease_id_.empty()) return;
    // A lost release costs the user one slot until the lease expires; worth a
    // log line, not a failed answer.
    Status s = limiter_.Release(user_id_, lease_id_);
    if (!s.ok()) LogWarn("lease_release_failed").Str("reason", s.reason()).Str("user", user_id_).Emit();
  }
  LeaseGuard(const LeaseGuard&) = delete;
  LeaseGuard& operator=(const LeaseGuard&) = delete;

  const std::string& id() const { return lease_id_; }
  void Dismiss() { lease_id_.clear(); }

 private:
  RateLimiter& limiter_;
  const std::string& user_id_;
  std::string lease_id_;
};

}  // namespace

std::string NewTurnId() { return RandomHexId(); }

ChatService::ChatService(RateLimiter& limiter, ShortTermStore& recent, LongTermStore& long_term,
                         Embedder& embedder, Llm& llm, ChatServiceOptions options)
    : limiter_(limiter),
      recent_(recent),
      long_term_(long_term),
      embedder_(embedder),
      llm_(llm),
      options_(std::move(options)) {}

Result<ChatReply> ChatService::Chat(const std::string& user_id, const std::string& message, Deadline deadline,
                                    ChatTrace& trace) {
  // 1. Rate limit and the cap on chats in flight first, in one call: a
  // rejected request costs this call and nothing more.
  Result<RateDecision> decision = limiter_.Check(user_id);
  if (decision.ok()) {
    trace.rate = *decision;
    if (decision->too_many_concurrent) {
      return Status(Code::kRateLimited, "too_many_concurrent", "Too many chats of this user in flight");
    }
    if (!decision->allowed) return Status(Code::kRateLimited, "rate_limited", "Too many requests");
  } else if (options_.rate_failure_mode == FailureMode::kOpen) {
    trace.rate_limiter_failed_open = true;  // admitted, logged and counted by the caller
  } else {
    return Unavailable("rate_limiter_unavailable", "The rate limiter is unavailable; try again shortly");
  }
  LeaseGuard lease(limiter_, user_id, decision.ok() ? std::move(decision->lease_id) : std::string());

  // An archived user's memory comes back before it is read (docs/cleanup.md):
  // the archive stays the durable copy until the restore has landed, so a
  // failure only means this chat goes without it, and the next one retries.
  if (options_.archived != nullptr) {
    Result<int64_t> restored = options_.archived->RestoreIfArchived(user_id);
    if (restored.ok()) {
      trace.restored_records = *restored;
    } else {
      trace.recall_degraded = true;
    }
  }

  // 2. Memory: the recent messages and the hot set, in one round trip.
  // Without it we could neither show the conversation nor record this turn,
  // so there is no degraded mode.
  Result<UserMemory> memory = recent_.Read(user_id);
  if (!memory.ok()) return Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly");
  const std::vector<Message>& recent = memory->recent;
  trace.recent_used = recent.size();

  // 3+4. Recall: the hot set in process, and the long-term store only for
  // messages older than the hot set, which exist only once it was trimmed.
  // A failure here degrades to short-term memory only.
  std::vector<float> embedding;
  std::vector<RecalledMessage> memories;
  if (options_.recall_k > 0) {
    auto vectors = embedder_.Embed({message});
    if (vectors.ok() && vectors->size() == 1) {
      embedding = std::move((*vectors)[0]);
      std::unordered_set<std::string> exclude;
      for (const auto& m : recent) exclude.insert(m.id);
      memories = RankHot(memory->hot, embedding, options_.recall_k, exclude);
      if (memory->older_in_long_term) {
        // Everything in the hot set was ranked already: ask only for the rest.
        std::vector<std::string> exclude_ids(exclude.begin(), exclude.end());
        for (const StoredMessage& m : memory->hot) {
          if (exclude.count(m.id) == 0) exclude_ids.push_back(m.id);
        }
        trace.long_term_queried = true;
        auto recalled = long_term_.Recall(user_id, embedding, options_.recall_k, exclude_ids);
        if (recalled.ok()) {
          trace.foreign_records_dropped = recalled->foreign_dropped;
          if (recalled->foreign_dropped > 0) {
            // Chroma ignored our filter: nothing leaked, but an operator must know.
            LogError("recall_foreign_records")
                .Str("user", user_id)
                .Int("dropped", static_cast<int64_t>(recalled->foreign_dropped))
                .Emit();
          }
          memories = MergeNearest(std::move(memories), std::move(recalled->messages), options_.recall_k);
        } else {
          trace.recall_degraded = true;
          LogWarn("recall_degraded").Str("reason", recalled.status().reason()).Str("user", user_id).Emit();
        }
      }
    } else {
      trace.recall_degraded = true;
      LogWarn("recall_degraded").Str("reason", vectors.status().reason()).Str("user", user_id).Emit();
    }
  }
  trace.memories_recalled = memories.size();

  // 5. Prompt.
  PromptInput in;
  in.system_prompt = &options_.system_prompt;
  in.memories = &memories;
  in.recent = &recent;
  in.message = &message;
  in.budget_bytes = options_.prompt_budget_bytes;
  std::vector<ChatMessage> prompt = BuildPrompt(in);

  // 6. The model. On failure nothing of this turn is stored.
  auto model_started = SteadyClock::now();
  Result<LlmReply> reply = llm_.Complete(prompt, deadline);
  trace.upstream_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - model_started).count();
  if (!reply.ok()) {
    trace.model_failed = true;
    trace.model_timed_out = reply.status().code() == Code::kDeadlineExceeded;
    return reply.status();
  }
  trace.model_attempts = reply->attempts;

  // 7. Record the whole turn atomically; only then do we answer.
  Turn turn;
  turn.user_id = user_id;
  turn.turn_id = NewTurnId();
  turn.user_message = message;
  turn.assistant_message = reply->content;
  turn.user_embedding = std::move(embedding);
  turn.fence = memory->fence;
  if (options_.record_turn_releases_lease) turn.release_lease_id = lease.id();
  Status recorded = recent_.RecordTurn(turn);
  if (recorded.ok() && !turn.release_lease_id.empty()) lease.Dismiss();
  if (recorded.code() == Code::kConflict) return recorded;  // erased meanwhile: the reply is not given
  if (!recorded.ok()) {
    return Unavailable("memory_unavailable", "Conversation memory is unavailable; the turn was not recorded");
  }

  ChatReply out;
  out.response = std::move(reply->content);
  out.turn_id = std::move(turn.turn_id);
  out.prompt_tokens = reply->prompt_tokens;
  out.completion_tokens = reply->completion_tokens;
  return out;
}

}  // namespace chatd
