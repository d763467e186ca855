#include "chatd/http.h"

#include "json.h"

namespace chatd {

bool ParseContentLength(std::string_view s, size_t& out) {
  if (s.empty() || s.size() > kMaxContentLengthDigits) return false;
  size_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<size_t>(c - '0');
  }
  out = v;
  return true;
}

int HttpStatusFor(Code code) {
  switch (code) {
    case Code::kOk: return 200;
    case Code::kInvalidArgument: return 400;
    case Code::kUnauthorized: return 401;
    case Code::kForbidden: return 403;
    case Code::kNotFound: return 404;
    case Code::kMethodNotAllowed: return 405;
    case Code::kConflict: return 409;
    case Code::kPayloadTooLarge: return 413;
    case Code::kUnsupportedMediaType: return 415;
    case Code::kUnprocessable: return 422;
    case Code::kRateLimited: return 429;
    case Code::kUnavailable: return 503;
    case Code::kDeadlineExceeded: return 504;
    case Code::kUpstream: return 502;
    case Code::kInternal: return 500;
  }
  return 500;
}

namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool PercentDecode(std::string_view in, std::string& out) {
  out.clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '+') {
      out.push_back(' ');
    } else if (in[i] == '%') {
      if (i + 2 >= in.size()) return false;
      int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0) return false;
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else {
      out.push_back(in[i]);
    }
  }
  return true;
}

}  // namespace

Result<std::optional<std::string>> QueryParam(std::string_view query, std::string_view name) {
  std::optional<std::string> found;
  std::string key, value;
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    if (!PercentDecode(pair.substr(0, eq), key)) {
      return InvalidArgument("invalid_query", "The query string is not properly percent-encoded");
    }
    if (key != name) continue;
    if (found) return InvalidArgument("invalid_query", "The query parameter \"" + key + "\" is repeated");
    if (!PercentDecode(eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1), value)) {
      return InvalidArgument("invalid_query", "The query string is not properly percent-encoded");
    }
    found = value;
  }
  return found;
}

const char* HttpReasonPhrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
  }
}

HttpReply ErrorReply(const Status& status) {
  HttpReply reply;
  reply.status = HttpStatusFor(status.code());
  reply.body = ErrorBody(status);
  return reply;
}

}  // namespace chatd
