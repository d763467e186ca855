#include "http_client.h"

#include <curl/curl.h>
#include <strings.h>

#include <chrono>
#include <cstring>
#include <string>

#include "chatd/clock.h"

namespace chatd {

namespace {

struct CurlEasyDeleter {
  void operator()(CURL* handle) const { curl_easy_cleanup(handle); }
};
using CurlEasyPtr = std::unique_ptr<CURL, CurlEasyDeleter>;

struct CurlSlistDeleter {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};
using CurlSlistPtr = std::unique_ptr<curl_slist, CurlSlistDeleter>;

// What the C callbacks write into; lives on Send's stack for one transfer.
struct Transfer {
  HttpResponse* response = nullptr;
  size_t max_body = 0;
  bool too_large = false;
  bool out_of_memory = false;
  // Streaming only: where a 2xx body goes, and what stopped the transfer.
  HttpStreamSink* sink = nullptr;
  CURL* curl = nullptr;
  int status_seen = -1;  // -1 unknown, 1 the body is a 2xx's (to the sink), 0 another status's
  int64_t idle_timeout_ms = 0;
  SteadyClock::time_point last_data;
  bool stopped_by_sink = false;
  bool idle_timed_out = false;
};

bool BodyGoesToSink(Transfer& transfer) noexcept {
  if (transfer.sink == nullptr) return false;
  if (transfer.status_seen < 0) {
    long status = 0;
    curl_easy_getinfo(transfer.curl, CURLINFO_RESPONSE_CODE, &status);
    transfer.status_seen = status >= 200 && status < 300 ? 1 : 0;
  }
  return transfer.status_seen == 1;
}

// Callbacks run inside curl's C frames: nothing may throw out of them, so the
// allocations are guarded and a failure aborts the transfer instead.
size_t OnBody(char* data, size_t size, size_t count, void* user) noexcept {
  auto* transfer = static_cast<Transfer*>(user);
  const size_t n = size * count;
  if (BodyGoesToSink(*transfer)) {
    transfer->last_data = SteadyClock::now();
    if (!transfer->sink->OnData(std::string_view(data, n))) {
      transfer->stopped_by_sink = true;
      return 0;  // curl aborts with CURLE_WRITE_ERROR
    }
    return n;
  }
  std::string& body = transfer->response->body;
  if (n > transfer->max_body - body.size()) {
    transfer->too_large = true;
    return 0;  // curl aborts with CURLE_WRITE_ERROR
  }
  try {
    body.append(data, n);
  } catch (...) {
    transfer->out_of_memory = true;
    return 0;
  }
  return n;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

bool HeaderNameIs(std::string_view name, const char* wanted) {
  return name.size() == std::strlen(wanted) && strncasecmp(name.data(), wanted, name.size()) == 0;
}

size_t OnHeader(char* data, size_t size, size_t count, void* user) noexcept {
  auto* transfer = static_cast<Transfer*>(user);
  const size_t n = size * count;
  std::string_view line(data, n);
  // A new status line starts a new header block (after a 100 Continue, for
  // one): only the final response's headers count.
  if (line.size() >= 5 && line.substr(0, 5) == "HTTP/") {
    transfer->response->retry_after.clear();
    transfer->response->retry_after_ms.clear();
    return n;
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos) return n;
  const std::string_view name = Trim(line.substr(0, colon));
  const std::string_view value = Trim(line.substr(colon + 1));
  try {
    if (HeaderNameIs(name, "retry-after")) {
      transfer->response->retry_after.assign(value);
    } else if (HeaderNameIs(name, "retry-after-ms")) {
      transfer->response->retry_after_ms.assign(value);
    }
  } catch (...) {
    transfer->out_of_memory = true;
    return 0;
  }
  return n;
}

// Streaming only: the inter-chunk deadline and the sink's "stop" (a client
// that went away) while no data arrives. Non-zero aborts the transfer.
int OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) noexcept {
  auto* transfer = static_cast<Transfer*>(user);
  if (!transfer->sink->KeepGoing()) {
    transfer->stopped_by_sink = true;
    return 1;
  }
  if (transfer->idle_timeout_ms > 0 &&
      SteadyClock::now() - transfer->last_data > std::chrono::milliseconds(transfer->idle_timeout_ms)) {
    transfer->idle_timed_out = true;
    return 1;
  }
  return 0;
}

int64_t MsSince(SteadyClock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - start).count();
}

}  // namespace

void InitHttpGlobal() {
  // A function-local static runs curl_global_init exactly once, thread-safely.
  static const CURLcode kInitResult = curl_global_init(CURL_GLOBAL_DEFAULT);
  (void)kInitResult;
}

struct HttpClient::Impl {
  CurlEasyPtr handle;
  char error_buffer[CURL_ERROR_SIZE] = {};
};

