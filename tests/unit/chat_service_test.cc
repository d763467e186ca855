#include <boost/test/unit_test.hpp>

#include <algorithm>

#include "chatd/chat_service.h"
#include "chatd/redis.h"
#include "chatd/user_data.h"
#include "fakes.h"

using namespace chatd;
using namespace chatd::testing;

namespace {
struct ServiceFixture {
  FakeLimiter limiter;
  FakeShortTerm recent;
  FakeLongTerm long_term;
  FakeEmbedder embedder;
  FakeLlm llm;
  ChatServiceOptions options{FailureMode::kClosed, 5, "SYS", 24 * 1024};
  ChatTrace trace;

  Result<ChatReply> Chat(const std::string& user, const std::string& text) {
    ChatService service(limiter, recent, long_term, embedder, llm, options);
    return service.Chat(Uid(user), text, Deadline::In(std::chrono::seconds(5)), trace);
  }
};
}  // namespace

BOOST_AUTO_TEST_SUITE(chat_service)

BOOST_FIXTURE_TEST_CASE(a_turn_is_answered_and_recorded_whole, ServiceFixture) {
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->response == "reply to Hi");
  BOOST_REQUIRE_EQUAL(recent.turns.size(), 1u);
  BOOST_TEST(recent.turns[0].user_message == "Hi");
  BOOST_TEST(recent.turns[0].assistant_message == "reply to Hi");
  BOOST_TEST(recent.turns[0].turn_id == r->turn_id);
  BOOST_TEST(recent.turns[0].user_embedding.size() == 4u);  // computed once, passed on for indexing
  BOOST_TEST(embedder.calls == 1);
}

BOOST_FIXTURE_TEST_CASE(a_rejected_request_costs_one_limiter_call_and_nothing_else, ServiceFixture) {
  limiter.allowed = false;
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kRateLimited));
  BOOST_TEST(limiter.calls == 1);
  BOOST_TEST(recent.recent_calls == 0);
  BOOST_TEST(embedder.calls == 0);
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_TEST(llm.calls == 0);
  BOOST_REQUIRE(trace.rate.has_value());
}

BOOST_FIXTURE_TEST_CASE(limiter_down_fails_closed_by_default, ServiceFixture) {
  limiter.status = Unavailable("redis_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "rate_limiter_unavailable");
  BOOST_TEST(llm.calls == 0);
}

BOOST_FIXTURE_TEST_CASE(limiter_down_fails_open_when_configured, ServiceFixture) {
  options.rate_failure_mode = FailureMode::kOpen;
  limiter.status = Unavailable("redis_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(trace.rate_limiter_failed_open);
}

BOOST_FIXTURE_TEST_CASE(redis_loading_or_busy_is_said_so_with_a_retry_delay, ServiceFixture) {
  limiter.status = RedisReplyError("LOADING Redis is loading the dataset in memory", "the rate-limit script");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "redis_loading");
  BOOST_TEST(RetryAfterSeconds(r.status()) > 0);

  // Failing open, the memory read meets the same Redis: same kind of answer.
  options.rate_failure_mode = FailureMode::kOpen;
  limiter.status = Unavailable("redis_unavailable", "down");
  recent.recent_status = RedisReplyError("BUSY Redis is busy running a script", "LRANGE");
  r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "redis_busy");
  BOOST_TEST(RetryAfterSeconds(r.status()) > 0);
  BOOST_TEST(llm.calls == 0);

  // A plain outage is no promise of a quick return.
  recent.recent_status = Unavailable("redis_unavailable", "down");
  r = Chat("alice", "Hi");
  BOOST_TEST(r.status().reason() == "memory_unavailable");
  BOOST_TEST(RetryAfterSeconds(r.status()) == 0);
}

BOOST_FIXTURE_TEST_CASE(recent_messages_reach_the_model_with_their_roles, ServiceFixture) {
  BOOST_REQUIRE(Chat("alice", "first").ok());
  BOOST_REQUIRE(Chat("alice", "second").ok());
  const auto& p = llm.last_prompt;
  BOOST_REQUIRE_EQUAL(p.size(), 4u);
  BOOST_TEST(p[1].role == "user");
  BOOST_TEST(p[1].content == "first");
  BOOST_TEST(p[2].role == "assistant");
  BOOST_TEST(p[2].content == "reply to first");
  BOOST_TEST(p[3].content == "second");
}

