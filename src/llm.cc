#include "chatd/llm.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <thread>

#include "http_client.h"
#include "json.h"
#include "json_document.h"
#include "chatd/log.h"
#include "openai_chat.h"
#include "json_writer.h"

namespace chatd {

namespace {

// Longest error code or type of an upstream error object that we log; longer
// ones are not the short identifiers OpenAI sends and are left out.
constexpr size_t kMaxLoggedErrorCode = 64;
// A Retry-After longer than this is not worth waiting for inside one request.
constexpr int64_t kMaxRetryAfterMs = 60'000;
constexpr double kJitterFraction = 0.25;

double Jitter01() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
}

// A short identifier of [A-Za-z0-9_.-], as OpenAI's error "type" and "code"
// are; anything else could be text and stays out of the log.
bool IsIdentifier(const rapidjson::Value& v) {
  if (!v.IsString() || v.GetStringLength() == 0 || v.GetStringLength() > kMaxLoggedErrorCode) return false;
  for (char c : std::string_view(v.GetString(), v.GetStringLength())) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
          c == '-')) {
      return false;
    }
  }
  return true;
}

void LogUpstreamError(long status, std::string_view body, int attempt) {
  LogLine line = LogWarn("model_error");
  line.Int("upstream_status", status).Int("attempt", attempt);
  // A reply, even a malformed or an error one, may carry conversation text
  // (the model's answer, or an error that quotes the prompt): log what it
  // looks like, never what it says.
  BodyShape shape = DescribeBody(body);
  line.Int("upstream_body_bytes", static_cast<int64_t>(body.size())).Str("upstream_body_shape", shape.kind);
  if (!shape.error_type.empty()) line.Str("upstream_error_type", shape.error_type);
  if (!shape.error_code.empty()) line.Str("upstream_error_code", shape.error_code);
  line.Emit();
}

// Token counts of a reply's or a last chunk's "usage" object, when present.
void ReadUsage(const rapidjson::Value& doc, LlmReply& reply) {
  auto usage = doc.FindMember("usage");
  if (usage == doc.MemberEnd() || !usage->value.IsObject()) return;
  auto p = usage->value.FindMember("prompt_tokens");
  if (p != usage->value.MemberEnd() && p->value.IsInt64()) reply.prompt_tokens = p->value.GetInt64();
  auto c = usage->value.FindMember("completion_tokens");
  if (c != usage->value.MemberEnd() && c->value.IsInt64()) reply.completion_tokens = c->value.GetInt64();
}

constexpr std::string_view kStreamEnd = "[DONE]";

Status ModelError(const char* why) { return Status(Code::kUpstream, "model_error", why); }

}  // namespace

BodyShape DescribeBody(std::string_view body) {
  BodyShape shape;
  size_t first = body.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos) {
    shape.kind = "empty";
    return shape;
  }
  LocalJsonDocument doc;
  doc.Parse<rapidjson::kParseIterativeFlag>(body.data(), body.size());
  if (doc.HasParseError()) {
    auto c = static_cast<unsigned char>(body[first]);
    shape.kind = c == '<'                                      ? "not_json:markup"
                 : c == '{' || c == '['                         ? "not_json:truncated_or_bad_json"
                 : c >= 0x80                                   ? "not_json:non_ascii"
                 : c < 0x20 || c == 0x7f                       ? "not_json:control"
                 : (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ? "not_json:text"
                                                               : "not_json:other";
    return shape;
  }
  shape.kind = doc.IsObject()   ? "json:object"
               : doc.IsArray()  ? "json:array"
               : doc.IsString() ? "json:string"
               : doc.IsNumber() ? "json:number"
               : doc.IsBool()   ? "json:bool"
                                : "json:null";
  if (!doc.IsObject()) return shape;
  auto error = doc.FindMember("error");
  if (error == doc.MemberEnd() || !error->value.IsObject()) return shape;
  auto type = error->value.FindMember("type");
  if (type != error->value.MemberEnd() && IsIdentifier(type->value)) shape.error_type = type->value.GetString();
  auto code = error->value.FindMember("code");
  if (code != error->value.MemberEnd() && IsIdentifier(code->value)) shape.error_code = code->value.GetString();
  return shape;
}

