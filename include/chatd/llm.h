// The language model behind the chat: any OpenAI-compatible chat-completions API.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/clock.h"
#include "chatd/status.h"

namespace chatd {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

struct LlmReply {
  std::string content;
  std::string finish_reason;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int attempts = 0;          // 1 + retries
  int64_t upstream_ms = 0;   // time spent waiting on the model, all attempts
  // Streaming only: the sink said stop (its client left), so the model was
  // cut off and `content` is only what arrived before; no usage is known.
  bool stopped = false;
};

enum class SinkAction { kContinue, kStop };

// Where a streamed reply goes, piece by piece. Called on the thread that
// called Llm::Stream, from inside the HTTP client's C callbacks: must not throw.
class StreamSink {
 public:
  virtual ~StreamSink() = default;
  // One piece of the reply, valid UTF-8, never empty. kStop: the client is gone.
  virtual SinkAction OnDelta(std::string_view text) noexcept = 0;
  // Asked while waiting on the model (about once a second at least, and on
  // every read): kStop when the client is gone, so a silent model is cut off too.
  virtual SinkAction Poll() noexcept { return SinkAction::kContinue; }
};

// Thread-safe.
class Llm {
 public:
  virtual ~Llm() = default;
  // kDeadlineExceeded when `deadline` passes, kUpstream for any other failure.
  virtual Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline deadline) = 0;
  // The same reply, handed to `sink` as the model writes it; the result holds
  // the whole text. Retries only before the first delta reached the sink.
  // When the sink says stop, the model is cut off and the result has
  // `stopped` set. This default streams the finished reply as one delta, for
  // models that cannot stream.
  virtual Result<LlmReply> Stream(const std::vector<ChatMessage>& messages, Deadline deadline, StreamSink& sink) {
    Result<LlmReply> reply = Complete(messages, deadline);
    if (reply.ok() && !reply->content.empty() && sink.OnDelta(reply->content) == SinkAction::kStop) {
      reply->stopped = true;
    }
    return reply;
  }
};

}  // namespace chatd
