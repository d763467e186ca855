// The HTTP contract of chatd (docs/api.md): routing, method and media-type
// checks, body validation, and the mapping of results to JSON replies. This is
// the request boundary: nothing thrown below escapes it.
#pragma once

#include "chatd/auth.h"
#include "chatd/chat_service.h"
#include "chatd/config.h"
#include "chatd/health.h"
#include "chatd/metrics.h"
#include "chatd/http.h"
#include "chatd/request_context.h"
#include "chatd/rate_limiter.h"
#include "chatd/user_data.h"

namespace chatd {

class HttpApi {
 public:
  // `auth` may be null: mode off, the body's userId is trusted. `metrics` and
  // `health` may be null in unit tests.
  HttpApi(const Config& config, ChatService& chat, Authenticator* auth, Metrics* metrics, HealthProbe* health);

  // Serves /api/history, /api/export and /api/memory from `data`, limited
  // per user by `limiter` (apart from the chat's). Without it they answer 404.
  void EnableUserData(UserDataStore* data, RateLimiter* limiter);

  // `stream` (may be null: no streaming, e.g. in unit tests) carries
  // server-sent events when the client asks for them (docs/api.md).
  HttpReply Handle(const HttpRequest& req, RequestContext& ctx, ResponseStream* stream = nullptr);

 private:
  // The user a data request is about (token subject or `userId`), after the
  // method, credentials, user and rate checks; otherwise the error reply.
  Result<UserId> DataUser(const HttpRequest& req, const char* method, RequestContext& ctx, HttpReply& refused);
  HttpReply History(const HttpRequest& req, RequestContext& ctx);
  HttpReply Export(const HttpRequest& req, RequestContext& ctx);
  HttpReply EraseMemory(const HttpRequest& req, RequestContext& ctx);
  // The caller (no principal in mode off); the outcome goes into `ctx`.
  Result<Principal> Authenticate(const HttpRequest& req, RequestContext& ctx);
  static void AddChallenge(const Status& refused, HttpReply& reply);  // WWW-Authenticate of a 401
  HttpReply Chat(const HttpRequest& req, RequestContext& ctx, ResponseStream* stream);
  HttpReply Health(const HttpRequest& req);
  HttpReply MetricsText(const HttpRequest& req);

  const Config& config_;
  ChatService& chat_;
  Authenticator* auth_;
  Metrics* metrics_;
  HealthProbe* health_;
  std::string rate_policy_;  // RateLimit-Policy value, fixed by config
  UserDataStore* data_ = nullptr;
  RateLimiter* data_limiter_ = nullptr;
};

// Whether a Content-Type header declares JSON ("application/json", any case,
// parameters such as charset allowed).
bool IsJsonContentType(std::string_view content_type);

// Whether an Accept header asks for server-sent events (text/event-stream
// among its media ranges, any case, with or without parameters).
bool AcceptsEventStream(std::string_view accept);

}  // namespace chatd
