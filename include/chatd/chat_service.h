// The chat use case, top to bottom in one function (ChatService::Chat):
//   rate limit -> recent memory -> embed -> recall -> prompt -> model -> record.
// (The first two may come from one call: chat_start.h.)
// It talks only to the interfaces in rate_limiter.h, memory.h, embeddings.h and
// llm.h, so it is unit-tested with fakes and knows nothing of Redis, Chroma,
// curl or FastCGI.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "chatd/chat_start.h"
#include "chatd/clock.h"
#include "chatd/embeddings.h"
#include "chatd/idempotency.h"
#include "chatd/llm.h"
#include "chatd/memory.h"
#include "chatd/rate_limiter.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

class ArchivedMemory;  // user_data.h

struct ChatServiceOptions {
  FailureMode rate_failure_mode = FailureMode::kClosed;
  size_t recall_k = 5;
  std::string system_prompt;
  size_t prompt_budget_bytes = 24 * 1024;
  // The concurrency lease lives in the short-term store's Redis (the counters
  // share it): recording the turn releases it in the same script.
  bool record_turn_releases_lease = false;
  // How long the answer of a request with an Idempotency-Key is replayed.
  int64_t idempotency_keep_ms = 24 * 3600 * 1000;
  // When set, an archived user's memory is restored before their chat reads
  // it (user_data.h); a failed restore degrades to a chat without it.
  ArchivedMemory* archived = nullptr;
  // When set, the admission and the memory read go through it, in one call
  // (chat_start.h), instead of the limiter's Check and the store's Read.
  ChatStarter* starter = nullptr;
};

// What happened along the way, for headers, logs and metrics; filled even when
// Chat fails.
struct ChatTrace {
  std::optional<RateDecision> rate;  // set when the limiter answered
  bool rate_limiter_failed_open = false;
  bool recall_degraded = false;      // embedding or long-term store failed
  int64_t upstream_ms = -1;          // model time, when it was called
  SteadyClock::time_point model_started{};  // when the model was called (epoch: it was not)
  bool model_failed = false;
  bool model_timed_out = false;
  int model_attempts = 0;
  size_t memories_recalled = 0;
  bool long_term_queried = false;    // the hot set was full, so older memories were asked for
  size_t foreign_records_dropped = 0;  // records of other users the long-term store returned
  size_t recent_used = 0;
  // Set when the turn's record was attempted: a record_outcome_unknown
  // answer names it, so the client can look for it.
  std::string turn_id;
  // Tokens the model reported for this request (0 when it reported none),
  // whether or not the turn was then recorded.
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  bool client_gone = false;  // a streamed reply whose client left before the end
  int64_t restored_records = 0;  // brought back from an archive by this chat
};

struct ChatReply {
  std::string response;
  std::string turn_id;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  // The first answer to this Idempotency-Key, given again: the model was not
  // called and nothing was recorded.
  bool replayed = false;
};

class ChatService {
 public:
  // Borrows every dependency; they must outlive the service. Thread-safe.
  // `idempotency` may be null when no request carries an Idempotency-Key.
  ChatService(RateLimiter& limiter, ShortTermStore& recent, LongTermStore& long_term, Embedder& embedder,
              Llm& llm, ChatServiceOptions options, IdempotencyStore* idempotency = nullptr);

  // `idempotency_key`: the request's Idempotency-Key (ParseIdempotencyKey),
  // empty when it sent none. With a `sink`, the reply is streamed to it as
  // the model writes it (Llm::Stream); the turn is still recorded once, whole,
  // at the end, and a client that leaves mid-stream (the sink says stop) ends
  // the chat with kUnavailable "client_gone" and nothing recorded.
  Result<ChatReply> Chat(const UserId& user_id, const std::string& message, Deadline deadline,
                         ChatTrace& trace, std::string_view idempotency_key = {}, StreamSink* sink = nullptr);

 private:
  RateLimiter& limiter_;
  ShortTermStore& recent_;
  LongTermStore& long_term_;
  Embedder& embedder_;
  Llm& llm_;
  ChatServiceOptions options_;
  IdempotencyStore* idempotency_;
};

// A fresh, unique turn id (128 random bits, hex).
std::string NewTurnId();

// Seconds a client should wait before retrying a chat that failed with `s`,
// when the failure is one Redis itself says ends soon (it is loading its data
// after a restart, "redis_loading", or a script holds it, "redis_busy"); 0
// for any other failure.
int RetryAfterSeconds(const Status& s);

}  // namespace chatd
