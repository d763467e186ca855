// The Llm adapter for OpenAI-compatible chat-completions APIs over libcurl, and
// the pieces of it that need no network (for unit tests and the fuzzer).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/llm.h"
#include "chatd/status.h"
#include "sse.h"

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
  // Streaming: the longest wait for the next piece of a stream (the first one
  // included). The request deadline bounds the whole stream.
  int64_t stream_idle_timeout_ms = 10000;
};

// Chat completions over libcurl, one reused handle per thread. Retries
// 408/409/429/5xx and transport failures at most max_retries times with
// exponential backoff and jitter (or the server's Retry-After), never past the
// deadline; never retries 400/401/403 or a 429 for insufficient_quota.
class OpenAIChat : public Llm {
 public:
  explicit OpenAIChat(OpenAIChatOptions options) : options_(std::move(options)) {}
  Result<LlmReply> Complete(const std::vector<ChatMessage>& messages, Deadline deadline) override;
  // Over "stream": true with usage in the last chunk (stream_options).
  Result<LlmReply> Stream(const std::vector<ChatMessage>& messages, Deadline deadline, StreamSink& sink) override;

 private:
  OpenAIChatOptions options_;
};

// Turns the bytes of a streamed chat completion (server-sent events of
// chat.completion.chunk objects, ending with "data: [DONE]") into deltas for
// a sink and the whole reply. One per attempt. Exposed for unit tests and
// the fuzzer.
class ChatStreamDecoder {
 public:
  explicit ChatStreamDecoder(StreamSink& sink);
  // Parses the next bytes, in any pieces. kUpstream ("model_error") for a
  // malformed stream or an error object inside it, ("response_too_large")
  // for a reply above kMaxHttpResponseBytes; once failed, it stays failed.
  // After the sink said stop, the rest is ignored.
  Status Feed(std::string_view bytes);
  bool done() const { return done_; }        // "[DONE]" arrived
  bool stopped() const { return stopped_; }  // the sink said stop
  bool error_event() const { return error_event_; }  // the failure was an error object from the model
  size_t deltas_sent() const { return deltas_sent_; }
  const Status& status() const { return failed_; }  // the failure, once Feed failed
  LlmReply& reply() { return reply_; }

 private:
  Status Chunk(std::string_view data);

  StreamSink& sink_;
  SseParser parser_;
  std::vector<SseEvent> events_;
  LlmReply reply_;
  Status failed_;
  size_t deltas_sent_ = 0;
  bool done_ = false;
  bool stopped_ = false;
  bool error_event_ = false;
};

// Exposed for unit tests.
std::string BuildChatCompletionBody(const OpenAIChatOptions& options, const std::vector<ChatMessage>& messages,
                                    bool stream = false);
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
