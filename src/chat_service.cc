#include "chatd/chat_service.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#include "chatd/log.h"
#include "prompt.h"
#include "random_id.h"
#include "recall.h"
#include "chatd/user_data.h"

namespace chatd {

namespace {

// Holds an admission's concurrency lease and gives it back when the chat ends,
// whichever way it ends: every early return below releases it. Dismiss() when
// the lease was released otherwise (with the recorded turn).
class LeaseGuard {
 public:
  LeaseGuard(RateLimiter& limiter, const UserId& user_id, std::string lease_id)
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
  const UserId& user_id_;
  std::string lease_id_;
};

// Holds an Idempotency-Key's claim and gives it back when the chat ends
// having stored nothing, so that a retry runs. Dismiss() once the claim must
// stay: the answer replaced it, or the record's outcome is unknown (then the
// claim expires by itself, and until then a retry cannot record twice).
class ClaimGuard {
 public:
  ClaimGuard(IdempotencyStore* store, const UserId& user_id, const std::optional<IdempotencyTicket>& ticket)
      : store_(ticket ? store : nullptr), user_id_(user_id), ticket_(ticket) {}
  ~ClaimGuard() {
    if (store_ == nullptr) return;
    // A lost release blocks the key until the claim expires: the client sees
    // 409 meanwhile, never a second record.
    Status s = store_->Release(user_id_, *ticket_);
    if (!s.ok()) LogWarn("idempotency_release_failed").Str("reason", s.reason()).Str("user", user_id_).Emit();
  }
  ClaimGuard(const ClaimGuard&) = delete;
  ClaimGuard& operator=(const ClaimGuard&) = delete;

  void Dismiss() { store_ = nullptr; }

