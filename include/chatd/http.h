// The HTTP view of a FastCGI request and of our answer, independent of libfcgi
// so the routing and the contract can be unit-tested without a server.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/status.h"

namespace chatd {

struct HttpRequest {
  std::string method;
  std::string path;  // DOCUMENT_URI: no query string
  std::string query;  // QUERY_STRING, still percent-encoded
  std::string content_type;
  std::string authorization;
  std::string request_id;  // nginx's $request_id, or one we made up
  std::string remote_addr;
  // The Idempotency-Key header as sent; nullopt when absent (an empty one is
  // present, and refused).
  std::optional<std::string> idempotency_key;
  std::string accept;  // the Accept header
  std::string body;
  bool body_too_large = false;  // CONTENT_LENGTH above the limit: body not read
  bool body_unreadable = false;  // bad CONTENT_LENGTH or a short read
};

struct HttpReply {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  std::string content_type = "application/json";
  // The answer already went out through a ResponseStream (server-sent
  // events): `status` is what was sent, and nothing more is written.
  bool streamed = false;
  // A body too large to build in memory (the export): when set, `body` is
  // ignored, the head goes out without Content-Length and this writes the
  // body piece by piece through `write`, which sends each piece on at once
  // and returns false once the client has gone.
  std::function<void(const std::function<bool(std::string_view)>& write)> stream;
};

// A response written piece by piece (server-sent events), for a handler that
// must send before it has the whole answer. The FastCGI server implements it.
class ResponseStream {
 public:
  virtual ~ResponseStream() = default;
  // Sends the status and headers of `head` (its body is ignored; there is no
  // Content-Length). false: the client is gone.
  virtual bool Start(const HttpReply& head) = 0;
  // Sends `bytes` at once (written and flushed). false: the client is gone.
  virtual bool Write(std::string_view bytes) = 0;
  // Whether the client hung up, found without writing anything. Cheap
  // enough to ask on every read from the model.
  virtual bool ClientGone() = 0;
};

// The value of `name` in a query string ("a=1&b=x%20y"), percent-decoded
// ('+' is a space). nullopt when absent; kInvalidArgument "invalid_query"
// when the parameter is repeated or its encoding is broken.
Result<std::optional<std::string>> QueryParam(std::string_view query, std::string_view name);

// Longest CONTENT_LENGTH we even try to parse: 20 digits overflow int64 anyway.
inline constexpr size_t kMaxContentLengthDigits = 18;

// CONTENT_LENGTH as libfcgi hands it over, i.e. untrusted bytes. Strict:
// digits only, no sign, no spaces, at most kMaxContentLengthDigits; `out` is
// left alone on failure. Outside the FastCGI server so it can be fuzzed.
bool ParseContentLength(std::string_view s, size_t& out);

// The one place a Status becomes an HTTP status.
int HttpStatusFor(Code code);
const char* HttpReasonPhrase(int status);

// A JSON error reply: {"error": ..., "code": ...} with the mapped status.
HttpReply ErrorReply(const Status& status);

}  // namespace chatd
