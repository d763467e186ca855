#include <boost/test/unit_test.hpp>

#include "chatd/prompt.h"

using namespace chatd;

namespace {
struct Fixture {
  std::string system = "SYS";
  std::vector<RecalledMessage> memories;
  std::vector<Message> recent;
  std::string message = "new question";

  std::vector<ChatMessage> Build(size_t budget) {
    PromptInput in{&system, &memories, &recent, &message, budget};
    return BuildPrompt(in);
  }
  static RecalledMessage Memory(std::string id, Role role, std::string text, int64_t ts, double distance) {
    RecalledMessage r;
    r.message.id = std::move(id);
    r.message.role = role;
    r.message.content = std::move(text);
    r.message.ts_ms = ts;
    r.distance = distance;
    return r;
  }
};
}  // namespace

BOOST_AUTO_TEST_SUITE(prompt)

BOOST_FIXTURE_TEST_CASE(order_is_system_memories_recent_then_message, Fixture) {
  memories.push_back(Memory("t1:u", Role::kUser, "my cat is Tom", 1'700'000'000'000, 0.1));
  recent.push_back({Role::kUser, "hello", 2, "t2:u"});
  recent.push_back({Role::kAssistant, "hi there", 2, "t2:a"});
  auto p = Build(10000);
  BOOST_REQUIRE_EQUAL(p.size(), 5u);
  BOOST_TEST(p[0].role == "system");
  BOOST_TEST(p[0].content == "SYS");
  BOOST_TEST(p[1].role == "system");
  BOOST_TEST(p[1].content.find("[2023-11-14 22:13 UTC] user: my cat is Tom") != std::string::npos);
  BOOST_TEST(p[2].role == "user");
  BOOST_TEST(p[2].content == "hello");
  BOOST_TEST(p[3].role == "assistant");
  BOOST_TEST(p[3].content == "hi there");
  BOOST_TEST(p[4].role == "user");
  BOOST_TEST(p[4].content == "new question");
}

BOOST_FIXTURE_TEST_CASE(memories_are_shown_chronologically, Fixture) {
  memories.push_back(Memory("b", Role::kUser, "later", 2'000'000, 0.1));
  memories.push_back(Memory("a", Role::kAssistant, "earlier", 1'000'000, 0.2));
  auto p = Build(10000);
  BOOST_REQUIRE_EQUAL(p.size(), 3u);
  BOOST_TEST(p[1].content.find("earlier") < p[1].content.find("later"));
  BOOST_TEST(p[1].content.find("assistant: earlier") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(no_memories_means_no_memory_message, Fixture) {
  auto p = Build(10000);
  BOOST_REQUIRE_EQUAL(p.size(), 2u);
  BOOST_TEST(p[1].content == "new question");
}

BOOST_FIXTURE_TEST_CASE(budget_keeps_the_message_then_newest_recent_then_best_memories, Fixture) {
  recent.push_back({Role::kUser, std::string(100, 'o'), 1, "old"});
  recent.push_back({Role::kAssistant, std::string(100, 'n'), 1, "new"});
  memories.push_back(Memory("m1", Role::kUser, std::string(50, 'm'), 1, 0.1));
  // Budget: the message (12) + the newest recent (100) + a little.
  auto p = Build(message.size() + 100 + 20);
  BOOST_REQUIRE_EQUAL(p.size(), 3u);
  BOOST_TEST(p[1].content == std::string(100, 'n'));
  BOOST_TEST(p[2].content == "new question");
}

BOOST_FIXTURE_TEST_CASE(empty_system_prompt_is_left_out, Fixture) {
  system.clear();
  auto p = Build(10000);
  BOOST_REQUIRE_EQUAL(p.size(), 1u);
  BOOST_TEST(p[0].role == "user");
}

BOOST_AUTO_TEST_SUITE_END()
