// Idempotency-Key: the header's rule, and the chat service's decisions with
// fakes (the Redis scripts are covered by tests/integration/test_idempotency.py).
#include <boost/test/unit_test.hpp>

#include "chatd/chat_service.h"
#include "chatd/idempotency.h"
#include "redis_idempotency.h"
#include "redis_memory.h"
#include "fakes.h"

using namespace chatd;
using namespace chatd::testing;

namespace {

struct IdemFixture : ServiceFakes {
  ChatServiceOptions options{FailureMode::kClosed, 5, "SYS", 24 * 1024};
  ChatTrace trace;

  Result<ChatReply> Chat(const std::string& text, std::string_view key, const std::string& user = "alice") {
    trace = ChatTrace();
    ChatService service(limiter, recent, long_term, embedder, llm, options, &keys);
    return service.Chat(Uid(user), text, Deadline::In(std::chrono::seconds(5)), trace, key);
  }
};

RedisValue Str(std::string s) { return {RedisValue::Type::kString, 0, std::move(s), {}}; }
RedisValue Array(std::vector<RedisValue> e) { return {RedisValue::Type::kArray, 0, {}, std::move(e)}; }

}  // namespace

BOOST_AUTO_TEST_SUITE(idempotency)

BOOST_AUTO_TEST_CASE(a_key_is_1_to_255_printable_ascii_bare_or_quoted) {
  BOOST_TEST(ParseIdempotencyKey("abc-123").value() == "abc-123");
  BOOST_TEST(ParseIdempotencyKey("\"8e03978e-40d5\"").value() == "8e03978e-40d5");
  BOOST_TEST(ParseIdempotencyKey(R"("a\"b\\c")").value() == R"(a"b\c)");
  BOOST_TEST(ParseIdempotencyKey("with space ~").value() == "with space ~");
  BOOST_TEST(ParseIdempotencyKey(std::string(255, 'k')).has_value());
  BOOST_TEST(!ParseIdempotencyKey(std::string(256, 'k')).has_value());
  BOOST_TEST(!ParseIdempotencyKey("").has_value());
  BOOST_TEST(!ParseIdempotencyKey("\"\"").has_value());
  BOOST_TEST(!ParseIdempotencyKey("tab\there").has_value());
  BOOST_TEST(!ParseIdempotencyKey("del\x7f").has_value());
  BOOST_TEST(!ParseIdempotencyKey("caf\xc3\xa9").has_value());
  BOOST_TEST(!ParseIdempotencyKey(R"("bad\escape")").has_value());
  BOOST_TEST(!ParseIdempotencyKey(R"("inner"quote")").has_value());
}

BOOST_AUTO_TEST_CASE(sha256_hex_is_the_standard_digest) {
  BOOST_TEST(Sha256Hex("abc").value() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

BOOST_AUTO_TEST_CASE(the_redis_key_is_in_the_users_slot_and_hides_the_key) {
  std::string name = IdempotencyRedisKey(Uid("alice"), "k1").value();
  BOOST_TEST(name.rfind("chatd:{s7}:u:alice:idem:", 0) == 0u);
  BOOST_TEST(name.find("k1") == std::string::npos);
  BOOST_TEST(name != IdempotencyRedisKey(Uid("bob"), "k1").value());
  // An id that would leave the user's hash tag cannot be made, so no key of it can be named.
  BOOST_TEST(!UserId::Parse("a}b").has_value());
}

BOOST_FIXTURE_TEST_CASE(a_repeat_replays_the_first_answer_without_model_record_or_quota, IdemFixture) {
  auto first = Chat("Hi", "k1");
  BOOST_REQUIRE(first.ok());
  BOOST_TEST(!first->replayed);
  auto again = Chat("Hi", "k1");
  BOOST_REQUIRE(again.ok());
  BOOST_TEST(again->replayed);
  BOOST_TEST(again->response == first->response);
  BOOST_TEST(again->turn_id == first->turn_id);
  BOOST_TEST(llm.calls == 1);
  BOOST_TEST(recent.turns.size() == 1u);
  BOOST_TEST(limiter.calls == 1);  // the replay never asked the limiter
  BOOST_TEST(!trace.rate.has_value());
}

BOOST_FIXTURE_TEST_CASE(a_request_without_a_key_costs_the_store_nothing, IdemFixture) {
  BOOST_REQUIRE(Chat("Hi", "").ok());
  BOOST_REQUIRE(Chat("Hi", "").ok());
  BOOST_TEST(keys.claim_calls == 0);
  BOOST_TEST(recent.turns.size() == 2u);
  BOOST_TEST(recent.turns[0].idempotency == nullptr);
}

BOOST_FIXTURE_TEST_CASE(keys_are_scoped_to_the_user, IdemFixture) {
  auto a = Chat("Hi", "k1", "alice");
  auto b = Chat("Hi", "k1", "bob");
  BOOST_REQUIRE(a.ok());
  BOOST_REQUIRE(b.ok());
  BOOST_TEST(!b->replayed);
  BOOST_TEST(a->turn_id != b->turn_id);
  BOOST_TEST(llm.calls == 2);
}

BOOST_FIXTURE_TEST_CASE(a_repeat_while_in_flight_is_409_and_costs_nothing_else, IdemFixture) {
  IdempotencyTicket other{"k1", Sha256Hex("Hi").value(), "someone-elses-token", 0};
  BOOST_REQUIRE(keys.Claim(Uid("alice"), other).ok());
  auto r = Chat("Hi", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kConflict));
  BOOST_TEST(r.status().reason() == "idempotency_in_progress");
  BOOST_TEST(limiter.calls == 0);
  BOOST_TEST(llm.calls == 0);
  BOOST_TEST(keys.release_calls == 0);  // never gives back a claim it does not hold
  BOOST_TEST(keys.keys.begin()->second.token == "someone-elses-token");
}

BOOST_FIXTURE_TEST_CASE(the_same_key_with_another_body_is_422, IdemFixture) {
  BOOST_REQUIRE(Chat("Hi", "k1").ok());
  auto r = Chat("Hello", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kUnprocessable));
  BOOST_TEST(r.status().reason() == "idempotency_key_reused");
  BOOST_TEST(llm.calls == 1);
  BOOST_TEST(limiter.calls == 1);
}

BOOST_FIXTURE_TEST_CASE(a_model_failure_is_not_remembered_so_a_retry_runs, IdemFixture) {
  llm.status = Status(Code::kUpstream, "model_error", "boom");
  BOOST_REQUIRE(!Chat("Hi", "k1").ok());
  BOOST_TEST(keys.keys.empty());
  llm.status = Status::Ok();
  auto retry = Chat("Hi", "k1");
  BOOST_REQUIRE(retry.ok());
  BOOST_TEST(!retry->replayed);
  BOOST_TEST(llm.calls == 2);
  BOOST_TEST(recent.turns.size() == 1u);
}

BOOST_FIXTURE_TEST_CASE(a_rejection_by_the_limiter_is_not_remembered, IdemFixture) {
  limiter.allowed = false;
  auto r = Chat("Hi", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kRateLimited));
  BOOST_TEST(keys.keys.empty());
  limiter.allowed = true;
  BOOST_TEST(Chat("Hi", "k1").ok());
}

BOOST_FIXTURE_TEST_CASE(a_known_failed_record_gives_the_key_back, IdemFixture) {
  recent.record_status = Unavailable("redis_error", "recording the turn failed");
  auto r = Chat("Hi", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "memory_unavailable");
  BOOST_TEST(r.status().message().find("was not recorded") != std::string::npos);
  BOOST_TEST(keys.keys.empty());
}

BOOST_FIXTURE_TEST_CASE(an_unknown_record_outcome_is_said_and_keeps_the_key, IdemFixture) {
  // The script ran but its answer was lost, twice.
  recent.record_status = Status(Code::kUnavailable, std::string(kRecordOutcomeUnknown), "lost");
  recent.record_status_after_write = true;
  auto r = Chat("Hi", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "record_outcome_unknown");
  BOOST_TEST(r.status().message().find("may or may not") != std::string::npos);
  BOOST_TEST(trace.turn_id == recent.turns.at(0).turn_id);
  BOOST_TEST(keys.release_calls == 0);
  // The retry learns what happened, without a second model call or record.
  recent.record_status = Status::Ok();
  auto retry = Chat("Hi", "k1");
  BOOST_REQUIRE(retry.ok());
  BOOST_TEST(retry->replayed);
  BOOST_TEST(retry->turn_id == recent.turns.at(0).turn_id);
  BOOST_TEST(llm.calls == 1);
  BOOST_TEST(recent.turns.size() == 1u);
}

BOOST_FIXTURE_TEST_CASE(a_key_taken_over_while_the_model_ran_answers_with_the_keys_outcome, IdemFixture) {
  // The record script found another request's answer under the key (our
  // claim had expired): that answer is the one to give.
  recent.record_status = Status(Code::kConflict, std::string(kKeyCompleted), "taken");
  recent.idempotency = nullptr;
  IdempotencyTicket other{"k1", Sha256Hex("Hi").value(), "other", 0};
  struct TakeOver : FakeLlm {
    FakeIdempotency* keys = nullptr;
    IdempotencyTicket* other = nullptr;
    Result<LlmReply> Complete(const std::vector<ChatMessage>& m, Deadline d) override {
      keys->keys.clear();
      keys->Complete(Uid("alice"), *other, "their-turn", "their answer");
      return FakeLlm::Complete(m, d);
    }
  } slow;
  slow.keys = &keys;
  slow.other = &other;
  ChatService service(limiter, recent, long_term, embedder, slow, options, &keys);
  auto r = service.Chat(Uid("alice"), "Hi", Deadline::In(std::chrono::seconds(5)), trace, "k1");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->replayed);
  BOOST_TEST(r->turn_id == "their-turn");
  BOOST_TEST(r->response == "their answer");
  BOOST_TEST(keys.keys.begin()->second.turn_id == "their-turn");  // left alone
}