 private:
  IdempotencyStore* store_;
  const UserId& user_id_;
  const std::optional<IdempotencyTicket>& ticket_;
};

// What a request gets when its key was not free.
Result<ChatReply> AnswerFromClaim(const KeyClaim& claim) {
  switch (claim.state) {
    case KeyState::kInProgress:
      return Status(Code::kConflict, "idempotency_in_progress",
                    "A request with this Idempotency-Key is still in progress; retry after it ends");
    case KeyState::kReused:
      return Status(Code::kUnprocessable, "idempotency_key_reused",
                    "This Idempotency-Key was used with another request; use a new key for a new message");
    case KeyState::kCompleted: {
      ChatReply replay;
      replay.response = claim.response;
      replay.turn_id = claim.turn_id;
      replay.replayed = true;
      return replay;
    }
    case KeyState::kClaimed: break;
  }
  return Internal("idempotency_state", "internal error: a claimed key has no answer");
}

// A Redis loading its data after a restart answers within seconds: a retry
// then succeeds, so the client is told when to come back.
constexpr int kRedisNotReadyRetryAfterS = 2;

bool RedisNotReady(const Status& s) { return s.reason() == "redis_loading" || s.reason() == "redis_busy"; }

// The failure to answer with: Redis not ready says so under its own code,
// anything else is `otherwise`.
Status UnlessNotReady(const Status& cause, Status otherwise) {
  if (cause.reason() == "redis_loading") {
    return Unavailable("redis_loading", "Conversation memory is loading after a restart; try again shortly");
  }
  if (cause.reason() == "redis_busy") return Unavailable("redis_busy", "Conversation memory is busy; try again shortly");
  return otherwise;
}

}  // namespace

std::string NewTurnId() { return RandomHexId(); }

int RetryAfterSeconds(const Status& s) { return RedisNotReady(s) ? kRedisNotReadyRetryAfterS : 0; }

ChatService::ChatService(RateLimiter& limiter, ShortTermStore& recent, LongTermStore& long_term,
                         Embedder& embedder, Llm& llm, ChatServiceOptions options,
                         IdempotencyStore* idempotency)
    : limiter_(limiter),
      recent_(recent),
      long_term_(long_term),
      embedder_(embedder),
      llm_(llm),
      options_(std::move(options)),
      idempotency_(idempotency) {}

Result<ChatReply> ChatService::Chat(const UserId& user_id, const std::string& message, Deadline deadline,
                                    ChatTrace& trace, std::string_view idempotency_key, StreamSink* sink) {
  // 0. An Idempotency-Key is claimed before the limiter: a replay, a 409 and
  // a 422 then cost this one call, and neither quota nor a slot in flight.
  std::optional<IdempotencyTicket> ticket;
  if (!idempotency_key.empty()) {
    if (idempotency_ == nullptr) return Internal("idempotency_unsupported", "Idempotency keys are not set up");
    Result<std::string> fingerprint = Sha256Hex(message);
    if (!fingerprint.ok()) return fingerprint.status();
    ticket = IdempotencyTicket{std::string(idempotency_key), std::move(*fingerprint), RandomHexId(),
                               options_.idempotency_keep_ms};
    Result<KeyClaim> claim = idempotency_->Claim(user_id, *ticket);
    if (!claim.ok()) {
      return UnlessNotReady(claim.status(),
                            Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly"));
    }
    if (claim->state != KeyState::kClaimed) return AnswerFromClaim(*claim);
  }
  ClaimGuard claim_guard(idempotency_, user_id, ticket);

  // 1. Rate limit and the cap on chats in flight first, in one call: a
  // rejected request costs this call and nothing more. A starter reads the
  // memory in the same round trip.
  Result<RateDecision> decision = RateDecision{};
  std::optional<Result<UserMemory>> read_with_decision;
  if (options_.starter != nullptr) {
    ChatStart start = options_.starter->Start(user_id);
    decision = std::move(start.decision);
    read_with_decision = std::move(start.memory);
  } else {
    decision = limiter_.Check(user_id);
  }
  if (decision.ok()) {
    trace.rate = *decision;
    if (decision->too_many_concurrent) {
      return Status(Code::kRateLimited, "too_many_concurrent", "Too many chats of this user in flight");
    }
    if (!decision->allowed) return Status(Code::kRateLimited, "rate_limited", "Too many requests");
  } else if (options_.rate_failure_mode == FailureMode::kOpen) {
    trace.rate_limiter_failed_open = true;  // admitted, logged and counted by the caller
  } else {
    return UnlessNotReady(decision.status(),
                          Unavailable("rate_limiter_unavailable", "The rate limiter is unavailable; try again shortly"));
  }
  LeaseGuard lease(limiter_, user_id, decision.ok() ? std::move(decision->lease_id) : std::string());

  // An archived user's memory comes back before it is read (docs/cleanup.md):
  // the archive stays the durable copy until the restore has landed, so a
  // failure only means this chat goes without it, and the next one retries.
  if (options_.archived != nullptr) {
    Result<int64_t> restored = options_.archived->RestoreIfArchived(user_id);
    if (restored.ok()) {
      trace.restored_records = *restored;
      if (*restored > 0) read_with_decision.reset();  // read before the memory came back
    } else {
      trace.recall_degraded = true;
    }
  }

  // 2. Memory: the recent messages and the hot set, in one round trip.
  // Without it we could neither show the conversation nor record this turn,
  // so there is no degraded mode.
  Result<UserMemory> memory = read_with_decision ? std::move(*read_with_decision) : recent_.Read(user_id);
  if (!memory.ok()) {
    return UnlessNotReady(memory.status(),
                          Unavailable("memory_unavailable", "Conversation memory is unavailable; try again shortly"));
  }
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
      std::vector<std::string> exclude_ids;  // the recent messages: in the prompt already
      exclude_ids.reserve(recent.size());
      for (const auto& m : recent) exclude_ids.push_back(m.id);
      memories = RankHot(memory->hot, embedding, options_.recall_k, exclude_ids);
      if (memory->older_in_long_term) {
        Result<RecallResult> recalled = RecallResult{};
        if (memory->older_listed) {
          // Few older messages: read exactly those by id and rank them here.
          // A filtered vector search over a shared shard costs Chroma many
          // times more than these lookups (memory.md).
          std::vector<std::string> among;
          among.reserve(memory->older_ids.size());
          for (std::string& id : memory->older_ids) {
            if (std::find(exclude_ids.begin(), exclude_ids.end(), id) == exclude_ids.end()) {
              among.push_back(std::move(id));
            }
          }
          if (!among.empty()) {
            trace.long_term_queried = true;
            recalled = long_term_.RecallAmong(user_id, embedding, options_.recall_k, among);
          }
        } else {
          // Chroma holds the hot messages too, so its k nearest, merged with
          // the hot ranking (each id once), are the k nearest overall.
          // Excluding the hot ids instead would make it return k + the hot
          // set's size records (73 by default) and the worker parse them all,
          // for the same answer.
          trace.long_term_queried = true;
          recalled = long_term_.Recall(user_id, embedding, options_.recall_k, exclude_ids);
        }
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
  const auto model_started = SteadyClock::now();
  trace.model_started = model_started;
  Result<LlmReply> reply = sink != nullptr ? llm_.Stream(prompt, deadline, *sink) : llm_.Complete(prompt, deadline);
  trace.upstream_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - model_started).count();
  if (!reply.ok()) {
    trace.model_failed = true;
    trace.model_timed_out = reply.status().code() == Code::kDeadlineExceeded;
    return reply.status();
  }
  trace.model_attempts = reply->attempts;
  trace.prompt_tokens = reply->prompt_tokens;
  trace.completion_tokens = reply->completion_tokens;
  if (reply->stopped) {
    // Nobody saw the whole reply and the client got no turnId: keeping half
    // an answer would put words into memory that the user never read.
    trace.client_gone = true;
    return Unavailable("client_gone", "The client closed the stream before the reply was complete");
  }

  // 7. Record the whole turn atomically; only then do we answer.
  Turn turn(user_id);
  turn.turn_id = NewTurnId();
  turn.user_message = message;
  turn.assistant_message = reply->content;
  turn.user_embedding = std::move(embedding);
  turn.fence = memory->fence;
  if (options_.record_turn_releases_lease) turn.release_lease_id = lease.id();
  if (ticket) turn.idempotency = &*ticket;
  trace.turn_id = turn.turn_id;
  Status recorded = recent_.RecordTurn(turn);
  if (recorded.ok() && !turn.release_lease_id.empty()) lease.Dismiss();
  if (recorded.ok() || recorded.reason() == kRecordOutcomeUnknown) {
    claim_guard.Dismiss();  // the claim is the answer now, or may be
  }
  if (recorded.reason() == kRecordOutcomeUnknown) {
    return Status(Code::kUnavailable, "record_outcome_unknown",
                  "Conversation memory did not confirm the turn: it may or may not have been recorded");
  }
  if (recorded.reason() == "memory_erased") return recorded;  // erased meanwhile: the reply is not given
  if (recorded.code() == Code::kConflict && ticket) {
    // Our claim expired while the model answered and another request took
    // the key: this turn was not recorded; the key's own outcome is the
    // answer. (The guard's compare-and-delete leaves the other's key alone.)
    Result<KeyClaim> claim = idempotency_->Claim(user_id, *ticket);
    if (claim.ok() && claim->state != KeyState::kClaimed) return AnswerFromClaim(*claim);
  }
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
