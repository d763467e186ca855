#include "chatd/http_api.h"

#include <algorithm>
#include <exception>
#include <optional>

#include "chatd/clock.h"
#include "chatd/idempotency.h"
#include "decimal.h"
#include "json.h"
#include "chatd/log.h"
#include "chatd/rate_limiter.h"
#include "chatd/user_id.h"
#include "json_writer.h"

namespace chatd {

namespace {

// A worker that has not beaten for this long counts as gone. Workers beat on
// every turn of their indexer loop, at least every second and a half.
constexpr int64_t kWorkerAliveMs = 5000;
constexpr std::string_view kEventStreamType = "text/event-stream";
// nginx's status for a client that left before the answer.
constexpr int kClientClosedRequest = 499;

// Every /api/chat answer names the policy; those that reached the limiter
// also say what is left (and, rejected, when to come back).
void AddRateHeaders(const std::string& policy, const ChatTrace& trace, HttpReply& reply) {
  if (!trace.rate) {
    reply.headers.emplace_back("RateLimit-Policy", policy);
    return;
  }
  for (auto& h : RateLimitHeaders(*trace.rate)) reply.headers.push_back(std::move(h));
}

// Adds "key": <raw JSON value> to an error body ({"error", "code"}, built by
// ErrorReply) before its closing brace.
void AddErrorMember(std::string& body, std::string_view key, std::string_view raw_json) {
  body.pop_back();
  body.append(",\"").append(key).append("\":").append(raw_json).push_back('}');
}

// The error reply of a refused request, with its reason where the access log
// line will find it.
HttpReply Refuse(RequestContext& ctx, const Status& s) {
  ctx.error_reason = s.reason();
  return ErrorReply(s);
}

// What history and export answer when an archived user's memory could not be
// brought back first.
Status RestoreFailed() {
  return Unavailable("restore_failed", "The archived memory could not be restored; try again shortly");
}

// Whether one media type (parameters allowed) is `wanted`, in any case.
bool MediaTypeIs(std::string_view media_type, std::string_view wanted) {
  std::string_view media = media_type.substr(0, media_type.find(';'));
  while (!media.empty() && (media.back() == ' ' || media.back() == '\t')) media.remove_suffix(1);
  while (!media.empty() && (media.front() == ' ' || media.front() == '\t')) media.remove_prefix(1);
  if (media.size() != wanted.size()) return false;
  for (size_t i = 0; i < wanted.size(); ++i) {
    char c = media[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c != wanted[i]) return false;
  }
  return true;
}

// Writes the reply's events to the client as the model produces them. The
// 200 and its headers go out with the first delta, so that any failure
// before it is still an ordinary JSON error with its own status.
class SseSink : public StreamSink {
 public:
  SseSink(ResponseStream& out, const std::string& policy, const ChatTrace& trace)
      : out_(out), policy_(policy), trace_(trace) {}

  SinkAction OnDelta(std::string_view text) noexcept override {
    const bool first = first_delta_at_ == SteadyClock::time_point{};
    if (first) first_delta_at_ = SteadyClock::now();
    // Nothing may throw into the model client's C callbacks: an allocation
    // failure counts as a lost client.
    try {
      event_.assign("data: ");
      JsonWriter(event_).StartObject().Key("delta").String(text).EndObject();
      event_.append("\n\n");
      const bool sent = Send(event_);
      if (first && sent) first_byte_at_ = SteadyClock::now();
      return sent ? SinkAction::kContinue : SinkAction::kStop;
    } catch (...) {
      gone_ = true;
      return SinkAction::kStop;
    }
  }

  SinkAction Poll() noexcept override {
    if (!gone_ && out_.ClientGone()) gone_ = true;
    return gone_ ? SinkAction::kStop : SinkAction::kContinue;
  }

  bool Send(std::string_view event) {
    if (gone_) return false;
    if (!started_) {
      HttpReply head;
      head.content_type = kEventStreamType;
      // nginx would otherwise buffer the events (fastcgi_buffering is on).
      head.headers.emplace_back("X-Accel-Buffering", "no");
      AddRateHeaders(policy_, trace_, head);
      if (replayed_) head.headers.emplace_back("Idempotent-Replayed", "true");
      started_ = true;
      if (!out_.Start(head)) gone_ = true;
    }
    if (!gone_ && !out_.Write(event)) gone_ = true;
    return !gone_;
  }

