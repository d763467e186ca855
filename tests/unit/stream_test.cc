// Streamed replies: the decoder of the model's stream (llm.h), the chat
// service's streaming path and the server-sent events of the HTTP API.
#include <boost/test/unit_test.hpp>

#include <algorithm>

#include "chatd/chat_service.h"
#include "chatd/http_api.h"
#include "json.h"
#include "chatd/llm.h"
#include "fakes.h"
#include "openai_chat.h"

using namespace chatd;
using namespace chatd::testing;

namespace {

class RecordingSink : public StreamSink {
 public:
  SinkAction OnDelta(std::string_view text) noexcept override {
    deltas.emplace_back(text);
    return deltas.size() >= stop_after ? SinkAction::kStop : SinkAction::kContinue;
  }
  std::vector<std::string> deltas;
  size_t stop_after = SIZE_MAX;
};

std::string Chunk(std::string_view content) {
  return "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"" +
         std::string(content) + "\"},\"finish_reason\":null}]}\n\n";
}

// An OpenAI stream: role chunk, three pieces, finish, usage, [DONE].
const std::string kStream =
    ": keep-alive\n\n"
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n" +
    Chunk("Hel") + Chunk("lo, ") + Chunk("w\\u00f6rld") +
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}\n\n"
    "data: [DONE]\n\n";

// A model that streams its reply in fixed pieces, then fails or succeeds.
class StreamingLlm : public FakeLlm {
 public:
  Result<LlmReply> Stream(const std::vector<ChatMessage>& messages, Deadline, StreamSink& sink) override {
    ++calls;
    last_prompt = messages;
    LlmReply reply;
    for (const std::string& piece : pieces) {
      reply.content += piece;
      if (sink.OnDelta(piece) == SinkAction::kStop) {
        reply.stopped = true;
        return reply;
      }
    }
    if (!status.ok()) return status;
    reply.prompt_tokens = 7;
    reply.completion_tokens = static_cast<int64_t>(pieces.size());
    return reply;
  }
  std::vector<std::string> pieces{"one ", "two ", "three"};
};

class FakeResponseStream : public ResponseStream {
 public:
  bool Start(const HttpReply& h) override {
    ++starts;
    head = h;
    return !gone;
  }
  bool Write(std::string_view bytes) override {
    if (gone) return false;
    events.emplace_back(bytes);
    if (events.size() >= gone_after) gone = true;
    return true;
  }
  bool ClientGone() override { return gone; }
  HttpReply head;
  int starts = 0;
  std::vector<std::string> events;
  size_t gone_after = SIZE_MAX;  // the client leaves after this many events
  bool gone = false;
};

struct StreamFixture : FakeServiceDeps {
  StreamingLlm llm;
  Config config;
  ChatService service{limiter, recent, long_term, embedder, llm, ChatServiceOptions{}};
  HttpApi api{config, service, nullptr, nullptr, nullptr};
  RequestContext log;
  FakeResponseStream out;

