#include "json.h"

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>

#include <cfloat>
#include <cmath>
#include <vector>

#include "chatd/user_id.h"
#include "json_document.h"
#include "json_writer.h"

namespace chatd {

namespace {

// Iterative: a deeply nested body must not recurse the stack away. Without
// kParseStopWhenDoneFlag, bytes after the root value are an error.
constexpr unsigned kParseFlags = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag;

// Counts members named `name`; RapidJSON keeps duplicates and FindMember returns
// the first, while other parsers take the last.
int CountMembers(const rapidjson::Value& obj, std::string_view name) {
  int n = 0;
  for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
    if (std::string_view(it->name.GetString(), it->name.GetStringLength()) == name) ++n;
  }
  return n;
}

bool IsBlank(std::string_view s) {
  for (char c : s) {
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return false;
  }
  return true;
}

// Length of the UTF-8 sequence starting at s[i], or 0 when it is invalid
// (overlong forms, surrogates and code points above U+10FFFF included).
size_t Utf8SequenceLength(std::string_view s, size_t i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;  // no UTF-16 surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (size_t k = 2; k < len; ++k) {
    if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return 0;
  }
  return len;
}

// Whether every string in `root`, object keys included, is valid UTF-8 once
// decoded. The body's bytes were checked before parsing, but an escape decodes
// to bytes the body never held: RapidJSON 1.1.0 turns a lone "\udc00" into
// ED B0 80, a surrogate, which is not UTF-8 and which Redis, Chroma and the
// model would each treat differently. An explicit stack instead of recursion:
// a deeply nested body must not recurse the stack away here either.
bool AllStringsValidUtf8(const rapidjson::Value& root) {
  auto valid = [](const rapidjson::Value& v) {
    return IsValidUtf8(std::string_view(v.GetString(), v.GetStringLength()));
  };
  std::vector<const rapidjson::Value*> pending{&root};
  while (!pending.empty()) {
    const rapidjson::Value* v = pending.back();
    pending.pop_back();
    if (v->IsString()) {
      if (!valid(*v)) return false;
    } else if (v->IsArray()) {
      for (const rapidjson::Value& item : v->GetArray()) pending.push_back(&item);
    } else if (v->IsObject()) {
      for (auto it = v->MemberBegin(); it != v->MemberEnd(); ++it) {
        if (!valid(it->name)) return false;
        pending.push_back(&it->value);
      }
    }
  }
  return true;
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t n = Utf8SequenceLength(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string SanitizeUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t n = Utf8SequenceLength(s, i);
    if (n == 0) {
      out.append("\xEF\xBF\xBD");
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

Result<ChatRequest> ParseChatRequest(std::string_view body, size_t max_message_bytes) {
  // Checked up front so a bad byte outside any string is reported as what it is.
  if (!IsValidUtf8(body)) return InvalidArgument("invalid_utf8", "The request body is not valid UTF-8");

  LocalJsonDocument doc;
  doc.Parse<kParseFlags>(body.data(), body.size());
  if (doc.HasParseError()) {
    // A high surrogate escape without its low half is the same defect as a
    // lone low one (below): text that is not UTF-8.
    if (doc.GetParseError() == rapidjson::kParseErrorStringInvalidEncoding ||
        doc.GetParseError() == rapidjson::kParseErrorStringUnicodeSurrogateInvalid) {
      return InvalidArgument("invalid_utf8", "The request body is not valid UTF-8");
    }
    return InvalidArgument("invalid_json", std::string("The request body is not valid JSON: ") +
                                               rapidjson::GetParseError_En(doc.GetParseError()));
  }
  if (!AllStringsValidUtf8(doc)) {
    return InvalidArgument("invalid_utf8", "The request body has a string that is not valid UTF-8 once decoded");
  }
  if (!doc.IsObject()) return InvalidArgument("not_an_object", "The request body must be a JSON object");

  for (std::string_view field : {"userId", "message", "stream"}) {
    if (CountMembers(doc, field) > 1) {
      return InvalidArgument("invalid_json", "The field \"" + std::string(field) + "\" appears more than once");
    }
  }

  ChatRequest req;
  auto msg = doc.FindMember("message");
  if (msg == doc.MemberEnd()) return InvalidArgument("missing_field", "The field \"message\" is required");
  if (!msg->value.IsString()) return InvalidArgument("wrong_type", "The field \"message\" must be a string");
  std::string_view text(msg->value.GetString(), msg->value.GetStringLength());
  if (IsBlank(text)) return InvalidArgument("empty_message", "The field \"message\" must not be empty");
  if (text.size() > max_message_bytes) {
    return InvalidArgument("message_too_long", "The field \"message\" is longer than " +
                                                   std::to_string(max_message_bytes) + " bytes");
  }
  req.message.assign(text);

  auto user = doc.FindMember("userId");
  if (user != doc.MemberEnd()) {
    if (!user->value.IsString()) return InvalidArgument("wrong_type", "The field \"userId\" must be a string");
    req.user_id = UserId::Parse(std::string_view(user->value.GetString(), user->value.GetStringLength()));
    if (!req.user_id) {
      return InvalidArgument("invalid_user_id",
                             "The field \"userId\" must be 1 to 64 characters of letters, digits, '_', '-', "
                             "'.' or '@'");
    }
  }

  auto stream = doc.FindMember("stream");
  if (stream != doc.MemberEnd()) {
    if (!stream->value.IsBool()) return InvalidArgument("wrong_type", "The field \"stream\" must be true or false");
    req.stream = stream->value.GetBool();
  }
  return req;
}

void AppendJsonString(std::string& out, std::string_view s) {
  // A lone value is a whole document to the writer; it appends to `out`.
  JsonWriter(out).String(s);
}

bool JsonToFloat(double d, float* out) {
  // Values up to half a float ulp beyond FLT_MAX are what the shortest text of
  // FLT_MAX reads back as, so they round to it.
  constexpr double kLimit = static_cast<double>(FLT_MAX) + 0x1p103;  // FLT_MAX + half its ulp
  if (!std::isfinite(d) || std::fabs(d) >= kLimit) return false;
  if (std::fabs(d) > FLT_MAX) {
    *out = d > 0 ? FLT_MAX : -FLT_MAX;
  } else {
    *out = static_cast<float>(d);
  }
  return true;
}

std::string ErrorBody(const Status& status) {
  std::string out;
  JsonWriter(out).StartObject().Key("error").String(status.message()).Key("code").String(status.reason()).EndObject();
  return out;
}

}  // namespace chatd
