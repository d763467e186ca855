// The model's streamed reply (src/sse.cc, src/llm.cc): the event-stream parser
// and the decoder of chat.completion.chunk events that hands deltas on.
//
// Input: the first byte picks where the rest is cut in two (as two reads from
// the network); the rest is the stream's bytes.
#include <string>
#include <vector>

#include "json.h"
#include "chatd/llm.h"
#include "sse.h"
#include "fuzz_input.h"
#include "openai_chat.h"

namespace {

// Small, so that the "too large" path is reachable from short inputs.
constexpr size_t kMaxEventBytes = 256;

class CollectingSink : public chatd::StreamSink {
 public:
  chatd::SinkAction OnDelta(std::string_view text) noexcept override {
    chatd::fuzz::Require(!text.empty(), "a delta is never empty");
    chatd::fuzz::Require(chatd::IsValidUtf8(text), "a delta is UTF-8");
    joined.append(text);
    return chatd::SinkAction::kContinue;
  }
  std::string joined;
};

struct Parsed {
  chatd::Status status;
  std::vector<chatd::SseEvent> events;
};

Parsed ParseInTwo(std::string_view bytes, size_t cut) {
  chatd::SseParser parser(kMaxEventBytes);
  Parsed out;
  out.status = parser.Feed(bytes.substr(0, cut), out.events);
  if (out.status.ok()) out.status = parser.Feed(bytes.substr(cut), out.events);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  using fuzz::Require;
  if (size == 0) return 0;
  std::string_view bytes = fuzz::Bytes(data + 1, size - 1);
  const size_t cut = bytes.empty() ? 0 : data[0] % (bytes.size() + 1);

  // Where the bytes are cut must not change the events.
  Parsed whole = ParseInTwo(bytes, bytes.size());
  Parsed split = ParseInTwo(bytes, cut);
  Require(whole.status.ok() == split.status.ok(), "a split does not change success");
  if (whole.status.ok()) {
    Require(whole.events.size() == split.events.size(), "a split does not change the number of events");
    for (size_t i = 0; i < whole.events.size(); ++i) {
      Require(whole.events[i].data == split.events[i].data, "a split does not change an event's data");
      Require(whole.events[i].type == split.events[i].type, "a split does not change an event's type");
      Require(whole.events[i].data.size() <= kMaxEventBytes, "events stay within the bound");
    }
  } else {
    Require(whole.status.code() == Code::kUpstream, "an oversized event is an upstream error");
  }

  // The decoder: whatever it accepts, the deltas make up the reply.
  CollectingSink sink;
  ChatStreamDecoder decoder(sink);
  Status first = decoder.Feed(bytes.substr(0, cut));
  Status second = decoder.Feed(bytes.substr(cut));
  Require(sink.joined == decoder.reply().content, "the deltas joined are the reply");
  Require(IsValidUtf8(decoder.reply().content), "the reply is UTF-8");
  if (!first.ok() || !second.ok()) {
    Require(!decoder.status().ok() && decoder.status().code() == Code::kUpstream, "a failure is an upstream error");
  }
  return 0;
}
