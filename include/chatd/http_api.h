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

namespace chatd {

class HttpApi {
 public:
  // `auth` may be null: mode off, the body's userId is trusted. `metrics` and
  // `health` may be null in unit tests.
  HttpApi(const Config& config, ChatService& chat, Authenticator* auth, Metrics* metrics, HealthProbe* health);

  // `stream` (may be null: no streaming, e.g. in unit tests) carries
  // server-sent events when the client asks for them (docs/api.md).
  HttpReply Handle(const HttpRequest& req, RequestLog& log, ResponseStream* stream = nullptr);

 private:
  HttpReply Chat(const HttpRequest& req, RequestLog& log, ResponseStream* stream);
  HttpReply Health(const HttpRequest& req);
  HttpReply MetricsText(const HttpRequest& req);
  void Count(const ChatTrace& trace, const Status& status);

  const Config& config_;
  ChatService& chat_;
  Authenticator* auth_;
  Metrics* metrics_;
  HealthProbe* health_;
  std::string rate_policy_;  // RateLimit-Policy value, fixed by config
};

// Whether a Content-Type header declares JSON ("application/json", any case,
// parameters such as charset allowed).
bool IsJsonContentType(std::string_view content_type);

// Whether an Accept header asks for server-sent events (text/event-stream
// among its media ranges, any case, with or without parameters).
bool AcceptsEventStream(std::string_view accept);

}  // namespace chatd