HttpClient::HttpClient() : impl_(std::make_unique<Impl>()) {
  InitHttpGlobal();
  impl_->handle.reset(curl_easy_init());
}

HttpClient::~HttpClient() = default;

Result<HttpResponse> HttpClient::Send(const HttpCall& call) { return Perform(call, nullptr); }

Result<HttpResponse> HttpClient::SendStreaming(const HttpCall& call, HttpStreamSink& sink) {
  return Perform(call, &sink);
}

Result<HttpResponse> HttpClient::Perform(const HttpCall& call, HttpStreamSink* sink) {
  CURL* curl = impl_->handle.get();
  if (curl == nullptr) return Internal("curl_init", "could not create a libcurl handle");
  if (call.method != "GET" && call.method != "POST" && call.method != "DELETE") {
    return Internal("bad_method", "unsupported HTTP method " + call.method);
  }
  if (call.timeout_ms <= 0) {
    return Status(Code::kDeadlineExceeded, "timeout", "no time left for the HTTP call");
  }

  // curl_easy_reset forgets every option of the previous call but keeps the
  // connection cache, DNS cache and TLS sessions, which is the reuse we want.
  curl_easy_reset(curl);
  impl_->error_buffer[0] = '\0';

  CurlSlistPtr headers;
  {
    curl_slist* list = nullptr;
    for (const std::string& header : call.headers) {
      curl_slist* grown = curl_slist_append(list, header.c_str());
      if (grown == nullptr) {
        curl_slist_free_all(list);
        return Internal("out_of_memory", "could not build HTTP headers");
      }
      list = grown;
    }
    // Without this, curl sends "Expect: 100-continue" for bodies over 1 KiB and
    // waits up to a second for a server that never answers it.
    curl_slist* grown = curl_slist_append(list, "Expect:");
    if (grown == nullptr) {
      curl_slist_free_all(list);
      return Internal("out_of_memory", "could not build HTTP headers");
    }
    headers.reset(grown);
  }

  HttpResponse response;
  Transfer transfer;
  transfer.response = &response;
  transfer.max_body = call.max_response_bytes;
  transfer.sink = sink;
  transfer.curl = curl;
  transfer.idle_timeout_ms = call.idle_timeout_ms;

  curl_easy_setopt(curl, CURLOPT_URL, call.url.c_str());
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  // Signals would interrupt other threads' syscalls; it also disables the
  // alarm()-based DNS timeout, which is not thread-safe.
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(call.connect_timeout_ms));
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(call.timeout_ms));
  curl_easy_setopt(curl, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
  // No compression: bodies are small, and decoding would undo the size cap.
  curl_easy_setopt(curl, CURLOPT_ACCEPT_ENCODING, nullptr);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, impl_->error_buffer);
  curl_easy_setopt(curl, CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(call.max_response_bytes));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &OnBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &transfer);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &OnHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &transfer);
  if (sink != nullptr) {
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, &OnProgress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &transfer);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
  }

  if (call.method == "GET") {
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
  } else {
    if (call.method == "DELETE") curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "DELETE");
    if (call.method == "POST" || !call.body.empty()) {
      curl_easy_setopt(curl, CURLOPT_POST, 1L);
      // Explicit size: the body may hold NUL bytes, and strlen would be wrong.
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(call.body.size()));
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, call.body.data());
    }
  }

  const auto start = SteadyClock::now();
  transfer.last_data = start;
  const CURLcode rc = curl_easy_perform(curl);
  response.elapsed_ms = MsSince(start);
  // The handle outlives this frame: keep it from pointing at our header list
  // and body (the next Send resets everything anyway).
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, nullptr);

  if (transfer.too_large || rc == CURLE_FILESIZE_EXCEEDED) {
    return Status(Code::kUpstream, "response_too_large",
                  "HTTP response body exceeds " + std::to_string(call.max_response_bytes) + " bytes");
  }
  if (transfer.out_of_memory) return Internal("out_of_memory", "out of memory reading an HTTP response");
  if (transfer.stopped_by_sink) return Unavailable("aborted", "HTTP call stopped by its reader");
  if (transfer.idle_timed_out) {
    return Status(Code::kDeadlineExceeded, "idle_timeout",
                  "no data for " + std::to_string(call.idle_timeout_ms) + " ms");
  }
  if (rc != CURLE_OK) {
    std::string detail = impl_->error_buffer[0] != '\0' ? impl_->error_buffer : curl_easy_strerror(rc);
    if (rc == CURLE_OPERATION_TIMEDOUT) {
      return Status(Code::kDeadlineExceeded, "timeout", "HTTP call timed out: " + detail);
    }
    return Unavailable("connect", "HTTP call failed: " + detail);
  }
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  return response;
}

HttpClient& ThreadHttpClient() {
  thread_local HttpClient client;
  return client;
}

}  // namespace chatd
