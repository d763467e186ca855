#include "chatd/llm.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <thread>

#include "chatd/http_client.h"
#include "chatd/json.h"
#include "chatd/log.h"

namespace chatd {

namespace {

// How much of an upstream error body goes into our log (never to the client).
constexpr size_t kMaxLoggedBody = 512;
// A Retry-After longer than this is not worth waiting for inside one request.
constexpr int64_t kMaxRetryAfterMs = 60'000;
constexpr double kJitterFraction = 0.25;

double Jitter01() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
}

void LogUpstreamError(long status, std::string_view body, int attempt) {
  std::string_view head = body.substr(0, kMaxLoggedBody);
  LogWarn("model_error")
      .Int("upstream_status", status)
      .Int("attempt", attempt)
      .Str("upstream_body", SanitizeUtf8(head))
      .Emit();
}

}  // namespace

std::string BuildChatCompletionBody(const OpenAIChatOptions& options, const std::vector<ChatMessage>& messages) {
  size_t size = 128 + options.model.size();
  for (const auto& m : messages) size += m.content.size() + 32;
  std::string out;
  out.reserve(size);
  out.append("{\"model\":");
  AppendJsonString(out, options.model);
  out.append(",\"messages\":[");
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i) out.push_back(',');
    out.append("{\"role\":");
    AppendJsonString(out, messages[i].role);
    out.append(",\"content\":");
    AppendJsonString(out, messages[i].content);
    out.push_back('}');
  }
  out.append("],");
  AppendJsonString(out, options.max_tokens_field);
  out.push_back(':');
  out.append(std::to_string(options.max_completion_tokens));
  out.append(",\"stream\":false}");
  return out;
}

Result<LlmReply> ParseChatCompletion(std::string_view body) {
  auto bad = [](const char* why) { return Status(Code::kUpstream, "model_error", why); };
  rapidjson::Document doc;
  doc.Parse<rapidjson::kParseIterativeFlag>(body.data(), body.size());
  if (doc.HasParseError() || !doc.IsObject()) return bad("The model returned a malformed reply");
  auto choices = doc.FindMember("choices");
  if (choices == doc.MemberEnd() || !choices->value.IsArray() || choices->value.Empty()) {
    return bad("The model returned no choices");
  }
  const auto& first = choices->value[0];
  if (!first.IsObject()) return bad("The model returned a malformed reply");
  auto message = first.FindMember("message");
  if (message == first.MemberEnd() || !message->value.IsObject()) return bad("The model returned no message");
  auto content = message->value.FindMember("content");
  if (content == message->value.MemberEnd() || !content->value.IsString()) {
    return bad("The model returned no text");
  }
  LlmReply reply;
  // The model's text goes back to the client and into memory: make it valid UTF-8.
  reply.content = SanitizeUtf8(std::string_view(content->value.GetString(), content->value.GetStringLength()));
  auto finish = first.FindMember("finish_reason");
  if (finish != first.MemberEnd() && finish->value.IsString()) reply.finish_reason = finish->value.GetString();
  auto usage = doc.FindMember("usage");
  if (usage != doc.MemberEnd() && usage->value.IsObject()) {
    auto p = usage->value.FindMember("prompt_tokens");
    if (p != usage->value.MemberEnd() && p->value.IsInt64()) reply.prompt_tokens = p->value.GetInt64();
    auto c = usage->value.FindMember("completion_tokens");
    if (c != usage->value.MemberEnd() && c->value.IsInt64()) reply.completion_tokens = c->value.GetInt64();
  }
  return reply;
}

bool IsRetryableStatus(long status, std::string_view body) {
  if (status == 429) {
    // Out of credit will not fix itself within a request.
    return body.find("insufficient_quota") == std::string_view::npos;
  }
  return status == 408 || status == 409 || status >= 500;
}