BOOST_FIXTURE_TEST_CASE(the_key_store_down_is_503_before_any_quota_is_spent, IdemFixture) {
  keys.status = Unavailable("redis_unavailable", "down");
  auto r = Chat("Hi", "k1");
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "memory_unavailable");
  BOOST_TEST(limiter.calls == 0);
}

BOOST_AUTO_TEST_CASE(claim_replies_become_states) {
  BOOST_TEST((KeyClaimFromReply(Array({Str("claimed")})).value().state == KeyState::kClaimed));
  BOOST_TEST((KeyClaimFromReply(Array({Str("busy")})).value().state == KeyState::kInProgress));
  BOOST_TEST((KeyClaimFromReply(Array({Str("reused")})).value().state == KeyState::kReused));
  KeyClaim done = KeyClaimFromReply(Array({Str("done"), Str("t1"), Str("answer")})).value();
  BOOST_TEST((done.state == KeyState::kCompleted));
  BOOST_TEST(done.turn_id == "t1");
  BOOST_TEST(done.response == "answer");
  BOOST_TEST(!KeyClaimFromReply(Array({Str("done")})).ok());
  BOOST_TEST(!KeyClaimFromReply(Str("claimed")).ok());
}

BOOST_AUTO_TEST_CASE(record_replies_become_statuses) {
  BOOST_TEST(RecordReplyStatus(Array({Str("recorded"), Str("1")})).ok());
  BOOST_TEST(RecordReplyStatus(Array({Str("already")})).ok());
  BOOST_TEST(RecordReplyStatus(Array({Str("key_busy")})).reason() == "idempotency_in_progress");
  BOOST_TEST(RecordReplyStatus(Array({Str("key_done"), Str("t"), Str("r")})).reason() ==
             "idempotency_key_completed");
  BOOST_TEST((RecordReplyStatus(Str("1")).code() == Code::kInternal));
}

BOOST_AUTO_TEST_SUITE_END()
