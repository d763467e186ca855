// What the OpenAI-compatible model sends back (src/llm.cc): the chat
// completion reply, the error body that decides a retry, and the Retry-After /
// retry-after-ms headers.
//
// Input: "<body>\0<Retry-After>\0<retry-after-ms>"; missing fields are empty.
#include <algorithm>

#include "json.h"
#include "chatd/llm.h"
#include "fuzz_input.h"
#include "openai_chat.h"

namespace {
// RetryDelayMs never waits longer than this inside one request (llm.cc).
constexpr int64_t kMaxRetryAfterMs = 60'000;
// Statuses on both sides of the retry rule, 429 with its quota exception.
constexpr long kStatuses[] = {400, 408, 409, 429, 500, 503};
constexpr int kMaxAttempt = 8;
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  using fuzz::Require;
  std::string_view rest = fuzz::Bytes(data, size);
  std::string_view body = fuzz::NextField(rest);
  std::string_view retry_after = fuzz::NextField(rest);
  std::string_view retry_after_ms = fuzz::NextField(rest);

  Result<LlmReply> reply = ParseChatCompletion(body);
  if (reply.ok()) {
    Require(IsValidUtf8(reply->content), "the reply text is UTF-8");
  } else {
    Require(reply.status().code() == Code::kUpstream, "a malformed reply is an upstream error");
  }
  for (long status : kStatuses) (void)IsRetryableStatus(status, body);

  OpenAIChatOptions options;
  const int attempt = static_cast<int>(size % (kMaxAttempt + 1));
  for (double jitter : {0.0, 1.0}) {
    int64_t delay = RetryDelayMs(options, attempt, retry_after, retry_after_ms, jitter);
    Require(delay >= 0 && delay <= std::max(kMaxRetryAfterMs, options.backoff_max_ms), "a bounded retry delay");
  }
  return 0;
}
