// Outgoing HTTP over libcurl. One HttpClient per thread (ThreadHttpClient), so
// each thread reuses its connections (keep-alive, TLS sessions) without locks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

namespace chatd {

// A response body above this is refused: every API we call answers in
// kilobytes, and an unbounded buffer would let one upstream exhaust memory.
inline constexpr size_t kMaxHttpResponseBytes = 8 * 1024 * 1024;

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
  int64_t timeout_ms = 10000;  // whole call; <= 0 fails at once with kDeadlineExceeded
  size_t max_response_bytes = kMaxHttpResponseBytes;
  // Streaming only (SendStreaming): no body bytes for this long ends the call
  // (kDeadlineExceeded, reason "idle_timeout"); <= 0 turns it off. Checked by
  // curl's progress callback, which runs at least about once a second.
  int64_t idle_timeout_ms = 0;
};

// Where SendStreaming hands a successful (2xx) response's body, as it arrives.
// Called from inside curl's C callbacks: implementations must not throw.
class HttpStreamSink {
 public:
  virtual ~HttpStreamSink() = default;
  // Body bytes of a 2xx response. false aborts the transfer.
  virtual bool OnData(std::string_view bytes) noexcept = 0;
  // Polled while the transfer runs, data or not. false aborts the transfer.
  virtual bool KeepGoing() noexcept = 0;
};

class HttpClient {
 public:
  HttpClient();
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Any HTTP status is a response; only transport failures are errors:
  // kDeadlineExceeded (reason "timeout"), kUnavailable (reason "connect"), or
  // kUpstream (reason "response_too_large") when the body exceeds
  // call.max_response_bytes. kInternal for a method other than GET/POST/DELETE.
  Result<HttpResponse> Send(const HttpCall& call);

  // Like Send, but the body of a 2xx response goes to `sink` piece by piece
  // instead of into HttpResponse::body (the body of any other status is
  // buffered as usual, for error handling). Also kUnavailable (reason
  // "aborted") when the sink stopped the transfer, and kDeadlineExceeded
  // (reason "idle_timeout") when call.idle_timeout_ms passed without data.
  Result<HttpResponse> SendStreaming(const HttpCall& call, HttpStreamSink& sink);

 private:
  Result<HttpResponse> Perform(const HttpCall& call, HttpStreamSink* sink);

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// curl_global_init, once per process; call it from main before threads start.
// Idempotent, and HttpClient calls it too, so forgetting it is not a bug.
void InitHttpGlobal();

// This thread's client, created on first use.
HttpClient& ThreadHttpClient();

}  // namespace chatd