std::string BuildChatCompletionBody(const OpenAIChatOptions& options, const std::vector<ChatMessage>& messages,
                                    bool stream) {
  size_t size = 128 + options.model.size();
  for (const auto& m : messages) size += m.content.size() + 32;
  std::string out;
  out.reserve(size);
  JsonWriter w(out);
  w.StartObject().Key("model").String(options.model).Key("messages").StartArray();
  for (const ChatMessage& m : messages) {
    w.StartObject().Key("role").String(m.role).Key("content").String(m.content).EndObject();
  }
  w.EndArray();
  w.Key(options.max_tokens_field).Int(options.max_completion_tokens);
  w.Key("stream").Bool(stream);
  // Without include_usage a stream carries no token counts at all.
  if (stream) w.Key("stream_options").StartObject().Key("include_usage").Bool(true).EndObject();
  w.EndObject();
  return out;
}

Result<LlmReply> ParseChatCompletion(std::string_view body) {
  auto bad = [](const char* why) { return Status(Code::kUpstream, "model_error", why); };
  LocalJsonDocument doc;
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
  ReadUsage(doc, reply);
  return reply;
}

ChatStreamDecoder::ChatStreamDecoder(StreamSink& sink) : sink_(sink), parser_(kMaxHttpResponseBytes) {}

Status ChatStreamDecoder::Feed(std::string_view bytes) {
  if (!failed_.ok()) return failed_;
  if (stopped_ || done_) return Status::Ok();
  events_.clear();
  Status parsed = parser_.Feed(bytes, events_);
  // Events completed before a failure are still the model's words: deliver them.
  for (const SseEvent& event : events_) {
    if (done_ || stopped_) break;
    if (Status s = Chunk(event.data); !s.ok()) {
      failed_ = s;
      return s;
    }
  }
  if (!parsed.ok() && failed_.ok() && !done_ && !stopped_) failed_ = parsed;
  return failed_;
}

Status ChatStreamDecoder::Chunk(std::string_view data) {
  if (data == kStreamEnd) {
    done_ = true;
    return Status::Ok();
  }
  LocalJsonDocument doc;
  doc.Parse<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(data.data(), data.size());
  if (doc.HasParseError() || !doc.IsObject()) return ModelError("The model streamed a malformed chunk");
  // A stream that already answered 200 reports a failure as an error object.
  if (auto error = doc.FindMember("error"); error != doc.MemberEnd() && !error->value.IsNull()) {
    error_event_ = true;
    return ModelError("The model failed while streaming");
  }
  ReadUsage(doc, reply_);
  auto choices = doc.FindMember("choices");
  if (choices == doc.MemberEnd() || !choices->value.IsArray()) return ModelError("The model streamed no choices");
  if (choices->value.Empty()) return Status::Ok();  // the usage chunk
  const auto& first = choices->value[0];
  if (!first.IsObject()) return ModelError("The model streamed a malformed chunk");
  if (auto finish = first.FindMember("finish_reason"); finish != first.MemberEnd() && finish->value.IsString()) {
    reply_.finish_reason = finish->value.GetString();
  }
  auto delta = first.FindMember("delta");
  if (delta == first.MemberEnd() || !delta->value.IsObject()) return Status::Ok();
  auto content = delta->value.FindMember("content");
  // The first chunk carries only the role, with "content": "" or null.
  if (content == delta->value.MemberEnd() || !content->value.IsString() || content->value.GetStringLength() == 0) {
    return Status::Ok();
  }
  // Each chunk's text is a whole JSON string, so it is whole characters;
  // escapes can still decode to a lone surrogate, which we must not pass on.
  std::string text =
      SanitizeUtf8(std::string_view(content->value.GetString(), content->value.GetStringLength()));
  if (reply_.content.size() + text.size() > kMaxHttpResponseBytes) {
    return Status(Code::kUpstream, "response_too_large", "The model's reply is larger than the limit");
  }
  reply_.content.append(text);
  ++deltas_sent_;
  if (sink_.OnDelta(text) == SinkAction::kStop) stopped_ = true;
  return Status::Ok();
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
  // Clamped while still a double: converting 1e20 to int64_t first is
  // undefined behaviour. parse_number has already refused NaN, infinities
  // and negative values.
  auto clamp_ms = [](double ms) {
    return static_cast<int64_t>(std::min(ms, static_cast<double>(kMaxRetryAfterMs)));
  };
  double hint = 0;
  if (!retry_after_ms.empty() && parse_number(retry_after_ms, hint)) return clamp_ms(hint);
  // Only the delta-seconds form; an HTTP-date hint falls back to backoff.
  if (!retry_after.empty() && parse_number(retry_after, hint)) return clamp_ms(hint * 1000);
  double backoff = static_cast<double>(options.backoff_base_ms) * std::pow(2.0, attempt);
  backoff = std::min(backoff, static_cast<double>(options.backoff_max_ms));
  return static_cast<int64_t>(backoff * (1.0 - kJitterFraction * jitter01));
}

