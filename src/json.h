// JSON at the request boundary: strict parsing of what clients send and
// escaping-safe writing of what we answer. RapidJSON validates UTF-8 only when
// asked, its default parser recurses (a deeply nested body crashes it), and a
// wrong type or a missing member is an assert (undefined behaviour in release
// builds): so encoding is validated, the parser is iterative, and every member
// is type-checked before access.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

struct ChatRequest {
  std::optional<UserId> user_id;  // absent only when the client left it out
  std::string message;
  // "stream" as sent: true asks for server-sent events, false for one JSON
  // reply whatever Accept says; unset leaves the choice to Accept.
  std::optional<bool> stream;
};

// Parses and validates a /api/chat body: an object with a string "message"
// (non-blank, at most max_message_bytes of UTF-8) and, if present, a string
// "userId" that satisfies IsValidUserId, and, if present, a boolean "stream".
// Unknown members are ignored; a duplicated userId, message or stream is
// refused, so no two parsers can disagree on which one counts.
Result<ChatRequest> ParseChatRequest(std::string_view body, size_t max_message_bytes);

bool IsValidUtf8(std::string_view s);

// Replaces invalid UTF-8 sequences with U+FFFD, for text from upstreams that we
// must pass on (a model reply) rather than refuse.
std::string SanitizeUtf8(std::string_view s);

// A JSON number as a float: false for non-finite values and values beyond
// float's range (those within half an ulp of FLT_MAX round to it).
bool JsonToFloat(double d, float* out);

// {"error": message, "code": reason}
std::string ErrorBody(const Status& status);

// Appends `s` to `out` as a JSON string literal (quotes included).
void AppendJsonString(std::string& out, std::string_view s);

}  // namespace chatd
