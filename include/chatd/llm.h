// The language model behind the chat: any OpenAI-compatible chat-completions API.
#pragma once

#include <cstdint>
#include <string>
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
};

// Thread-safe.
class Llm {
 public:
  virtual ~Llm() = default;
  // kDeadlineExceeded when `deadline` passes, kUpstream for any other failure.
  virtual Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline deadline) = 0;
};

}  // namespace chatd
