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
};

// Thread-safe.
class Llm {
 public:
  virtual ~Llm() = default;
  // kDeadlineExceeded when `deadline` passes, kUpstream for any other failure.
  virtual Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline deadline) = 0;
};

}  // namespace chatd

namespace chatd {

struct OpenAIChatOptions {
  std::string base_url;  // e.g. https://api.openai.com/v1, no trailing slash
  std::string api_key;   // empty: no Authorization header (local servers)
  std::string model;
  int64_t max_completion_tokens = 512;
  // Newer OpenAI models want "max_completion_tokens"; some compatible servers
  // only know the deprecated "max_tokens".
  std::string max_tokens_field = "max_completion_tokens";
  int64_t connect_timeout_ms = 2000;
  int64_t attempt_timeout_ms = 20000;
  int max_retries = 2;
  int64_t backoff_base_ms = 500;
  int64_t backoff_max_ms = 8000;
};

// Chat completions over libcurl, one reused handle per thread. Retries
// 408/409/429/5xx and transport failures at most max_retries times with
// exponential backoff and jitter (or the server's Retry-After), never past the
// deadline; never retries 400/401/403 or a 429 for insufficient_quota.
class OpenAIChat : public Llm {
 public:
  explicit OpenAIChat(OpenAIChatOptions options) : options_(std::move(options)) {}
  Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline deadline) override;

 private:
  OpenAIChatOptions options_;
};

// Exposed for unit tests.
std::string BuildChatCompletionBody(const OpenAIChatOptions& options, const std::vector<ChatMessage>& messages);
// Parses a 200 body; kUpstream when it is not a chat completion.
Result<LlmReply> ParseChatCompletion(std::string_view body);
// What a model reply looks like, for the log, without a byte of its text:
// "empty", "json:object" (array, string, ...), or "not_json:<first byte class>"
// (markup, text, non_ascii, control, ...); plus the "type" and "code" of an
// OpenAI error object when they are short identifiers.
struct BodyShape {
  std::string kind;
  std::string error_type;
  std::string error_code;
};
BodyShape DescribeBody(std::string_view body);
// Whether a failed attempt with this HTTP status and body may be retried.
bool IsRetryableStatus(long status, std::string_view body);
// Delay before retry `attempt` (0-based): the server's hint when it gave one,
// else min(base * 2^attempt, max) reduced by up to 25% jitter.
int64_t RetryDelayMs(const OpenAIChatOptions& options, int attempt, std::string_view retry_after,
                     std::string_view retry_after_ms, double jitter01);

}  // namespace chatd