namespace {

HttpCall ChatCompletionCall(const OpenAIChatOptions& options, const std::vector<ChatMessage>& messages, bool stream) {
  HttpCall call;
  call.method = "POST";
  call.url = options.base_url + "/chat/completions";
  call.body = BuildChatCompletionBody(options, messages, stream);
  call.headers.push_back("Content-Type: application/json");
  if (!options.api_key.empty()) call.headers.push_back("Authorization: Bearer " + options.api_key);
  call.connect_timeout_ms = options.connect_timeout_ms;
  return call;
}

// Sleeps before retry `attempt` and returns true, or returns false when no
// retry is left or it could not finish before the deadline.
bool WaitBeforeRetry(const OpenAIChatOptions& options, int attempt, std::string_view retry_after,
                     std::string_view retry_after_ms, Deadline deadline) {
  if (attempt == options.max_retries) return false;
  int64_t delay = RetryDelayMs(options, attempt, retry_after, retry_after_ms, Jitter01());
  if (delay >= deadline.RemainingMs()) return false;
  std::this_thread::sleep_for(std::chrono::milliseconds(delay));
  return true;
}

// Logs an error answer; false when it must not be retried, else the server's
// retry hints (views into `resp`) are kept for the backoff.
bool RetryableAnswer(const HttpResponse& resp, int attempt, std::string_view& retry_after,
                     std::string_view& retry_after_ms) {
  LogUpstreamError(resp.status, resp.body, attempt);
  if (!IsRetryableStatus(resp.status, resp.body)) return false;
  retry_after = resp.retry_after;
  retry_after_ms = resp.retry_after_ms;
  return true;
}

Status ModelTimeout() { return Status(Code::kDeadlineExceeded, "model_timeout", "The model did not answer in time"); }

// Feeds a stream's body to the decoder and relays the sink's "stop" to curl.
class DecoderFeed : public HttpStreamSink {
 public:
  DecoderFeed(ChatStreamDecoder& decoder, StreamSink& sink) : decoder_(decoder), sink_(sink) {}
  bool OnData(std::string_view bytes) noexcept override {
    // Failures stay in the decoder; a stopped or failed decoder ends the
    // transfer. Running out of memory ends it too: nothing may unwind
    // through curl's C frames.
    try {
      return decoder_.Feed(bytes).ok() && !decoder_.stopped();
    } catch (...) {
      out_of_memory_ = true;
      return false;
    }
  }
  bool out_of_memory() const { return out_of_memory_; }
  bool KeepGoing() noexcept override {
    if (decoder_.stopped()) return false;
    if (sink_.Poll() == SinkAction::kStop) {
      stopped_ = true;
      return false;
    }
    return true;
  }
  bool stopped() const { return stopped_ || decoder_.stopped(); }

 private:
  ChatStreamDecoder& decoder_;
  StreamSink& sink_;
  bool stopped_ = false;
  bool out_of_memory_ = false;
};

}  // namespace

