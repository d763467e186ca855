#include <boost/test/unit_test.hpp>
#include <string>

#include "chatd/user_id.h"
#include "json.h"
#include "json_writer.h"

using namespace chatd;

namespace {
constexpr size_t kMax = 100;
std::string ReasonOf(std::string_view body) {
  auto r = ParseChatRequest(body, kMax);
  return r.ok() ? "ok" : r.status().reason();
}
}  // namespace

BOOST_AUTO_TEST_SUITE(json)

BOOST_AUTO_TEST_CASE(accepts_a_valid_request) {
  auto r = ParseChatRequest(R"({"userId":"user_1-a.b@c","message":"Hi","extra":[1,2]})", kMax);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->user_id->str() == "user_1-a.b@c");
  BOOST_TEST(r->message == "Hi");
}

BOOST_AUTO_TEST_CASE(user_id_may_be_absent_at_parse_time) {
  auto r = ParseChatRequest(R"({"message":"Hi"})", kMax);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->user_id.has_value());
}

BOOST_AUTO_TEST_CASE(maps_each_bad_body_to_its_reason) {
  BOOST_TEST(ReasonOf("") == "invalid_json");
  BOOST_TEST(ReasonOf("{") == "invalid_json");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"b"} trailing)") == "invalid_json");
  BOOST_TEST(ReasonOf("[1,2]") == "not_an_object");
  BOOST_TEST(ReasonOf("\"text\"") == "not_an_object");
  BOOST_TEST(ReasonOf(R"({"userId":"a"})") == "missing_field");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":5})") == "wrong_type");
  BOOST_TEST(ReasonOf(R"({"userId":7,"message":"x"})") == "wrong_type");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":""})") == "empty_message");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":" \n\t "})") == "empty_message");
  BOOST_TEST(ReasonOf(R"({"userId":"","message":"x"})") == "invalid_user_id");
  BOOST_TEST(ReasonOf(R"({"userId":"a b","message":"x"})") == "invalid_user_id");
  BOOST_TEST(ReasonOf(R"({"userId":"a/b","message":"x"})") == "invalid_user_id");
  BOOST_TEST(ReasonOf(R"({"userId":"a{b}","message":"x"})") == "invalid_user_id");
  BOOST_TEST(ReasonOf("{\"userId\":\"\xc3\xa9\",\"message\":\"x\"}") == "invalid_user_id");
  BOOST_TEST(ReasonOf(R"({"userId":")" + std::string(65, 'a') + R"(","message":"x"})") == "invalid_user_id");
  BOOST_TEST(ReasonOf(R"({"userId":")" + std::string(64, 'a') + R"(","message":"x"})") == "ok");
}

BOOST_AUTO_TEST_CASE(message_length_is_counted_in_utf8_bytes) {
  std::string at_limit(kMax, 'x');
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":")" + at_limit + "\"}") == "ok");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":")" + at_limit + "y\"}") == "message_too_long");
  std::string multibyte;
  for (int i = 0; i < 51; ++i) multibyte += "\xc3\xa9";  // 102 bytes, 51 characters
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":")" + multibyte + "\"}") == "message_too_long");
}

BOOST_AUTO_TEST_CASE(invalid_utf8_is_refused_anywhere) {
  BOOST_TEST(ReasonOf("{\"userId\":\"a\",\"message\":\"\xff\"}") == "invalid_utf8");
  BOOST_TEST(ReasonOf("{\"userId\":\"a\",\"message\":\"\xc0\xaf\"}") == "invalid_utf8");      // overlong '/'
  BOOST_TEST(ReasonOf("{\"userId\":\"a\",\"message\":\"\xed\xa0\x80\"}") == "invalid_utf8");  // surrogate
  BOOST_TEST(ReasonOf("{\"userId\":\"a\",\"message\":\"x\"}\xfe") == "invalid_utf8");
}

// Issue 12: the body's bytes were checked, but RapidJSON decodes a lone
// surrogate escape to ED B0 80, which is not UTF-8; it was answered 200.
BOOST_AUTO_TEST_CASE(lone_surrogate_escape_is_invalid_utf8) {
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x \udc00"})") == "invalid_utf8");  // lone low half
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x \udfff y"})") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x \ud800"})") == "invalid_utf8");  // high half alone
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x \udc00\ud800"})") == "invalid_utf8");  // wrong order
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x \ud83d\ude00"})") == "ok");  // a proper pair
}

BOOST_AUTO_TEST_CASE(decoded_strings_are_checked_everywhere_keys_included) {
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x","\udc00":1})") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x","extra":{"k":["\udc00"]}})") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"(["\udc00"])") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x","extra":{"k":["\u00e9\u0000"]}})") == "ok");
}