  HttpReply Post(std::string body, std::string accept = "") {
    HttpRequest req;
    req.method = "POST";
    req.path = "/api/chat";
    req.content_type = "application/json";
    req.request_id = "rid";
    req.accept = std::move(accept);
    req.body = std::move(body);
    return api.Handle(req, log, &out);
  }
  static std::string Header(const HttpReply& r, const std::string& name) {
    auto it = std::find_if(r.headers.begin(), r.headers.end(), [&](const auto& h) { return h.first == name; });
    return it == r.headers.end() ? "<none>" : it->second;
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(stream)

BOOST_AUTO_TEST_CASE(decoder_hands_over_each_piece_and_the_whole_reply) {
  RecordingSink sink;
  ChatStreamDecoder decoder(sink);
  BOOST_REQUIRE(decoder.Feed(kStream).ok());
  BOOST_TEST(decoder.done());
  BOOST_TEST(sink.deltas == (std::vector<std::string>{"Hel", "lo, ", "w\xC3\xB6rld"}));
  BOOST_TEST(decoder.reply().content == "Hello, w\xC3\xB6rld");
  BOOST_TEST(decoder.reply().finish_reason == "stop");
  BOOST_TEST(decoder.reply().prompt_tokens == 12);
  BOOST_TEST(decoder.reply().completion_tokens == 3);
  BOOST_TEST(decoder.deltas_sent() == 3u);
}

BOOST_AUTO_TEST_CASE(decoder_gives_the_same_result_for_any_split) {
  for (size_t step = 1; step < 40; ++step) {
    RecordingSink sink;
    ChatStreamDecoder decoder(sink);
    for (size_t i = 0; i < kStream.size(); i += step) BOOST_REQUIRE(decoder.Feed(kStream.substr(i, step)).ok());
    BOOST_TEST(decoder.done());
    BOOST_TEST(decoder.reply().content == "Hello, w\xC3\xB6rld");
  }
}

BOOST_AUTO_TEST_CASE(an_error_object_inside_the_stream_is_a_failure) {
  RecordingSink sink;
  ChatStreamDecoder decoder(sink);
  Status s = decoder.Feed(Chunk("partial") + "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n" +
                          Chunk("after"));
  BOOST_TEST(!s.ok());
  BOOST_TEST((s.code() == Code::kUpstream));
  BOOST_TEST(decoder.error_event());
  BOOST_TEST(!decoder.done());
  BOOST_TEST(sink.deltas == (std::vector<std::string>{"partial"}));  // nothing after the error
  BOOST_TEST(!decoder.Feed("data: [DONE]\n\n").ok());                 // failed stays failed
}

BOOST_AUTO_TEST_CASE(malformed_chunks_are_failures_but_not_error_events) {
  for (std::string bad : {"data: {not json\n\n", "data: []\n\n", "data: {\"choices\":5}\n\n",
                          "data: {\"choices\":[7]}\n\n", "data: \"\xff\"\n\n"}) {
    RecordingSink sink;
    ChatStreamDecoder decoder(sink);
    Status s = decoder.Feed(bad);
    BOOST_TEST_CONTEXT(bad) {
      BOOST_TEST(!s.ok());
      BOOST_TEST(!decoder.error_event());
    }
  }
}

BOOST_AUTO_TEST_CASE(a_sink_that_stops_ends_the_decoding) {
  RecordingSink sink;
  sink.stop_after = 2;
  ChatStreamDecoder decoder(sink);
  BOOST_REQUIRE(decoder.Feed(kStream).ok());
  BOOST_TEST(decoder.stopped());
  BOOST_TEST(!decoder.done());
  BOOST_TEST(sink.deltas.size() == 2u);
  BOOST_TEST(decoder.reply().content == "Hello, ");
}

BOOST_AUTO_TEST_CASE(a_stream_without_done_is_not_done) {
  RecordingSink sink;
  ChatStreamDecoder decoder(sink);
  BOOST_REQUIRE(decoder.Feed(Chunk("a") + Chunk("b")).ok());
  BOOST_TEST(!decoder.done());
  BOOST_TEST(decoder.reply().content == "ab");
}

BOOST_AUTO_TEST_CASE(escaped_lone_surrogates_are_replaced_not_passed_on) {
  RecordingSink sink;
  ChatStreamDecoder decoder(sink);
  Status s = decoder.Feed(Chunk("x\\ud800y") + "data: [DONE]\n\n");
  // Either the parser refuses the escape, or the text is made valid UTF-8.
  if (s.ok()) {
    BOOST_REQUIRE(sink.deltas.size() == 1u);
    BOOST_TEST(IsValidUtf8(sink.deltas[0]));
  }
}

BOOST_AUTO_TEST_CASE(the_request_body_asks_for_a_stream_with_usage) {
  OpenAIChatOptions o;
  o.model = "m";
  std::string body = BuildChatCompletionBody(o, {{"user", "q"}}, /*stream=*/true);
  BOOST_TEST(body.find(R"("stream":true,"stream_options":{"include_usage":true}})") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(a_streamed_chat_sends_deltas_then_done_and_records_once, StreamFixture) {
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":true})");
  BOOST_TEST(r.streamed);
  BOOST_TEST(out.starts == 1);
  BOOST_TEST(out.head.status == 200);
  BOOST_TEST(out.head.content_type == "text/event-stream");
  BOOST_TEST(Header(out.head, "X-Accel-Buffering") == "no");
  BOOST_TEST(Header(out.head, "RateLimit") == "\"default\";r=29;t=2");
  BOOST_REQUIRE(out.events.size() == 4u);
  BOOST_TEST(out.events[0] == "data: {\"delta\":\"one \"}\n\n");
  BOOST_TEST(out.events[2] == "data: {\"delta\":\"three\"}\n\n");
  BOOST_REQUIRE(recent.turns.size() == 1u);
  BOOST_TEST(recent.turns[0].assistant_message == "one two three");
  BOOST_TEST(out.events[3] == "data: {\"done\":true,\"turnId\":\"" + recent.turns[0].turn_id +
                                  "\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n");
}

BOOST_FIXTURE_TEST_CASE(accept_event_stream_asks_for_a_stream_too, StreamFixture) {
  HttpReply r = Post(R"({"userId":"alice","message":"Hi"})", "application/json, Text/Event-Stream; q=0.9");
  BOOST_TEST(r.streamed);
  BOOST_TEST(out.events.size() == 4u);
  BOOST_TEST(AcceptsEventStream("text/event-stream"));
  BOOST_TEST(!AcceptsEventStream("text/event-streams, application/json"));
  BOOST_TEST(!AcceptsEventStream(""));
}

BOOST_FIXTURE_TEST_CASE(stream_false_or_no_stream_is_the_json_reply_with_usage, StreamFixture) {
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":false})");
  BOOST_TEST(!r.streamed);
  BOOST_TEST(out.starts == 0);
  BOOST_TEST(r.body.find(R"("response":"reply to Hi")") != std::string::npos);  // Complete, not Stream
  BOOST_TEST(r.body.find(R"("usage":{"prompt_tokens":0,"completion_tokens":0})") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(a_stream_field_that_is_not_a_boolean_is_refused, StreamFixture) {
  for (const char* body : {R"({"userId":"a","message":"Hi","stream":"yes"})",
                           R"({"userId":"a","message":"Hi","stream":true,"stream":false})"}) {
    HttpReply r = Post(body);
    BOOST_TEST(r.status == 400);
    BOOST_TEST(out.starts == 0);
  }
}

BOOST_FIXTURE_TEST_CASE(a_failure_before_the_first_delta_is_an_ordinary_json_error, StreamFixture) {
  llm.pieces.clear();
  llm.status = Status(Code::kUpstream, "model_error", "The model returned an error");
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":true})");
  BOOST_TEST(!r.streamed);
  BOOST_TEST(out.starts == 0);
  BOOST_TEST(r.status == 502);
  BOOST_TEST(r.body.find("\"code\":\"model_error\"") != std::string::npos);
  BOOST_TEST(recent.turns.empty());
}

BOOST_FIXTURE_TEST_CASE(a_failure_after_the_first_delta_is_an_error_event, StreamFixture) {
  llm.status = Status(Code::kDeadlineExceeded, "model_timeout", "The model did not answer in time");
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":true})");
  BOOST_TEST(r.streamed);
  BOOST_REQUIRE(out.events.size() == 4u);
  BOOST_TEST(out.events[3] ==
             "event: error\ndata: {\"error\":\"The model did not answer in time\",\"code\":\"model_timeout\"}\n\n");
  BOOST_TEST(recent.turns.empty());
  BOOST_TEST(log.error_reason == "model_timeout");
}

BOOST_FIXTURE_TEST_CASE(a_client_that_leaves_stops_the_model_and_nothing_is_kept, StreamFixture) {
  limiter.lease_id = "lease-1";
  out.gone_after = 1;
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":true})");
  BOOST_TEST(r.streamed);
  BOOST_TEST(out.events.size() == 1u);  // nothing written after the client left
  BOOST_TEST(recent.turns.empty());
  BOOST_TEST(log.error_reason == "client_gone");
  BOOST_TEST(limiter.released == (std::vector<std::string>{"lease-1"}));  // its slot is given back
}

BOOST_FIXTURE_TEST_CASE(an_empty_reply_is_still_a_stream, StreamFixture) {
  llm.pieces.clear();
  HttpReply r = Post(R"({"userId":"alice","message":"Hi","stream":true})");
  BOOST_TEST(r.streamed);
  BOOST_TEST(out.starts == 1);
  BOOST_REQUIRE(out.events.size() == 1u);
  BOOST_TEST(out.events[0].find("data: {\"done\":true") == 0u);
}

BOOST_AUTO_TEST_CASE(the_default_stream_of_a_model_is_its_whole_reply_in_one_delta) {
  FakeLlm llm;
  RecordingSink sink;
  auto r = llm.Stream({{"user", "x"}}, Deadline::In(std::chrono::seconds(1)), sink);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(sink.deltas == (std::vector<std::string>{"reply to x"}));
  BOOST_TEST(!r->stopped);
}

BOOST_AUTO_TEST_SUITE_END()
