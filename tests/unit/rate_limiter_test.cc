// RedisRateLimiter without a server: the header format, the reading of the
// script's reply, key names, and the refusals that must not reach Redis. The
// scripts themselves run against a real Redis in
// tests/integration/test_rate_limit.py.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "redis_rate_limiter.h"
#include "rejection_cache.h"
#include "uid.h"

using chatd::testing::Uid;

namespace chatd {
namespace {

using Headers = std::vector<std::pair<std::string, std::string>>;

RateDecision Decision(bool allowed, int64_t remaining, int64_t reset_ms, int64_t retry_after_ms) {
  RateDecision d;
  d.allowed = allowed;
  d.limit = 30;
  d.remaining = remaining;
  d.reset_ms = reset_ms;
  d.retry_after_ms = retry_after_ms;
  d.window_s = 60;
  return d;
}

RedisValue Int(int64_t i) {
  RedisValue v;
  v.type = RedisValue::Type::kInteger;
  v.integer = i;
  return v;
}

RedisValue Array(std::vector<RedisValue> elements) {
  RedisValue v;
  v.type = RedisValue::Type::kArray;
  v.elements = std::move(elements);
  return v;
}

RedisValue Error(std::string text) {
  RedisValue v;
  v.type = RedisValue::Type::kError;
  v.str = std::move(text);
  return v;
}

std::string HeaderValue(const Headers& headers, const std::string& name) {
  for (const auto& [n, v] : headers) {
    if (n == name) return v;
  }
  return "<absent>";
}

// A loopback port that refuses connections for as long as the socket lives.
class RefusingPort {
 public:
  RefusingPort() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    BOOST_REQUIRE(fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    BOOST_REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    socklen_t len = sizeof(addr);
    BOOST_REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port_ = ntohs(addr.sin_port);
  }
  ~RefusingPort() { ::close(fd_); }
  RefusingPort(const RefusingPort&) = delete;
  RefusingPort& operator=(const RefusingPort&) = delete;
  int port() const { return port_; }