BOOST_AUTO_TEST_CASE(strict_utf8_validator_refuses_surrogates_overlongs_and_beyond_10ffff) {
  BOOST_TEST(!IsValidUtf8("\xed\xb0\x80"));      // U+DC00
  BOOST_TEST(!IsValidUtf8("\xed\xa0\x80"));      // U+D800
  BOOST_TEST(IsValidUtf8("\xed\x9f\xbf"));       // U+D7FF, just below
  BOOST_TEST(IsValidUtf8("\xee\x80\x80"));       // U+E000, just above
  BOOST_TEST(!IsValidUtf8("\xe0\x80\xaf"));      // overlong '/'
  BOOST_TEST(!IsValidUtf8("\xf0\x80\x80\xaf"));  // overlong '/'
  BOOST_TEST(IsValidUtf8("\xf4\x8f\xbf\xbf"));  // U+10FFFF
  BOOST_TEST(!IsValidUtf8("\xf4\x90\x80\x80"));  // U+110000
  BOOST_TEST(!IsValidUtf8("\xf5\x80\x80\x80"));
}

BOOST_AUTO_TEST_CASE(duplicate_fields_are_refused) {
  BOOST_TEST(ReasonOf(R"({"userId":"a","userId":"b","message":"x"})") == "invalid_json");
  BOOST_TEST(ReasonOf(R"({"userId":"a","message":"x","message":"y"})") == "invalid_json");
}

BOOST_AUTO_TEST_CASE(deep_nesting_does_not_crash) {
  std::string deep(60000, '[');
  BOOST_TEST(ReasonOf(deep) == "invalid_json");
  std::string nested = R"({"userId":"a","message":"x","n":)" + std::string(20000, '[') + std::string(20000, ']') + "}";
  BOOST_TEST(ReasonOf(nested) == "ok");
}

BOOST_AUTO_TEST_CASE(utf8_validation_and_sanitising) {
  BOOST_TEST(IsValidUtf8("plain"));
  BOOST_TEST(IsValidUtf8("\xe2\x82\xac \xf0\x9f\x98\x80"));
  BOOST_TEST(!IsValidUtf8("\xe2\x82"));
  BOOST_TEST(!IsValidUtf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  BOOST_TEST(SanitizeUtf8("a\xffz") == "a\xef\xbf\xbdz");
  BOOST_TEST(SanitizeUtf8("\xe2\x82\xac") == "\xe2\x82\xac");
}

BOOST_AUTO_TEST_CASE(strings_are_escaped_for_json) {
  std::string out;
  AppendJsonString(out, "q\"b\\n\n\x01");
  BOOST_TEST(out == "\"q\\\"b\\\\n\\n\\u0001\"");
}

BOOST_AUTO_TEST_CASE(error_body_has_error_and_code) {
  BOOST_TEST(ErrorBody(InvalidArgument("empty_message", "Say \"something\"")) ==
             R"({"error":"Say \"something\"","code":"empty_message"})");
}

// Found by fuzz_chat_request: RapidJSON decoded a lone low surrogate escape
// into bytes that are not UTF-8, and the message was accepted.
BOOST_AUTO_TEST_CASE(lone_surrogate_escapes_are_refused) {
  BOOST_TEST(ReasonOf(R"({"message":"a\udc00b"})") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"({"message":"\ud83d\ude08 \ude00"})") == "invalid_utf8");
  BOOST_TEST(ReasonOf(R"({"message":"a\ud800b"})") == "invalid_utf8");  // a lone high one too
  BOOST_TEST(ReasonOf(R"({"message":"\ud83d\ude00"})") == "ok");  // a proper pair
}

BOOST_AUTO_TEST_CASE(a_user_id_is_made_only_by_parsing) {
  BOOST_TEST(UserId::Parse("user_1-a.b@c").has_value());
  BOOST_TEST((UserId::Parse("Alice").value() != UserId::Parse("alice").value()));  // case matters
  BOOST_TEST(!UserId::Parse("").has_value());
  BOOST_TEST(!UserId::Parse("a{b}").has_value());  // would break the hash tag of its keys
  BOOST_TEST(!UserId::Parse(std::string(kMaxUserIdLength + 1, 'a')).has_value());
  BOOST_TEST(UserId::Parse(std::string(kMaxUserIdLength, 'a')).has_value());
  std::optional<UserId> id = UserId::Parse("bob");
  BOOST_TEST(id->str() == "bob");
  BOOST_TEST(std::string_view(*id) == "bob");
}

BOOST_AUTO_TEST_CASE(the_writer_keeps_its_place_across_pages) {
  // Export streams one document a page at a time: the caller sends and
  // clears the string, and the writer goes on where it was.
  std::string out;
  JsonWriter w(out);
  w.StartObject().Key("user").String("a\"b").Key("n").Int(-3).Key("list").StartArray();
  w.Bool(true);
  std::string sent = out;
  out.clear();
  w.Null().String("x\n").EndArray().EndObject();
  sent += out;
  BOOST_TEST(sent == R"({"user":"a\"b","n":-3,"list":[true,null,"x\n"]})");
}

BOOST_AUTO_TEST_SUITE_END()