BOOST_FIXTURE_TEST_CASE(recall_excludes_the_recent_messages, ServiceFixture) {
  recent.messages["alice"] = {{Role::kUser, "x", 1, "t9:u"}, {Role::kAssistant, "y", 1, "t9:a"}};
  recent.older["alice"] = true;
  recent.hot["alice"] = {{"t9:u", "alice", "t9", Role::kUser, "x", 1, {1, 0, 0, 0}}};
  BOOST_REQUIRE(Chat("alice", "q").ok());
  std::vector<std::string> excluded = long_term.last_exclude;
  std::sort(excluded.begin(), excluded.end());
  BOOST_TEST(excluded == (std::vector<std::string>{"t9:a", "t9:u"}));
  BOOST_TEST(trace.memories_recalled == 0u);  // the hot copy of a recent message is not recalled either
}

BOOST_FIXTURE_TEST_CASE(recalled_memories_are_used_in_the_prompt, ServiceFixture) {
  RecalledMessage m;
  m.message = {"t1:u", "alice", "t1", Role::kUser, "my dog is Rex", 1000, {}};
  long_term.memories.push_back(m);
  recent.older["alice"] = true;
  BOOST_REQUIRE(Chat("alice", "what is my dog called?").ok());
  BOOST_TEST(llm.last_prompt[1].content.find("my dog is Rex") != std::string::npos);
  BOOST_TEST(trace.memories_recalled == 1u);
  BOOST_TEST(trace.long_term_queried);
}