 private:
  int fd_;
  int port_ = 0;
};

}  // namespace

BOOST_AUTO_TEST_SUITE(rate_limiter)

BOOST_AUTO_TEST_CASE(headers_of_an_admission) {
  const Headers h = RateLimitHeaders(Decision(true, 29, 59001, 0));
  BOOST_REQUIRE_EQUAL(h.size(), 2u);
  BOOST_TEST(h[0].first == "RateLimit-Policy");
  BOOST_TEST(h[0].second == "\"default\";q=30;w=60");
  BOOST_TEST(h[1].first == "RateLimit");
  BOOST_TEST(h[1].second == "\"default\";r=29;t=60");
  BOOST_TEST(HeaderValue(h, "Retry-After") == "<absent>");
}

BOOST_AUTO_TEST_CASE(headers_of_a_rejection) {
  const Headers h = RateLimitHeaders(Decision(false, 0, 12500, 1500));
  BOOST_REQUIRE_EQUAL(h.size(), 3u);
  BOOST_TEST(HeaderValue(h, "RateLimit") == "\"default\";r=0;t=13");
  BOOST_TEST(HeaderValue(h, "Retry-After") == "2");
}

BOOST_AUTO_TEST_CASE(reset_seconds_round_up) {
  const std::vector<std::pair<int64_t, std::string>> cases = {
      {0, "0"}, {1, "1"}, {999, "1"}, {1000, "1"}, {1001, "2"}, {60000, "60"}};
  for (const auto& [ms, t] : cases) {
    BOOST_TEST_CONTEXT("reset_ms=" << ms) {
      BOOST_TEST(HeaderValue(RateLimitHeaders(Decision(true, 1, ms, 0)), "RateLimit") == "\"default\";r=1;t=" + t);
    }
  }
}

BOOST_AUTO_TEST_CASE(retry_after_is_rounded_up_and_at_least_one_second) {
  BOOST_TEST(RetryAfterSeconds(Decision(false, 0, 0, 0)) == 1);
  BOOST_TEST(RetryAfterSeconds(Decision(false, 0, 10, 1)) == 1);
  BOOST_TEST(RetryAfterSeconds(Decision(false, 0, 10, 1000)) == 1);
  BOOST_TEST(RetryAfterSeconds(Decision(false, 0, 10, 1001)) == 2);
  BOOST_TEST(RetryAfterSeconds(Decision(false, 0, 10, 59999)) == 60);
  BOOST_TEST(HeaderValue(RateLimitHeaders(Decision(false, 0, 0, 0)), "Retry-After") == "1");
}

BOOST_AUTO_TEST_CASE(reply_of_an_admission_and_of_a_rejection) {
  auto ok = RateDecisionFromReply(Array({Int(1), Int(29), Int(59001), Int(0)}), 30, 60);
  BOOST_REQUIRE(ok.ok());
  BOOST_TEST(ok->allowed);
  BOOST_TEST(ok->limit == 30);
  BOOST_TEST(ok->remaining == 29);
  BOOST_TEST(ok->reset_ms == 59001);
  BOOST_TEST(ok->retry_after_ms == 0);
  BOOST_TEST(ok->window_s == 60);

  auto no = RateDecisionFromReply(Array({Int(0), Int(0), Int(4000), Int(4000)}), 30, 60);
  BOOST_REQUIRE(no.ok());
  BOOST_TEST(!no->allowed);
  BOOST_TEST(no->remaining == 0);
  BOOST_TEST(no->retry_after_ms == 4000);
}

BOOST_AUTO_TEST_CASE(one_user_cannot_occupy_the_pool_verdict_2_is_too_many_concurrent_retry_in_1s) {
  auto over = RateDecisionFromReply(Array({Int(2), Int(12), Int(4000), Int(0)}), 30, 60);
  BOOST_REQUIRE(over.ok());
  BOOST_TEST(!over->allowed);
  BOOST_TEST(over->too_many_concurrent);
  BOOST_TEST(over->remaining == 12);  // no quota consumed: what was left is still left
  BOOST_TEST(over->retry_after_ms == kTooManyConcurrentRetryAfterMs);
  BOOST_TEST(HeaderValue(RateLimitHeaders(*over), "Retry-After") == "1");
  auto rate = RateDecisionFromReply(Array({Int(0), Int(0), Int(4000), Int(4000)}), 30, 60);
  BOOST_REQUIRE(rate.ok());
  BOOST_TEST(!rate->too_many_concurrent);
}

BOOST_AUTO_TEST_CASE(malformed_replies_are_internal_errors) {
  const std::vector<RedisValue> bad = {
      Int(1),                                          // not an array
      Array({Int(1), Int(29), Int(5)}),                // too short
      Array({Int(3), Int(29), Int(5), Int(0)}),        // verdict is not 0/1/2
      Array({Int(1), Int(-1), Int(5), Int(0)}),        // negative
      Array({Int(1), RedisValue(), Int(5), Int(0)}),   // nil element
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    BOOST_TEST_CONTEXT("case " << i) {
      auto r = RateDecisionFromReply(bad[i], 30, 60);
      BOOST_REQUIRE(!r.ok());
      BOOST_TEST((r.status().code() == Code::kInternal));
      BOOST_TEST(r.status().reason() == "rate_limiter_bad_reply");
    }
  }
}

BOOST_AUTO_TEST_CASE(redis_that_cannot_serve_is_unavailable_a_broken_script_is_internal) {
  auto loading = RateDecisionFromReply(Error("LOADING Redis is loading the dataset in memory"), 30, 60);
  BOOST_REQUIRE(!loading.ok());
  BOOST_TEST((loading.status().code() == Code::kUnavailable));
  BOOST_TEST(loading.status().message().find("LOADING") != std::string::npos);
  BOOST_TEST(loading.status().message().find("dataset") == std::string::npos);
  BOOST_TEST(loading.status().reason() == "redis_loading");  // chatd answers 503 with Retry-After

  auto oom = RateDecisionFromReply(Error("OOM command not allowed when used memory > 'maxmemory'."), 30, 60);
  BOOST_REQUIRE(!oom.ok());
  BOOST_TEST((oom.status().code() == Code::kUnavailable));

  auto wrongtype = RateDecisionFromReply(Error("WRONGTYPE Operation against a key holding the wrong kind"), 30, 60);
  BOOST_REQUIRE(!wrongtype.ok());
  BOOST_TEST((wrongtype.status().code() == Code::kInternal));
  BOOST_TEST(wrongtype.status().reason() == "rate_limiter_script_error");
}

BOOST_AUTO_TEST_CASE(keys_share_the_users_hash_tag_and_differ_per_algorithm) {
  RedisOptions options;
  RedisClient client(options);  // never dialled: KeyFor is pure
  RedisRateLimiter fixed(client, 30, 60, RateAlgorithm::kFixed);
  RedisRateLimiter sliding(client, 30, 60, RateAlgorithm::kSliding);
  BOOST_TEST(fixed.KeyFor(Uid("alice")) == "chatd:{s7}:u:alice:rl:fixed");
  BOOST_TEST(sliding.KeyFor(Uid("alice")) == "chatd:{s7}:u:alice:rl:sliding");
}

// An id is checked once, where it enters (user_id.h): the limiter takes only a
// UserId, so an unchecked string cannot reach its keys, nor cost a round trip.
BOOST_AUTO_TEST_CASE(the_limiter_takes_only_a_parsed_user_id) {
  static_assert(std::is_invocable_v<decltype(&RateLimiter::Check), RateLimiter&, const UserId&>);
  static_assert(!std::is_invocable_v<decltype(&RateLimiter::Check), RateLimiter&, std::string_view>);
  static_assert(!std::is_invocable_v<decltype(&RateLimiter::Release), RateLimiter&, std::string_view,
                                     std::string_view>);
  for (std::string_view id : {std::string_view(""), std::string_view("a}b"), std::string_view("x{y")}) {
    BOOST_TEST(!UserId::Parse(id).has_value());
  }
}

BOOST_AUTO_TEST_CASE(redis_down_is_unavailable_never_a_local_decision) {
  RefusingPort port;
  RedisOptions options;
  options.port = port.port();
  RedisClient client(options);
  for (RateAlgorithm algorithm : {RateAlgorithm::kFixed, RateAlgorithm::kSliding}) {
    RedisRateLimiter limiter(client, 30, 60, algorithm);
    auto r = limiter.Check(Uid("alice"));
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST((r.status().code() == Code::kUnavailable));
    BOOST_TEST(r.status().reason() == "redis_unavailable");
  }
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd

// ---------------------------------------------------------------------------
// RejectionCache: answers for users the shared limiter rejected, until their
// retry-after passes.

namespace {

class ScriptedLimiter : public chatd::RateLimiter {
 public:
  chatd::Result<chatd::RateDecision> Check(const chatd::UserId& user) override {
    ++calls;
    last_user = user.str();
    if (!status.ok()) return status;
    chatd::RateDecision d;
    d.allowed = allowed;
    d.limit = 30;
    d.window_s = 60;
    d.remaining = allowed ? 5 : 0;
    d.reset_ms = 9000;
    d.retry_after_ms = allowed ? 0 : 4000;
    d.too_many_concurrent = !allowed && too_many_concurrent;
    return d;
  }
  chatd::Status Release(const chatd::UserId&, std::string_view lease) override {
    released.emplace_back(lease);
    return chatd::Status::Ok();
  }
  bool allowed = true;
  bool too_many_concurrent = false;
  std::vector<std::string> released;
  chatd::Status status;
  int calls = 0;
  std::string last_user;
};

struct CacheFixture {
  ScriptedLimiter inner;
  int64_t now = 1000;
  chatd::RejectionCache cache{inner, 3, [this] { return now; }};
};

}  // namespace

BOOST_AUTO_TEST_SUITE(rejection_cache)

BOOST_FIXTURE_TEST_CASE(admitted_users_always_ask_the_shared_limiter, CacheFixture) {
  for (int i = 0; i < 3; ++i) BOOST_TEST(cache.Check(Uid("alice"))->allowed);
  BOOST_TEST(inner.calls == 3);
}

BOOST_FIXTURE_TEST_CASE(a_rejected_user_is_answered_locally_until_retry_after, CacheFixture) {
  inner.allowed = false;
  BOOST_TEST(!cache.Check(Uid("alice"))->allowed);
  BOOST_TEST(inner.calls == 1);
  now += 1500;
  auto d = cache.Check(Uid("alice"));
  BOOST_REQUIRE(d.ok());
  BOOST_TEST(!d->allowed);
  BOOST_TEST(inner.calls == 1);  // no second round trip
  BOOST_TEST(d->retry_after_ms == 2500);
  BOOST_TEST(d->reset_ms == 7500);
  BOOST_TEST(d->remaining == 0);
  now += 2500;  // retry-after reached: ask again
  inner.allowed = true;
  BOOST_TEST(cache.Check(Uid("alice"))->allowed);
  BOOST_TEST(inner.calls == 2);
}

BOOST_FIXTURE_TEST_CASE(other_users_are_not_affected, CacheFixture) {
  inner.allowed = false;
  BOOST_TEST(!cache.Check(Uid("alice"))->allowed);
  inner.allowed = true;
  BOOST_TEST(cache.Check(Uid("bob"))->allowed);
  BOOST_TEST(inner.last_user == "bob");
}

BOOST_FIXTURE_TEST_CASE(errors_pass_through_and_are_not_remembered, CacheFixture) {
  inner.status = chatd::Unavailable("redis_unavailable", "down");
  BOOST_TEST(!cache.Check(Uid("alice")).ok());
  BOOST_TEST(!cache.Check(Uid("alice")).ok());
  BOOST_TEST(inner.calls == 2);
}

BOOST_FIXTURE_TEST_CASE(memory_stays_bounded, CacheFixture) {
  inner.allowed = false;
  for (const char* u : {"a", "b", "c", "d"}) cache.Check(Uid(u));
  BOOST_TEST(inner.calls == 4);
  // The cache was full at "d" and nothing had expired, so it was emptied:
  // "a" asks the shared limiter again (and is still rejected there).
  BOOST_TEST(!cache.Check(Uid("a"))->allowed);
  BOOST_TEST(inner.calls == 5);
}

BOOST_FIXTURE_TEST_CASE(too_many_concurrent_is_not_remembered_a_slot_may_free_any_time, CacheFixture) {
  inner.allowed = false;
  inner.too_many_concurrent = true;
  BOOST_TEST(cache.Check(Uid("alice"))->too_many_concurrent);
  inner.allowed = true;
  BOOST_TEST(cache.Check(Uid("alice"))->allowed);  // asked Redis again at once
  BOOST_TEST(inner.calls == 2);
}

BOOST_FIXTURE_TEST_CASE(release_reaches_the_shared_limiter, CacheFixture) {
  BOOST_REQUIRE(cache.Release(Uid("alice"), "lease-1").ok());
  BOOST_TEST(inner.released == std::vector<std::string>{"lease-1"});
}

BOOST_AUTO_TEST_SUITE_END()
