#include <boost/test/unit_test.hpp>

#include "chatd/llm.h"
#include "openai_chat.h"

using namespace chatd;

BOOST_AUTO_TEST_SUITE(llm)

BOOST_AUTO_TEST_CASE(request_body_carries_model_roles_and_token_limit) {
  OpenAIChatOptions o;
  o.model = "m\"x";
  o.max_completion_tokens = 77;
  std::string body = BuildChatCompletionBody(o, {{"system", "S"}, {"user", "line\n\"q\""}});
  BOOST_TEST(body == R"({"model":"m\"x","messages":[{"role":"system","content":"S"},)"
                     R"({"role":"user","content":"line\n\"q\""}],"max_completion_tokens":77,"stream":false})");
  o.max_tokens_field = "max_tokens";
  BOOST_TEST(BuildChatCompletionBody(o, {}).find("\"max_tokens\":77") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(parses_a_completion) {
  auto r = ParseChatCompletion(
      R"({"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],)"
      R"("usage":{"prompt_tokens":5,"completion_tokens":1}})");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->content == "Hello");
  BOOST_TEST(r->finish_reason == "stop");
  BOOST_TEST(r->prompt_tokens == 5);
}

BOOST_AUTO_TEST_CASE(malformed_completions_are_upstream_errors) {
  for (const char* body : {"not json", "[]", R"({"choices":[]})", R"({"choices":[{"message":{}}]})",
                           R"({"choices":[{"message":{"content":5}}]})", R"({"choices":["x"]})"}) {
    auto r = ParseChatCompletion(body);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST((r.status().code() == Code::kUpstream));
  }
}

BOOST_AUTO_TEST_CASE(invalid_utf8_in_a_reply_is_replaced) {
  auto r = ParseChatCompletion("{\"choices\":[{\"message\":{\"content\":\"a\xff\"}}]}");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->content == "a\xef\xbf\xbd");
}

BOOST_AUTO_TEST_CASE(which_statuses_are_retried) {
  for (long s : {408L, 409L, 429L, 500L, 502L, 503L, 504L}) BOOST_TEST(IsRetryableStatus(s, "{}"));
  for (long s : {400L, 401L, 403L, 404L, 422L}) BOOST_TEST(!IsRetryableStatus(s, "{}"));
  BOOST_TEST(!IsRetryableStatus(429, R"({"error":{"code":"insufficient_quota"}})"));
}

BOOST_AUTO_TEST_CASE(retry_delay_prefers_server_hints_then_backs_off_with_jitter) {
  OpenAIChatOptions o;
  o.backoff_base_ms = 500;
  o.backoff_max_ms = 8000;
  BOOST_TEST(RetryDelayMs(o, 0, "", "250", 0.5) == 250);
  BOOST_TEST(RetryDelayMs(o, 0, "2", "", 0.5) == 2000);
  BOOST_TEST(RetryDelayMs(o, 0, "Wed, 21 Oct 2015 07:28:00 GMT", "", 0.0) == 500);  // date: ignored
  BOOST_TEST(RetryDelayMs(o, 0, "", "", 0.0) == 500);
  BOOST_TEST(RetryDelayMs(o, 1, "", "", 0.0) == 1000);
  BOOST_TEST(RetryDelayMs(o, 10, "", "", 0.0) == 8000);  // capped
  BOOST_TEST(RetryDelayMs(o, 1, "", "", 1.0) == 750);    // at most 25% jitter
}

// Issue 12: the hint was cast to an integer before the clamp, undefined for
// 1e20 (and on x86 it came out as INT64_MIN: no wait at all).
BOOST_AUTO_TEST_CASE(huge_retry_after_is_clamped_as_a_double_before_any_integer_cast) {
  OpenAIChatOptions o;
  o.backoff_base_ms = 500;
  o.backoff_max_ms = 8000;
  BOOST_TEST(RetryDelayMs(o, 0, "", "1e20", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e20", "", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e300", "", 0.0) == 60'000);  // * 1000 overflows to inf
  BOOST_TEST(RetryDelayMs(o, 0, "", "60001", 0.0) == 60'000);
}

BOOST_AUTO_TEST_CASE(negative_nan_and_infinite_retry_after_fall_back_to_backoff) {
  OpenAIChatOptions o;
  o.backoff_base_ms = 500;
  o.backoff_max_ms = 8000;
  for (const char* bad : {"-5", "nan", "NaN", "inf", "-inf", "infinity", ""}) {
    BOOST_TEST(RetryDelayMs(o, 0, "", bad, 0.0) == 500, bad);
    BOOST_TEST(RetryDelayMs(o, 0, bad, "", 0.0) == 500, bad);
  }
}

// Issue 12: a malformed reply was logged (512 bytes of it), and a reply is
// conversation text. The description must hold none of it.
BOOST_AUTO_TEST_CASE(malformed_reply_is_described_by_shape_never_by_content) {
  const std::string secret = "my password is hunter2";
  for (const std::string& body :
       {"<html>" + secret + "</html>", secret, "{\"choices\":[{\"message\":{\"content\":\"" + secret + "\"}}",
        "{\"choices\":[],\"note\":\"" + secret + "\"}", "\"" + secret + "\"",
        "{\"error\":{\"message\":\"" + secret + "\",\"type\":\"" + secret + "\",\"code\":null}}"}) {
    BodyShape shape = DescribeBody(body);
    for (const std::string* field : {&shape.kind, &shape.error_type, &shape.error_code}) {
      BOOST_TEST(field->find("hunter2") == std::string::npos, body);
      BOOST_TEST(field->find("password") == std::string::npos, body);
    }
  }
  BOOST_TEST(DescribeBody("<html>" + secret).kind == "not_json:markup");
  BOOST_TEST(DescribeBody(secret).kind == "not_json:text");
  BOOST_TEST(DescribeBody("{\"choices\":[{").kind == "not_json:truncated_or_bad_json");
  BOOST_TEST(DescribeBody("  ").kind == "empty");
  BOOST_TEST(DescribeBody("[1]").kind == "json:array");
  BodyShape error = DescribeBody(R"({"error":{"message":"quota","type":"insufficient_quota","code":"rate_limit"}})");
  BOOST_TEST(error.kind == "json:object");
  BOOST_TEST(error.error_type == "insufficient_quota");
  BOOST_TEST(error.error_code == "rate_limit");
}

// Found by fuzz_llm: the cast of a huge hint to int64_t was undefined.
BOOST_AUTO_TEST_CASE(huge_retry_hints_are_capped_not_overflowed) {
  OpenAIChatOptions o;
  BOOST_TEST(RetryDelayMs(o, 0, "", "1e300", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e300", "", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e308", "", 0.0) == 60'000);  // times 1000 is infinite
  BOOST_TEST(RetryDelayMs(o, 0, "", "9223372036854775808", 0.0) == 60'000);
}

BOOST_AUTO_TEST_SUITE_END()