Result<LlmReply> OpenAIChat::Complete(const std::vector<ChatMessage>& messages, Deadline deadline) {
  HttpCall call = ChatCompletionCall(options_, messages, /*stream=*/false);

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
      return ModelTimeout();
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
      last = Status(Code::kUpstream, "model_error", "The model returned an error");
      if (!RetryableAnswer(*resp, attempt, retry_after, retry_after_ms)) return last;
    }

    if (!WaitBeforeRetry(options_, attempt, retry_after, retry_after_ms, deadline)) break;
  }
  if (deadline.Expired()) return ModelTimeout();
  return last;
}

Result<LlmReply> OpenAIChat::Stream(const std::vector<ChatMessage>& messages, Deadline deadline, StreamSink& sink) {
  HttpCall call = ChatCompletionCall(options_, messages, /*stream=*/true);
  call.idle_timeout_ms = options_.stream_idle_timeout_ms;
  auto started = SteadyClock::now();
  Status last = Status(Code::kUpstream, "model_error", "The model is unavailable");

  for (int attempt = 0; attempt <= options_.max_retries; ++attempt) {
    int64_t left = deadline.RemainingMs();
    if (left <= 0) break;
    // The whole stream runs within the request deadline; the inter-chunk
    // deadline (idle_timeout_ms) bounds each wait inside it.
    call.timeout_ms = left;
    call.connect_timeout_ms = std::min(options_.connect_timeout_ms, left);

    ChatStreamDecoder decoder(sink);
    DecoderFeed feed(decoder, sink);
    Result<HttpResponse> resp = ThreadHttpClient().SendStreaming(call, feed);
    auto finish = [&](LlmReply& reply) {
      reply.attempts = attempt + 1;
      reply.upstream_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - started).count();
    };
    if (feed.stopped()) {
      LlmReply& reply = decoder.reply();
      reply.stopped = true;
      finish(reply);
      return std::move(reply);
    }
    if (feed.out_of_memory()) return Internal("out_of_memory", "out of memory reading the model's stream");
    std::string_view retry_after, retry_after_ms;
    const Status& decoded = decoder.status();
    if (!decoded.ok()) {
      LogWarn("model_stream_error")
          .Str("reason", decoded.reason())
          .Bool("error_event", decoder.error_event())
          .Int("deltas", static_cast<int64_t>(decoder.deltas_sent()))
          .Int("attempt", attempt)
          .Emit();
      // An error object may be transient (an overloaded server); a malformed stream is not.
      if (!decoder.error_event()) return decoded;
      last = decoded;
    } else if (!resp.ok()) {
      const std::string& why = resp.status().reason();
      LogWarn("model_unreachable")
          .Str("reason", why)
          .Str("detail", resp.status().message())
          .Int("deltas", static_cast<int64_t>(decoder.deltas_sent()))
          .Int("attempt", attempt)
          .Emit();
      if (why == "timeout" && resp.status().code() == Code::kDeadlineExceeded) return ModelTimeout();
      last = why == "idle_timeout"
                 ? Status(Code::kDeadlineExceeded, "model_stalled", "The model stopped sending its reply")
                 : Status(Code::kUpstream, "model_error", "The model is unavailable");
    } else if (resp->status >= 200 && resp->status < 300) {
      if (decoder.done()) {
        LlmReply& reply = decoder.reply();
        finish(reply);
        return std::move(reply);
      }
      LogWarn("model_stream_error").Str("reason", "ended_early").Int("attempt", attempt).Emit();
      last = Status(Code::kUpstream, "model_error", "The model's stream ended before its end marker");
    } else {
      last = Status(Code::kUpstream, "model_error", "The model returned an error");
      if (!RetryableAnswer(*resp, attempt, retry_after, retry_after_ms)) return last;
    }
    // Once the client has a piece of this attempt, a retry would repeat or
    // contradict it.
    if (decoder.deltas_sent() > 0) return last;
    if (!WaitBeforeRetry(options_, attempt, retry_after, retry_after_ms, deadline)) break;
  }
  if (deadline.Expired()) return ModelTimeout();
  return last;
}

}  // namespace chatd