  bool started() const { return started_; }
  bool gone() const { return gone_; }
  // When the first delta came from the model, and when its event had gone
  // to nginx (epoch: not yet).
  SteadyClock::time_point first_delta_at() const { return first_delta_at_; }
  SteadyClock::time_point first_byte_at() const { return first_byte_at_; }
  // An Idempotency-Key replay: the stored reply goes out as one delta, with
  // the header a JSON replay carries.
  void MarkReplayed() { replayed_ = true; }

 private:
  ResponseStream& out_;
  const std::string& policy_;
  const ChatTrace& trace_;
  std::string event_;
  bool started_ = false;
  bool gone_ = false;
  bool replayed_ = false;
  SteadyClock::time_point first_delta_at_{};
  SteadyClock::time_point first_byte_at_{};
};

int64_t Microseconds(SteadyClock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

void WriteUsage(JsonWriter& w, const ChatReply& reply) {
  w.Key("usage").StartObject();
  w.Key("prompt_tokens").Int(reply.prompt_tokens).Key("completion_tokens").Int(reply.completion_tokens);
  w.EndObject();
}

HttpReply EndStream(SseSink& sse, const Result<ChatReply>& result, RequestContext& ctx) {
  HttpReply reply;
  reply.streamed = true;
  if (!result.ok()) ctx.error_reason = result.status().reason();
  if (sse.gone()) {
    // Nobody is left to read an event. Before the first byte nothing was
    // sent at all: logged as nginx logs such a request, 499.
    ctx.error_reason = "client_gone";
    if (!sse.started()) reply.status = kClientClosedRequest;
    return reply;
  }
  std::string event;
  if (result.ok() && result->replayed && !sse.started()) {
    // The model was not called again: the stored reply is the one delta.
    sse.MarkReplayed();
    if (!result->response.empty()) sse.OnDelta(result->response);
  }
  if (result.ok()) {
    event.append("data: ");
    JsonWriter w(event);
    w.StartObject().Key("done").Bool(true).Key("turnId").String(result->turn_id);
    WriteUsage(w, *result);
    w.EndObject();
    event.append("\n\n");
  } else {
    // The 200 is out: the failure can only be an event now.
    event.append("event: error\ndata: ").append(ErrorBody(result.status())).append("\n\n");
  }
  sse.Send(event);
  return reply;
}

}  // namespace

bool IsJsonContentType(std::string_view content_type) { return MediaTypeIs(content_type, "application/json"); }

bool AcceptsEventStream(std::string_view accept) {
  while (!accept.empty()) {
    size_t comma = accept.find(',');
    if (MediaTypeIs(accept.substr(0, comma), kEventStreamType)) return true;
    if (comma == std::string_view::npos) break;
    accept.remove_prefix(comma + 1);
  }
  return false;
}

HttpApi::HttpApi(const Config& config, ChatService& chat, Authenticator* auth, Metrics* metrics,
                 HealthProbe* health)
    : config_(config),
      chat_(chat),
      auth_(auth),
      metrics_(metrics),
      health_(health),
      rate_policy_("\"default\";q=" + std::to_string(config.rate_limit) + ";w=" +
                   std::to_string(config.rate_window_s)) {}

HttpReply HttpApi::Handle(const HttpRequest& req, RequestContext& ctx, ResponseStream* stream) {
  try {
    if (req.path == "/api/chat") return Chat(req, ctx, stream);
    if (req.path == "/api/health") return Health(req);
    if (data_ != nullptr) {
      if (req.path == "/api/history") return History(req, ctx);
      if (req.path == "/api/export") return Export(req, ctx);
      if (req.path == "/api/memory") return EraseMemory(req, ctx);
    }
    if (req.path == "/metrics") return MetricsText(req);
    return Refuse(ctx, Status(Code::kNotFound, "not_found", "No such endpoint"));
  } catch (const std::exception& e) {
    LogError("handler_exception").Str("what", e.what()).Emit();
  } catch (...) {
    LogError("handler_exception").Str("what", "unknown").Emit();
  }
  return Refuse(ctx, Internal("internal", "Internal error"));
}

HttpReply HttpApi::Chat(const HttpRequest& req, RequestContext& ctx, ResponseStream* stream) {
  ChatTrace& trace = ctx.chat;
  auto fail = [&](const Status& s) {
    HttpReply reply = Refuse(ctx, s);
    AddRateHeaders(rate_policy_, trace, reply);
    return reply;
  };

  if (req.method != "POST") {
    HttpReply reply = fail(Status(Code::kMethodNotAllowed, "method_not_allowed", "Use POST for /api/chat"));
    reply.headers.emplace_back("Allow", "POST");
    return reply;
  }
  if (req.body_too_large) {
    return fail(Status(Code::kPayloadTooLarge, "body_too_large",
                       "The request body is larger than " + std::to_string(config_.max_body_bytes) + " bytes"));
  }
  if (req.body_unreadable) return fail(InvalidArgument("invalid_body", "The request body could not be read"));
  if (!IsJsonContentType(req.content_type)) {
    return fail(Status(Code::kUnsupportedMediaType, "unsupported_media_type",
                       "Send the body as JSON with Content-Type: application/json"));
  }

  // Credentials before the body: rejecting a bad token must stay cheap.
  Result<Principal> who = Authenticate(req, ctx);
  if (!who.ok()) {
    HttpReply reply = fail(who.status());
    AddChallenge(who.status(), reply);
    return reply;
  }
  Principal principal = std::move(*who);

  Result<ChatRequest> parsed = ParseChatRequest(req.body, config_.max_message_bytes);
  if (!parsed.ok()) return fail(parsed.status());
  if (principal.subject) {
    // A user token speaks for its subject only; naming anyone else is refused.
    if (parsed->user_id && *parsed->user_id != *principal.subject) {
      ctx.user_id = principal.subject->str();
      return fail(Status(Code::kForbidden, "user_mismatch", "The token does not allow speaking as this userId"));
    }
    parsed->user_id = *principal.subject;
  }
  if (!parsed->user_id) return fail(InvalidArgument("missing_field", "The field \"userId\" is required"));
  const UserId& user_id = *parsed->user_id;
  ctx.user_id = user_id.str();

  std::string idempotency_key;
  if (req.idempotency_key) {
    std::optional<std::string> key = ParseIdempotencyKey(*req.idempotency_key);
    if (!key) {
      return fail(InvalidArgument("invalid_idempotency_key",
                                  "The Idempotency-Key header must be 1 to " +
                                      std::to_string(kMaxIdempotencyKeyLength) +
                                      " printable ASCII characters (optionally as a quoted string)"));
    }
    idempotency_key = std::move(*key);
  }

  Deadline deadline = Deadline::In(std::chrono::milliseconds(config_.request_deadline_ms));
  std::optional<SseSink> sse;
  if (stream != nullptr && parsed->stream.value_or(AcceptsEventStream(req.accept))) {
    sse.emplace(*stream, rate_policy_, trace);
  }
  Result<ChatReply> result =
      chat_.Chat(user_id, parsed->message, deadline, trace, idempotency_key, sse ? &*sse : nullptr);
  ctx.chat_called = true;
  ctx.chat_code = result.ok() ? Code::kOk : result.status().code();
  if (sse) {
    ctx.chat_streamed = true;
    ctx.stream_client_gone = sse->gone();
    // A replay's one delta is not the model's: only a model's stream is timed.
    const SteadyClock::time_point none{};
    if (sse->first_byte_at() != none && trace.model_started != none && ctx.started != none) {
      ctx.first_byte_us = Microseconds(sse->first_byte_at() - ctx.started);
      ctx.model_first_delta_us = Microseconds(sse->first_delta_at() - trace.model_started);
    }
  }
  // A reply without a single delta (an empty one) is still a stream.
  if (sse && (result.ok() || sse->started() || sse->gone())) return EndStream(*sse, result, ctx);
  if (!result.ok()) {
    HttpReply reply = fail(result.status());
    if (result.status().code() == Code::kRateLimited && trace.rate) {
      AddErrorMember(reply.body, "retryAfter", std::to_string(RetryAfterSeconds(*trace.rate)));
    } else if (const int wait_s = RetryAfterSeconds(result.status()); wait_s > 0) {
      reply.headers.emplace_back("Retry-After", std::to_string(wait_s));
      AddErrorMember(reply.body, "retryAfter", std::to_string(wait_s));
    }
    if (result.status().reason() == kRecordOutcomeUnknown) {
      // The id the turn has if it landed: the client can look for it, or
      // retry with its Idempotency-Key to learn the outcome.
      std::string turn_id;
      AppendJsonString(turn_id, trace.turn_id);
      AddErrorMember(reply.body, "turnId", turn_id);
    }
    return reply;
  }

  HttpReply reply;
  reply.body.reserve(result->response.size() + 128);
  JsonWriter w(reply.body);
  w.StartObject();
  w.Key("response").String(result->response).Key("requestId").String(req.request_id);
  w.Key("turnId").String(result->turn_id);
  WriteUsage(w, *result);
  w.EndObject();
  AddRateHeaders(rate_policy_, trace, reply);
  if (result->replayed) reply.headers.emplace_back("Idempotent-Replayed", "true");
  return reply;
}

Result<Principal> HttpApi::Authenticate(const HttpRequest& req, RequestContext& ctx) {
  if (auth_ == nullptr) return Principal{};
  Result<Principal> who = auth_->Authenticate(req);
  ctx.auth = who.ok() ? AuthOutcome::kAccepted : AuthOutcome::kRefused;
  ctx.auth_mode = config_.auth_mode == AuthMode::kJwt ? "jwt" : "service";
  return who;
}

void HttpApi::AddChallenge(const Status& refused, HttpReply& reply) {
  // RFC 6750 3.1: no error attribute when no credentials were sent at all.
  reply.headers.emplace_back("WWW-Authenticate",
                             refused.reason() == "missing_token" ? "Bearer" : "Bearer error=\"invalid_token\"");
}

void HttpApi::EnableUserData(UserDataStore* data, RateLimiter* limiter) {
  data_ = data;
  data_limiter_ = limiter;
}

Result<UserId> HttpApi::DataUser(const HttpRequest& req, const char* method, RequestContext& ctx,
                                      HttpReply& refused) {
  auto fail = [&](const Status& s) {
    refused = Refuse(ctx, s);
    return s;
  };
  if (req.method != method) {
    Status s = fail(Status(Code::kMethodNotAllowed, "method_not_allowed",
                           std::string("Use ") + method + " for " + req.path));
    refused.headers.emplace_back("Allow", method);
    return s;
  }
  Result<Principal> who = Authenticate(req, ctx);
  if (!who.ok()) {
    Status s = fail(who.status());
    AddChallenge(s, refused);
    return s;
  }
  Principal principal = std::move(*who);
  Result<std::optional<std::string>> named = QueryParam(req.query, "userId");
  if (!named.ok()) return fail(named.status());
  std::optional<std::string> user = std::move(*named);
  if (principal.subject) {
    // A user token reads and erases its subject's data only.
    if (user && *user != *principal.subject) {
      ctx.user_id = principal.subject->str();
      return fail(Status(Code::kForbidden, "user_mismatch", "The token does not allow acting for this userId"));
    }
    user = *principal.subject;
  }
  if (!user) return fail(InvalidArgument("missing_field", "The query parameter \"userId\" is required"));
  std::optional<UserId> id = UserId::Parse(*user);
  if (!id) return fail(InvalidArgument("invalid_user_id", "userId must be 1 to 64 characters of [A-Za-z0-9_.@-]"));
  ctx.user_id = id->str();
  Result<RateDecision> decision = data_limiter_->Check(*id);
  if (!decision.ok()) {
    return fail(Unavailable("rate_limiter_unavailable", "The rate limiter is unavailable; try again shortly"));
  }
  if (!decision->allowed) {
    Status s = fail(Status(Code::kRateLimited, "rate_limited", "Too many requests"));
    AddErrorMember(refused.body, "retryAfter", std::to_string(RetryAfterSeconds(*decision)));
    for (auto& h : RateLimitHeaders(*decision)) refused.headers.push_back(std::move(h));
    return s;
  }
  return std::move(*id);
}

HttpReply HttpApi::History(const HttpRequest& req, RequestContext& ctx) {
  HttpReply refused;
  Result<UserId> user = DataUser(req, "GET", ctx, refused);
  if (!user.ok()) return refused;
  int limit = kHistoryDefaultLimit;
  Result<std::optional<std::string>> limit_text = QueryParam(req.query, "limit");
  if (!limit_text.ok()) return Refuse(ctx, limit_text.status());
  if (*limit_text) {
    std::optional<int64_t> n = ParseDecimal(**limit_text);
    if (!n || *n < 1 || *n > kHistoryMaxLimit) {
      return Refuse(ctx, InvalidArgument("invalid_limit", "limit must be a whole number from 1 to " +
                                                              std::to_string(kHistoryMaxLimit)));
    }
    limit = static_cast<int>(*n);
  }
  std::optional<HistoryCursor> before;
  Result<std::optional<std::string>> before_text = QueryParam(req.query, "before");
  if (!before_text.ok()) return Refuse(ctx, before_text.status());
  if (*before_text) {
    before = ParseCursor(**before_text);
    if (!before) return Refuse(ctx, InvalidArgument("invalid_cursor", "before must be a cursor from a previous page"));
  }
  // An archived user's history is restored on read, like on a chat.
  if (Result<int64_t> r = data_->RestoreIfArchived(*user); !r.ok()) return Refuse(ctx, RestoreFailed());
  Result<HistoryPage> page = data_->History(*user, limit, before);
  if (!page.ok()) return Refuse(ctx, page.status());
  HttpReply reply;
  reply.body = HistoryBody(*page);
  return reply;
}

HttpReply HttpApi::Export(const HttpRequest& req, RequestContext& ctx) {
  HttpReply refused;
  Result<UserId> user = DataUser(req, "GET", ctx, refused);
  if (!user.ok()) return refused;
  // Restored before the first byte, as History does, so a failure is still an ordinary error reply.
  Result<int64_t> restored = data_->RestoreIfArchived(*user);
  if (!restored.ok()) return Refuse(ctx, RestoreFailed());
  HttpReply reply;
  reply.headers.emplace_back("Content-Disposition", "attachment; filename=\"chatd-export.json\"");
  // Sent on as written, not gathered by nginx first (nor spooled to disk).
  reply.headers.emplace_back("X-Accel-Buffering", "no");
  UserDataStore* data = data_;
  reply.stream = [data, user = *user, n = *restored](const std::function<bool(std::string_view)>& write) {
    Status s = data->Export(user, n, write);
    // The head is gone already: an export cut short ends as a document that
    // is not valid JSON, which the client cannot mistake for a whole one.
    if (!s.ok()) LogError("export_failed").Str("user", user).Str("reason", s.reason()).Emit();
  };
  return reply;
}

HttpReply HttpApi::EraseMemory(const HttpRequest& req, RequestContext& ctx) {
  HttpReply refused;
  Result<UserId> user = DataUser(req, "DELETE", ctx, refused);
  if (!user.ok()) return refused;
  Result<int64_t> erased = data_->Erase(*user);
  if (!erased.ok()) {
    LogError("erase_failed").Str("user", *user).Str("reason", erased.status().reason())
        .Str("detail", erased.status().message()).Emit();
    // Every step is idempotent: a retry finishes the job.
    return Refuse(ctx, Unavailable("erase_failed", "The memory could not be erased completely; retry the request"));
  }
  HttpReply reply;
  reply.body = "{\"deleted\":{\"messages\":" + std::to_string(*erased) + "}}";
  return reply;
}

HttpReply HttpApi::Health(const HttpRequest& req) {
  if (req.method != "GET" && req.method != "HEAD") {
    HttpReply reply = ErrorReply(Status(Code::kMethodNotAllowed, "method_not_allowed", "Use GET for /api/health"));
    reply.headers.emplace_back("Allow", "GET, HEAD");
    return reply;
  }
  HttpReply reply;
  std::vector<DependencyState> deps;
  if (health_ != nullptr) deps = health_->Check();
  bool healthy = true;
  std::string body;
  JsonWriter w(body);
  w.StartObject().Key("dependencies").StartObject();
  std::string down;
  std::string not_ready;  // a Redis loading or busy: back within seconds
  for (size_t i = 0; i < deps.size(); ++i) {
    w.Key(deps[i].name).String(deps[i].state);
    if (!deps[i].healthy) {
      healthy = false;
      down += (down.empty() ? "" : ", ") + deps[i].name;
      if (not_ready.empty() && (deps[i].state == "loading" || deps[i].state == "busy")) {
        not_ready = "redis_" + deps[i].state;
      }
    }
  }
  w.EndObject();
  // Long-term memory falling behind is a degraded service, not a down one:
  // chats are answered, but recall does not see the latest turns yet. The
  // indexers refresh the figure about once a second; a stale one says nothing.
  bool lagging = false;
  if (metrics_ != nullptr) {
    w.Key("workers").Int(static_cast<int64_t>(metrics_->WorkersAlive(kWorkerAliveMs)));
    const SharedMetrics& m = metrics_->shared();
    if (WallMs() - m.index_backlog_at_ms.load(std::memory_order_relaxed) <= kBacklogFreshMs) {
      const int64_t age_ms = m.index_oldest_age_ms.load(std::memory_order_relaxed);
      lagging = age_ms > config_.index_lag_degraded_ms;
      auto read = [](const auto& counter) { return static_cast<int64_t>(counter.load(std::memory_order_relaxed)); };
      w.Key("index").StartObject();
      w.Key("waiting").Int(read(m.index_waiting)).Key("pending").Int(read(m.index_pending));
      w.Key("oldestAgeMs").Int(age_ms).Key("streamLength").Int(read(m.index_stream_length));
      w.Key("deadLetters").Int(read(m.dead_letter_length));
      w.EndObject();
      w.Key("redisMemory").StartObject();
      w.Key("usedBytes").Int(read(m.redis_used_memory)).Key("maxmemoryBytes").Int(read(m.redis_maxmemory));
      w.EndObject();
    }
  }
  w.Key("status").String(!healthy ? "unavailable" : lagging ? "degraded" : "ok");
  if (!healthy) w.Key("error").String("Not available: " + down);
  if (!not_ready.empty()) {
    w.Key("code").String(not_ready);
    reply.headers.emplace_back("Retry-After", std::to_string(RetryAfterSeconds(Unavailable(not_ready, ""))));
  }
  w.EndObject();
  reply.status = healthy ? 200 : 503;
  reply.body = std::move(body);
  return reply;
}

HttpReply HttpApi::MetricsText(const HttpRequest& req) {
  if (req.method != "GET") {
    HttpReply reply = ErrorReply(Status(Code::kMethodNotAllowed, "method_not_allowed", "Use GET for /metrics"));
    reply.headers.emplace_back("Allow", "GET");
    return reply;
  }
  if (metrics_ == nullptr) return ErrorReply(Status(Code::kNotFound, "not_found", "Metrics are off"));
  std::string extra = "# HELP chatd_workers_alive Worker processes with a recent heartbeat.\n"
                      "# TYPE chatd_workers_alive gauge\n"
                      "chatd_workers_alive " + std::to_string(metrics_->WorkersAlive(kWorkerAliveMs)) + "\n";
  if (WallMs() - metrics_->shared().index_backlog_at_ms.load(std::memory_order_relaxed) <= kBacklogFreshMs) {
    const SharedMetrics& m = metrics_->shared();
    extra += "# HELP chatd_index_backlog Recorded turns not yet indexed into Chroma.\n"
             "# TYPE chatd_index_backlog gauge\n"
             "chatd_index_backlog " +
             std::to_string(m.index_waiting.load(std::memory_order_relaxed) +
                            m.index_pending.load(std::memory_order_relaxed)) +
             "\n";
  }
  HttpReply reply;
  reply.content_type = "text/plain; version=0.0.4; charset=utf-8";
  reply.body = metrics_->RenderPrometheus(extra);
  return reply;
}

}  // namespace chatd
