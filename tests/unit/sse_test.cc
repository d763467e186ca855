#include <boost/test/unit_test.hpp>

#include "sse.h"

using namespace chatd;

namespace {

constexpr size_t kLimit = 1024;

std::vector<SseEvent> ParseAll(std::string_view bytes, size_t limit = kLimit) {
  SseParser parser(limit);
  std::vector<SseEvent> out;
  BOOST_REQUIRE(parser.Feed(bytes, out).ok());
  return out;
}

// Feeds `bytes` cut into pieces of `step` bytes.
std::vector<SseEvent> ParseInPieces(std::string_view bytes, size_t step) {
  SseParser parser(kLimit);
  std::vector<SseEvent> out;
  for (size_t i = 0; i < bytes.size(); i += step) BOOST_REQUIRE(parser.Feed(bytes.substr(i, step), out).ok());
  return out;
}

std::vector<std::string> Data(const std::vector<SseEvent>& events) {
  std::vector<std::string> out;
  for (const auto& e : events) out.push_back(e.data);
  return out;
}

// What an OpenAI stream looks like, with every feature of the format mixed in.
constexpr std::string_view kStream =
    "\xEF\xBB\xBF: keep-alive comment\r\n"
    "data: {\"a\":1}\r\n\r\n"
    "event: error\n"
    "data: first\n"
    "data:second\n"
    "data:  two spaces\n"
    "\n"
    "id: 7\r"
    "data: cr only\r\r"
    "data\n\n"
    "retry: 1000\nunknown: x\ndata: [DONE]\n\n";

}  // namespace

BOOST_AUTO_TEST_SUITE(sse)

BOOST_AUTO_TEST_CASE(parses_every_feature_of_the_format) {
  auto events = ParseAll(kStream);
  BOOST_REQUIRE(events.size() == 5u);
  BOOST_TEST(events[0].data == "{\"a\":1}");
  BOOST_TEST(events[0].type == "");
  BOOST_TEST(events[1].type == "error");
  BOOST_TEST(events[1].data == "first\nsecond\n two spaces");  // one leading space is removed, not two
  BOOST_TEST(events[2].data == "cr only");
  BOOST_TEST(events[2].id == "7");
  BOOST_TEST(events[3].data == "");  // "data" without a colon is an empty data line
  BOOST_TEST(events[3].id == "7");   // the last event ID sticks
  BOOST_TEST(events[4].data == "[DONE]");
  BOOST_TEST(events[4].type == "");  // the type does not outlive its event
}

BOOST_AUTO_TEST_CASE(any_split_of_the_bytes_gives_the_same_events) {
  const auto whole = Data(ParseAll(kStream));
  for (size_t step = 1; step <= kStream.size(); ++step) {
    BOOST_TEST_CONTEXT("pieces of " << step << " bytes") { BOOST_TEST(Data(ParseInPieces(kStream, step)) == whole); }
  }
  // Every cut into two pieces, in particular between a CR and its LF.
  for (size_t cut = 0; cut <= kStream.size(); ++cut) {
    SseParser parser(kLimit);
    std::vector<SseEvent> out;
    BOOST_REQUIRE(parser.Feed(kStream.substr(0, cut), out).ok());
    BOOST_REQUIRE(parser.Feed(kStream.substr(cut), out).ok());
    BOOST_TEST_CONTEXT("cut at " << cut) { BOOST_TEST(Data(out) == whole); }
  }
}

BOOST_AUTO_TEST_CASE(crlf_split_across_reads_ends_one_line_not_two) {
  SseParser parser(kLimit);
  std::vector<SseEvent> out;
  BOOST_REQUIRE(parser.Feed("data: a\r", out).ok());
  BOOST_REQUIRE(parser.Feed("\ndata: b\r", out).ok());
  BOOST_TEST(out.empty());  // "\r\n" then "data: b": still one event in progress
  BOOST_REQUIRE(parser.Feed("\n\r\n", out).ok());
  BOOST_REQUIRE(out.size() == 1u);
  BOOST_TEST(out[0].data == "a\nb");
}

BOOST_AUTO_TEST_CASE(cr_cr_lf_is_two_line_ends) {
  auto events = ParseAll("data: x\r\r\ndata: y\n\n");
  BOOST_TEST(Data(events) == (std::vector<std::string>{"x", "y"}));
}

BOOST_AUTO_TEST_CASE(events_without_data_and_comments_dispatch_nothing) {
  BOOST_TEST(ParseAll(": ping\n\n:\n\nevent: x\n\nid: 3\n\n\n\n").empty());
}

BOOST_AUTO_TEST_CASE(an_unterminated_event_is_held_back) {
  SseParser parser(kLimit);
  std::vector<SseEvent> out;
  BOOST_REQUIRE(parser.Feed("data: complete\n\ndata: partial\n", out).ok());
  BOOST_TEST(out.size() == 1u);
  BOOST_TEST(parser.HasPartialEvent());
  BOOST_REQUIRE(parser.Feed("\n", out).ok());
  BOOST_TEST(out.size() == 2u);
  BOOST_TEST(!parser.HasPartialEvent());
  BOOST_REQUIRE(parser.Feed("data: no line end", out).ok());
  BOOST_TEST(parser.HasPartialEvent());
}

BOOST_AUTO_TEST_CASE(a_bom_only_at_the_start_is_skipped) {
  auto events = ParseAll("\xEF\xBB\xBF" "data: a\n\n\xEF\xBB\xBF" "data: b\n\n");
  // The second BOM starts a field named "\xEF\xBB\xBF" "data", which is unknown.
  BOOST_TEST(Data(events) == (std::vector<std::string>{"a"}));
  // Split byte by byte, the BOM is still recognised.
  BOOST_TEST(Data(ParseInPieces("\xEF\xBB\xBF" "data: a\n\n", 1)) == (std::vector<std::string>{"a"}));
  // A stream that starts like a BOM but is not one keeps its bytes.
  BOOST_TEST(ParseInPieces("\xEF" "data: a\n\n", 1).empty());
}

BOOST_AUTO_TEST_CASE(a_line_or_event_over_the_limit_fails_and_stays_failed) {
  SseParser line_parser(16);
  std::vector<SseEvent> out;
  BOOST_REQUIRE(line_parser.Feed("data: 0123456", out).ok());
  Status s = line_parser.Feed("789abcdef", out);  // no line end in sight
  BOOST_TEST(!s.ok());
  BOOST_TEST(s.reason() == "stream_too_large");
  BOOST_TEST(!line_parser.Feed("\n\n", out).ok());
  BOOST_TEST(out.empty());

  SseParser event_parser(16);
  BOOST_REQUIRE(event_parser.Feed("data: 01234\ndata: 56789\n", out).ok());
  BOOST_TEST(!event_parser.Feed("data: abcde\n", out).ok());  // 18 bytes of data in one event
}

BOOST_AUTO_TEST_CASE(nul_bytes_and_non_ascii_pass_through_data) {
  std::string bytes("data: a\0b \xC3\xA9\n\n", 14);
  auto events = ParseAll(bytes);
  BOOST_REQUIRE(events.size() == 1u);
  BOOST_TEST(events[0].data == std::string("a\0b \xC3\xA9", 6));
}

BOOST_AUTO_TEST_SUITE_END()
