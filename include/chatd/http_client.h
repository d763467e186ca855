// Outgoing HTTP over libcurl. One HttpClient per thread (ThreadHttpClient), so
// each thread reuses its connections (keep-alive, TLS sessions) without locks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

namespace chatd {

struct HttpResponse {
  long status = 0;
  std::string body;
  std::string retry_after;     // raw Retry-After header, if any
  std::string retry_after_ms;  // raw retry-after-ms header (OpenAI), if any
  int64_t elapsed_ms = 0;
};

struct HttpCall {
  std::string method = "POST";  // GET, POST or DELETE
  std::string url;
  std::string body;
  std::vector<std::string> headers;  // "Name: value"
  int64_t connect_timeout_ms = 2000;
  int64_t timeout_ms = 10000;  // whole call
};

class HttpClient {
 public:
  HttpClient();
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Any HTTP status is a response; only transport failures are errors:
  // kDeadlineExceeded (reason "timeout") or kUnavailable (reason "connect").
  Result<HttpResponse> Send(const HttpCall& call);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// This thread's client, created on first use.
HttpClient& ThreadHttpClient();

}  // namespace chatd
