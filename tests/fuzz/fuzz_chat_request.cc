// The /api/chat body: JSON parsing and validation of {"userId","message"}
// (ParseChatRequest), and the UTF-8 helpers it relies on.
#include "json.h"
#include "chatd/user_id.h"
#include "fuzz_input.h"

namespace {
// The default CHATD_MAX_MESSAGE_BYTES is 8 KiB; a small cap lets the fuzzer
// reach both sides of the length check with short inputs.
constexpr size_t kMaxMessageBytes = 64;
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  using fuzz::Require;
  std::string_view body = fuzz::Bytes(data, size);

  Result<ChatRequest> req = ParseChatRequest(body, kMaxMessageBytes);
  if (req.ok()) {
    Require(!req->message.empty() && req->message.size() <= kMaxMessageBytes, "accepted message within bounds");
    Require(IsValidUtf8(req->message), "accepted message is UTF-8");
    Require(!req->user_id || IsValidUserId(*req->user_id), "accepted userId is valid");
  } else {
    Require(req.status().code() == Code::kInvalidArgument, "a bad body is the client's fault (400)");
    Require(IsValidUtf8(ErrorBody(req.status())), "the error reply is UTF-8");
  }

  std::string clean = SanitizeUtf8(body);
  Require(IsValidUtf8(clean), "SanitizeUtf8 yields UTF-8");
  Require(!IsValidUtf8(body) || clean == body, "SanitizeUtf8 keeps valid UTF-8 as is");
  return 0;
}