int64_t RetryDelayMs(const OpenAIChatOptions& options, int attempt, std::string_view retry_after,
                     std::string_view retry_after_ms, double jitter01) {
  auto parse_number = [](std::string_view s, double& out) {
    std::string text(s);
    char* end = nullptr;
    out = std::strtod(text.c_str(), &end);
    return !text.empty() && end && *end == '\0' && std::isfinite(out) && out >= 0;
  };
  // Capped while still a double: a hint such as "1e300" does not fit in
  // int64_t, and converting it would be undefined behaviour (found by
  // tests/fuzz/fuzz_llm.cc).
  auto capped_ms = [](double ms) {
    return static_cast<int64_t>(std::min(ms, static_cast<double>(kMaxRetryAfterMs)));
  };
  double hint = 0;
  if (!retry_after_ms.empty() && parse_number(retry_after_ms, hint)) return capped_ms(hint);
  // Only the delta-seconds form; an HTTP-date hint falls back to backoff.
  if (!retry_after.empty() && parse_number(retry_after, hint)) return capped_ms(hint * 1000);
  double backoff = static_cast<double>(options.backoff_base_ms) * std::pow(2.0, attempt);
  backoff = std::min(backoff, static_cast<double>(options.backoff_max_ms));
  return static_cast<int64_t>(backoff * (1.0 - kJitterFraction * jitter01));
}

Result<LlmReply> OpenAIChat::Complete(const std::vector<ChatMessage>& messages, Deadline deadline) {
  HttpCall call;
  call.method = "POST";
  call.url = options_.base_url + "/chat/completions";
  call.body = BuildChatCompletionBody(options_, messages);
  call.headers.push_back("Content-Type: application/json");
  if (!options_.api_key.empty()) call.headers.push_back("Authorization: Bearer " + options_.api_key);
  call.connect_timeout_ms = options_.connect_timeout_ms;

  auto started = SteadyClock::now();
  auto elapsed_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - started).count();
  };
  Status last = Status(Code::kUpstream, "model_error", "The model is unavailable");

  for (int attempt = 0; attempt <= options_.max_retries; ++attempt) {
    int64_t left = deadline.RemainingMs();
    if (left <= 0) break;
    call.timeout_ms = std::min(options_.attempt_timeout_ms, left);
    call.connect_timeout_ms = std::min(options_.connect_timeout_ms, left);

    Result<HttpResponse> resp = ThreadHttpClient().Send(call);
    std::string_view retry_after, retry_after_ms;
    // curl may give up a millisecond before our clock agrees the deadline
    // passed: an attempt cut short by the deadline is the deadline's timeout.
    bool capped_by_deadline = call.timeout_ms == left;
    if (!resp.ok() && resp.status().code() == Code::kDeadlineExceeded && capped_by_deadline) {
      LogWarn("model_unreachable").Str("reason", "timeout").Int("attempt", attempt).Emit();
      return Status(Code::kDeadlineExceeded, "model_timeout", "The model did not answer in time");
    }
    if (!resp.ok()) {
      LogWarn("model_unreachable")
          .Str("reason", resp.status().reason())
          .Str("detail", resp.status().message())
          .Int("attempt", attempt)
          .Emit();
      last = Status(Code::kUpstream, "model_error", "The model is unavailable");
    } else if (resp->status == 200) {
      Result<LlmReply> reply = ParseChatCompletion(resp->body);
      if (!reply.ok()) {
        LogUpstreamError(resp->status, resp->body, attempt);
        return reply.status();  // a malformed success is not transient
      }
      reply->attempts = attempt + 1;
      reply->upstream_ms = elapsed_ms();
      return reply;
    } else {
      LogUpstreamError(resp->status, resp->body, attempt);
      last = Status(Code::kUpstream, "model_error", "The model returned an error");
      if (!IsRetryableStatus(resp->status, resp->body)) return last;
      retry_after = resp->retry_after;
      retry_after_ms = resp->retry_after_ms;
    }

    if (attempt == options_.max_retries) break;
    int64_t delay = RetryDelayMs(options_, attempt, retry_after, retry_after_ms, Jitter01());
    if (delay >= deadline.RemainingMs()) break;  // the retry could not finish in time
    std::this_thread::sleep_for(std::chrono::milliseconds(delay));
  }
  if (deadline.Expired()) {
    return Status(Code::kDeadlineExceeded, "model_timeout", "The model did not answer in time");
  }
  return last;
}

}  // namespace chatd
