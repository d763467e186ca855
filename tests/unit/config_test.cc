#include <boost/test/unit_test.hpp>
#include <map>

#include "chatd/config.h"

using namespace chatd;

namespace {
EnvLookup Env(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}
}  // namespace

BOOST_AUTO_TEST_SUITE(config)

BOOST_AUTO_TEST_CASE(defaults_match_the_design_card) {
  auto c = LoadConfig(Env({}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->rate_limit == 30);
  BOOST_TEST(c->rate_window_s == 60);
  BOOST_TEST(c->recent_messages == 4);
  BOOST_TEST(c->recall_k == 5);
  BOOST_TEST(c->model == "gpt-4o-mini");
  BOOST_TEST(c->openai_base_url == "https://api.openai.com/v1");
  BOOST_TEST((c->rate_algorithm == RateAlgorithm::kFixed));
  BOOST_TEST((c->rate_failure_mode == FailureMode::kClosed));
}

BOOST_AUTO_TEST_CASE(reads_values_and_strips_trailing_slash_from_urls) {
  auto c = LoadConfig(Env({{"CHATD_THREADS", "3"},
                           {"OPENAI_BASE_URL", "http://127.0.0.1:9999/v1/"},
                           {"CHATD_RATE_ALGORITHM", "sliding"},
                           {"CHATD_RATE_FAILURE_MODE", "open"}}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->threads == 3);
  BOOST_TEST(c->openai_base_url == "http://127.0.0.1:9999/v1");
  BOOST_TEST((c->rate_algorithm == RateAlgorithm::kSliding));
  BOOST_TEST((c->rate_failure_mode == FailureMode::kOpen));
}

BOOST_AUTO_TEST_CASE(bad_number_names_the_variable) {
  for (const char* bad : {"", "abc", "12x", "0", "-4", "99999999999999999999"}) {
    auto c = LoadConfig(Env({{"CHATD_THREADS", bad}}));
    BOOST_REQUIRE(!c.ok());
    BOOST_TEST(c.status().message().find("CHATD_THREADS") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(bad_enum_lists_the_choices) {
  auto c = LoadConfig(Env({{"CHATD_RATE_ALGORITHM", "leaky"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("fixed, sliding") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_url_is_refused) {
  auto c = LoadConfig(Env({{"CHATD_CHROMA_URL", "localhost:8000"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("CHATD_CHROMA_URL") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(odd_recent_size_is_refused_because_turns_come_in_pairs) {
  auto c = LoadConfig(Env({{"CHATD_RECENT_MESSAGES", "5"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("CHATD_RECENT_MESSAGES") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(message_limit_cannot_exceed_body_limit) {
  auto c = LoadConfig(Env({{"CHATD_MAX_BODY_BYTES", "1000"}, {"CHATD_MAX_MESSAGE_BYTES", "2000"}}));
  BOOST_REQUIRE(!c.ok());
}

BOOST_AUTO_TEST_SUITE_END()