BOOST_FIXTURE_TEST_CASE(a_user_without_older_memory_costs_no_long_term_call, ServiceFixture) {
  recent.hot["alice"] = {{"t1:u", "alice", "t1", Role::kUser, "my dog is Rex", 1000, {1, 0, 0, 0}}};
  BOOST_REQUIRE(Chat("alice", "what is my dog called?").ok());
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_TEST(!trace.long_term_queried);
  BOOST_TEST(trace.memories_recalled == 1u);  // ranked in process from the hot set
  BOOST_TEST(llm.last_prompt[1].content.find("my dog is Rex") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(a_brand_new_user_costs_no_long_term_call, ServiceFixture) {
  BOOST_REQUIRE(Chat("newcomer", "Hi").ok());
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_TEST(trace.memories_recalled == 0u);
}

BOOST_FIXTURE_TEST_CASE(older_memories_are_merged_with_the_hot_ones_each_id_once, ServiceFixture) {
  recent.older["alice"] = true;
  recent.messages["alice"] = {{Role::kUser, "recent", 7000, "t7:u"}};
  // The hot message is far from the query; the older one is exactly on it.
  recent.hot["alice"] = {{"t5:u", "alice", "t5", Role::kUser, "hot and far", 5000, {0, 1, 0, 0}},
                         {"t6:u", "alice", "t6", Role::kUser, "hot and newer", 6000, {0, 0, 1, 0}}};
  RecalledMessage near;
  near.message = {"t1:u", "alice", "t1", Role::kUser, "old and near", 1000, {}};
  near.distance = 0;
  // Chroma holds the hot messages too and may return one of them.
  RecalledMessage hot_again;
  hot_again.message = {"t6:u", "alice", "t6", Role::kUser, "hot and newer", 6000, {}};
  hot_again.distance = 0.5;
  long_term.memories = {near, hot_again};
  options.recall_k = 3;
  BOOST_REQUIRE(Chat("alice", "q").ok());
  // Only the recent messages are excluded: Chroma's nearest are merged.
  BOOST_TEST(long_term.last_exclude == (std::vector<std::string>{"t7:u"}));
  BOOST_TEST(trace.memories_recalled == 3u);  // old, and both hot ones, t6 once
  const std::string& quoted = llm.last_prompt[1].content;
  BOOST_TEST(quoted.find("old and near") != std::string::npos);
  BOOST_TEST(quoted.find("hot and newer") == quoted.rfind("hot and newer"));
}

BOOST_FIXTURE_TEST_CASE(listed_older_messages_are_read_by_id_not_searched, ServiceFixture) {
  recent.older["alice"] = true;
  recent.messages["alice"] = {{Role::kUser, "recent", 7000, "t7:u"}};
  // The store listed the older messages; one of them is also a recent one.
  recent.older_ids["alice"] = {"t7:u", "t2:a", "t2:u", "t1:a", "t1:u"};
  RecalledMessage near;
  near.message = {"t1:u", "alice", "t1", Role::kUser, "old and near", 1000, {}};
  long_term.memories = {near};
  BOOST_REQUIRE(Chat("alice", "q").ok());
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_TEST(long_term.recall_among_calls == 1);
  // The recent message is in the prompt already: not asked for again.
  BOOST_TEST(long_term.last_among == (std::vector<std::string>{"t2:a", "t2:u", "t1:a", "t1:u"}));
  BOOST_TEST(trace.long_term_queried);
  BOOST_TEST(llm.last_prompt[1].content.find("old and near") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(listed_older_messages_that_are_all_recent_cost_no_call, ServiceFixture) {
  recent.older["alice"] = true;
  recent.messages["alice"] = {{Role::kUser, "recent", 7000, "t7:u"}};
  recent.older_ids["alice"] = {"t7:u"};
  BOOST_REQUIRE(Chat("alice", "q").ok());
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_TEST(long_term.recall_among_calls == 0);
  BOOST_TEST(!trace.long_term_queried);
}

BOOST_FIXTURE_TEST_CASE(a_failed_read_by_id_degrades_but_answers, ServiceFixture) {
  recent.older["alice"] = true;
  recent.older_ids["alice"] = {"t1:u"};
  long_term.status = Unavailable("chroma_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(long_term.recall_among_calls == 1);
  BOOST_TEST(trace.recall_degraded);
  BOOST_TEST(recent.turns.size() == 1u);
}

BOOST_FIXTURE_TEST_CASE(foreign_records_dropped_by_the_store_reach_the_trace, ServiceFixture) {
  recent.older["alice"] = true;
  long_term.foreign_dropped = 3;
  BOOST_REQUIRE(Chat("alice", "Hi").ok());
  BOOST_TEST(trace.foreign_records_dropped == 3u);
}

BOOST_FIXTURE_TEST_CASE(long_term_failure_degrades_but_answers, ServiceFixture) {
  recent.older["alice"] = true;
  long_term.status = Unavailable("chroma_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(trace.recall_degraded);
  BOOST_TEST(recent.turns.size() == 1u);  // still recorded, indexed later
}

BOOST_FIXTURE_TEST_CASE(embedder_failure_degrades_and_leaves_embedding_to_the_indexer, ServiceFixture) {
  embedder.status = Unavailable("embedder_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(trace.recall_degraded);
  BOOST_TEST(long_term.recall_calls == 0);
  BOOST_REQUIRE_EQUAL(recent.turns.size(), 1u);
  BOOST_TEST(recent.turns[0].user_embedding.empty());
}

BOOST_FIXTURE_TEST_CASE(model_failure_stores_nothing, ServiceFixture) {
  llm.status = Status(Code::kUpstream, "model_error", "boom");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "model_error");
  BOOST_TEST(recent.turns.empty());
}

BOOST_FIXTURE_TEST_CASE(short_term_down_is_503_and_the_model_is_not_called, ServiceFixture) {
  recent.recent_status = Unavailable("redis_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "memory_unavailable");
  BOOST_TEST(llm.calls == 0);
}

BOOST_FIXTURE_TEST_CASE(recording_failure_is_reported_not_hidden, ServiceFixture) {
  recent.record_status = Unavailable("redis_unavailable", "down");
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kUnavailable));
}

BOOST_AUTO_TEST_CASE(turn_ids_are_unique_hex) {
  std::string a = NewTurnId(), b = NewTurnId();
  BOOST_TEST(a.size() == 32u);
  BOOST_TEST(a != b);
  BOOST_TEST(a.find_first_not_of("0123456789abcdef") == std::string::npos);
}

// Issue 12 A: one user must not occupy the whole pool.

BOOST_FIXTURE_TEST_CASE(one_user_over_the_concurrency_cap_gets_429_too_many_concurrent_and_costs_nothing_else,
                        ServiceFixture) {
  limiter.too_many_concurrent = true;
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kRateLimited));
  BOOST_TEST(r.status().reason() == "too_many_concurrent");
  BOOST_REQUIRE(trace.rate.has_value());
  BOOST_TEST(RetryAfterSeconds(*trace.rate) == 1);
  BOOST_TEST(recent.recent_calls == 0);
  BOOST_TEST(llm.calls == 0);
  BOOST_TEST(limiter.released.empty());  // nothing was taken
}

BOOST_FIXTURE_TEST_CASE(concurrency_lease_is_released_when_the_model_fails, ServiceFixture) {
  limiter.lease_id = "L1";
  llm.status = Status(Code::kUpstream, "model_error", "boom");
  BOOST_REQUIRE(!Chat("alice", "Hi").ok());
  BOOST_TEST(limiter.released == std::vector<std::string>{"L1"});
}

BOOST_FIXTURE_TEST_CASE(concurrency_lease_is_released_when_memory_is_down, ServiceFixture) {
  limiter.lease_id = "L1";
  recent.recent_status = Unavailable("redis_unavailable", "down");
  BOOST_REQUIRE(!Chat("alice", "Hi").ok());
  BOOST_TEST(limiter.released == std::vector<std::string>{"L1"});
}

BOOST_FIXTURE_TEST_CASE(concurrency_lease_is_released_when_recording_fails_even_if_folded, ServiceFixture) {
  limiter.lease_id = "L1";
  options.record_turn_releases_lease = true;
  recent.record_status = Unavailable("redis_unavailable", "down");
  BOOST_REQUIRE(!Chat("alice", "Hi").ok());
  BOOST_TEST(limiter.released == std::vector<std::string>{"L1"});
}

BOOST_FIXTURE_TEST_CASE(concurrency_lease_is_released_with_the_recorded_turn_when_redis_is_shared, ServiceFixture) {
  limiter.lease_id = "L1";
  options.record_turn_releases_lease = true;
  BOOST_REQUIRE(Chat("alice", "Hi").ok());
  BOOST_TEST(recent.released_leases == std::vector<std::string>{"L1"});
  BOOST_TEST(limiter.released.empty());  // no second round trip
}

BOOST_FIXTURE_TEST_CASE(concurrency_lease_is_released_by_the_limiter_when_counters_live_elsewhere, ServiceFixture) {
  limiter.lease_id = "L1";
  options.record_turn_releases_lease = false;
  BOOST_REQUIRE(Chat("alice", "Hi").ok());
  BOOST_TEST(recent.released_leases.empty());
  BOOST_TEST(limiter.released == std::vector<std::string>{"L1"});
}

BOOST_FIXTURE_TEST_CASE(failed_open_admission_holds_no_lease_and_releases_nothing, ServiceFixture) {
  options.rate_failure_mode = FailureMode::kOpen;
  options.record_turn_releases_lease = true;
  limiter.status = Unavailable("redis_unavailable", "down");
  BOOST_REQUIRE(Chat("alice", "Hi").ok());
  BOOST_TEST(limiter.released.empty());
  BOOST_TEST(recent.released_leases.empty());
}

class FakeArchive : public ArchivedMemory {
 public:
  Result<int64_t> RestoreIfArchived(const UserId& user) override {
    asked.push_back(user.str());
    return status.ok() ? Result<int64_t>(restored) : Result<int64_t>(status);
  }
  std::vector<std::string> asked;
  int64_t restored = 0;
  Status status;
};

BOOST_FIXTURE_TEST_CASE(a_chat_in_flight_during_an_erase_is_refused_and_keeps_nothing, ServiceFixture) {
  BOOST_REQUIRE(Chat("alice", "before").ok());
  llm.during = [this] { recent.tombstone["alice"] = "1700000000000-0"; };  // the erase lands meanwhile
  auto r = Chat("alice", "in flight");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kConflict));
  BOOST_TEST(r.status().reason() == "memory_erased");
  BOOST_TEST(recent.turns.size() == 1u);
  // A chat that starts after the erase read the tombstone, and is recorded.
  llm.during = nullptr;
  BOOST_TEST(Chat("alice", "after").ok());
  BOOST_TEST(recent.turns.size() == 2u);
  BOOST_TEST(recent.turns.back().fence == "1700000000000-0");
}

BOOST_FIXTURE_TEST_CASE(an_archived_user_is_restored_before_memory_is_read, ServiceFixture) {
  FakeArchive archive;
  archive.restored = 7;
  options.archived = &archive;
  BOOST_REQUIRE(Chat("bob", "Hi").ok());
  BOOST_TEST(archive.asked == std::vector<std::string>{"bob"});
  BOOST_TEST(trace.restored_records == 7);
  BOOST_TEST(!trace.recall_degraded);
}

BOOST_FIXTURE_TEST_CASE(a_failed_restore_degrades_the_chat_and_loses_nothing, ServiceFixture) {
  FakeArchive archive;
  archive.status = Unavailable("chroma_unavailable", "down");
  options.archived = &archive;
  auto r = Chat("bob", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(trace.recall_degraded);
  BOOST_TEST(recent.turns.size() == 1u);
}

// A starter over the fakes: the limiter's decision and the store's read, in
// "one call", counted apart from the fakes' own calls.
struct FakeStarter : ChatStarter {
  FakeStarter(FakeLimiter& limiter, FakeShortTerm& recent) : limiter(limiter), recent(recent) {}
  ChatStart Start(const UserId& user) override {
    ++calls;
    ChatStart start;
    if (remembered) {
      start.decision = *remembered;
      return start;
    }
    start.decision = limiter.Check(user);
    start.memory = recent.Read(user);
    if (!transport.ok()) {
      start.decision = transport;
      start.memory = transport;
    }
    return start;
  }
  FakeLimiter& limiter;
  FakeShortTerm& recent;
  std::optional<RateDecision> remembered;
  Status transport;
  int calls = 0;
};

BOOST_FIXTURE_TEST_CASE(with_a_starter_the_admission_and_the_memory_come_from_one_call, ServiceFixture) {
  recent.messages["alice"] = {{Role::kUser, "earlier", 1, "t0:u"}, {Role::kAssistant, "answer", 1, "t0:a"}};
  FakeStarter starter(limiter, recent);
  options.starter = &starter;
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(starter.calls == 1);
  BOOST_TEST(limiter.calls == 1);        // inside the starter only
  BOOST_TEST(recent.recent_calls == 1);  // the read the starter made, not a second one
  BOOST_TEST(trace.recent_used == 2u);
  BOOST_REQUIRE(llm.last_prompt.size() >= 3u);
  BOOST_TEST(llm.last_prompt[1].content == "earlier");
}

BOOST_FIXTURE_TEST_CASE(with_a_starter_a_rejection_uses_nothing_it_read, ServiceFixture) {
  FakeStarter starter(limiter, recent);
  options.starter = &starter;
  limiter.allowed = false;
  auto r = Chat("alice", "Hi");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "rate_limited");
  BOOST_TEST(recent.recent_calls == 1);  // read along with the decision, then ignored
  BOOST_TEST(embedder.calls == 0);
  BOOST_TEST(llm.calls == 0);

  // A rejection the process remembers reads nothing at all.
  RateDecision known;
  known.limit = 30;
  known.retry_after_ms = 900;
  starter.remembered = known;
  auto again = Chat("alice", "Hi");
  BOOST_REQUIRE(!again.ok());
  BOOST_TEST(again.status().reason() == "rate_limited");
  BOOST_TEST(recent.recent_calls == 1);
}

BOOST_FIXTURE_TEST_CASE(with_a_starter_memory_restored_from_an_archive_is_read_again, ServiceFixture) {
  // The starter read the memory before the restore landed; what the chat
  // uses must include what came back.
  FakeStarter starter(limiter, recent);
  options.starter = &starter;
  FakeArchive archive;
  archive.restored = 2;
  options.archived = &archive;
  BOOST_REQUIRE(Chat("bob", "Hi").ok());
  BOOST_TEST(recent.recent_calls == 2);

  // Nothing restored: the starter's read stands.
  archive.restored = 0;
  BOOST_REQUIRE(Chat("bob", "Hi again").ok());
  BOOST_TEST(recent.recent_calls == 3);
}

BOOST_FIXTURE_TEST_CASE(with_a_starter_a_redis_failure_is_a_memory_failure_even_failing_open, ServiceFixture) {
  FakeStarter starter(limiter, recent);
  options.starter = &starter;
  starter.transport = Unavailable("redis_unavailable", "down");
  auto closed = Chat("alice", "Hi");
  BOOST_REQUIRE(!closed.ok());
  BOOST_TEST(closed.status().reason() == "rate_limiter_unavailable");

  options.rate_failure_mode = FailureMode::kOpen;
  auto open = Chat("alice", "Hi");
  BOOST_REQUIRE(!open.ok());
  BOOST_TEST(open.status().reason() == "memory_unavailable");
  BOOST_TEST(trace.rate_limiter_failed_open);
  BOOST_TEST(llm.calls == 0);
  BOOST_TEST(recent.turns.empty());
}

BOOST_AUTO_TEST_SUITE_END()
