#include <boost/test/unit_test.hpp>

#include "chatd/llm.h"

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

// Found by fuzz_llm: the cast of a huge hint to int64_t was undefined.
BOOST_AUTO_TEST_CASE(huge_retry_hints_are_capped_not_overflowed) {
  OpenAIChatOptions o;
  BOOST_TEST(RetryDelayMs(o, 0, "", "1e300", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e300", "", 0.0) == 60'000);
  BOOST_TEST(RetryDelayMs(o, 0, "1e308", "", 0.0) == 60'000);  // times 1000 is infinite
  BOOST_TEST(RetryDelayMs(o, 0, "", "9223372036854775808", 0.0) == 60'000);
}

BOOST_AUTO_TEST_SUITE_END()
