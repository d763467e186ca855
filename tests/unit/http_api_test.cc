#include <boost/test/unit_test.hpp>

#include "chatd/http_api.h"
#include "chatd/redis.h"
#include "fakes.h"

using namespace chatd;
using namespace chatd::testing;

namespace {
struct ApiFixture : ChatServiceFakes {
  HttpApi api{config, service, nullptr, nullptr, nullptr};
  RequestContext log;

  HttpReply Post(std::string body, std::string content_type = "application/json",
                 std::optional<std::string> idempotency_key = std::nullopt) {
    HttpRequest req;
    req.method = "POST";
    req.path = "/api/chat";
    req.content_type = std::move(content_type);
    req.body = std::move(body);
    req.request_id = "rid";
    req.idempotency_key = std::move(idempotency_key);
    return api.Handle(req, log);
  }
  HttpReply Get(const std::string& path, HttpApi& to) {
    HttpRequest req;
    req.method = "GET";
    req.path = path;
    return to.Handle(req, log);
  }
  static std::string Header(const HttpReply& r, const std::string& name) {
    for (const auto& [k, v] : r.headers) {
      if (k == name) return v;
    }
    return "<none>";
  }
};
}  // namespace

BOOST_AUTO_TEST_SUITE(http_api)

BOOST_FIXTURE_TEST_CASE(success_is_json_with_response_and_rate_headers, ApiFixture) {
  HttpReply r = Post(R"({"userId":"alice","message":"Hi"})");
  BOOST_TEST(r.status == 200);
  BOOST_TEST(r.body.find(R"("response":"reply to Hi")") != std::string::npos);
  BOOST_TEST(r.body.find(R"("requestId":"rid")") != std::string::npos);
  BOOST_TEST(Header(r, "RateLimit-Policy") == "\"default\";q=30;w=60");
  BOOST_TEST(Header(r, "RateLimit") == "\"default\";r=29;t=2");
  BOOST_TEST(log.user_id == "alice");
}

BOOST_FIXTURE_TEST_CASE(other_methods_get_405_with_allow, ApiFixture) {
  HttpRequest req;
  req.method = "GET";
  req.path = "/api/chat";
  HttpReply r = api.Handle(req, log);
  BOOST_TEST(r.status == 405);
  BOOST_TEST(Header(r, "Allow") == "POST");
  BOOST_TEST(r.body.find("\"code\":\"method_not_allowed\"") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(content_type_must_declare_json, ApiFixture) {
  BOOST_TEST(Post(R"({"userId":"a","message":"x"})", "text/plain").status == 415);
  BOOST_TEST(Post(R"({"userId":"a","message":"x"})", "").status == 415);
  BOOST_TEST(Post(R"({"userId":"a","message":"x"})", "application/jsonx").status == 415);
  BOOST_TEST(Post(R"({"userId":"a","message":"x"})", "Application/JSON; charset=utf-8").status == 200);
}

BOOST_FIXTURE_TEST_CASE(oversized_and_unreadable_bodies, ApiFixture) {
  HttpRequest req;
  req.method = "POST";
  req.path = "/api/chat";
  req.content_type = "application/json";
  req.body_too_large = true;
  BOOST_TEST(api.Handle(req, log).status == 413);
  req.body_too_large = false;
  req.body_unreadable = true;
  BOOST_TEST(api.Handle(req, log).status == 400);
  BOOST_TEST(llm.calls == 0);
}

BOOST_FIXTURE_TEST_CASE(missing_user_id_is_400, ApiFixture) {
  HttpReply r = Post(R"({"message":"x"})");
  BOOST_TEST(r.status == 400);
  BOOST_TEST(r.body.find("missing_field") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(rate_limited_is_429_with_retry_after, ApiFixture) {
  limiter.allowed = false;
  HttpReply r = Post(R"({"userId":"alice","message":"Hi"})");
  BOOST_TEST(r.status == 429);
  BOOST_TEST(r.body == R"({"error":"Too many requests","code":"rate_limited","retryAfter":2})");
  BOOST_TEST(Header(r, "Retry-After") == "2");
  BOOST_TEST(Header(r, "RateLimit") == "\"default\";r=0;t=2");
}

BOOST_FIXTURE_TEST_CASE(redis_loading_after_a_restart_is_503_with_retry_after, ApiFixture) {
  // What the rate limiter reports when Redis answers its script with LOADING.
  limiter.status = RedisReplyError("LOADING Redis is loading the dataset in memory", "the rate-limit script");
  HttpReply r = Post(R"({"userId":"alice","message":"Hi"})");
  BOOST_TEST(r.status == 503);
  BOOST_TEST(r.body.find(R"("code":"redis_loading")") != std::string::npos);
  BOOST_TEST(r.body.find(R"("retryAfter":2)") != std::string::npos);
  BOOST_TEST(Header(r, "Retry-After") == "2");
  BOOST_TEST(llm.calls == 0);
}

BOOST_FIXTURE_TEST_CASE(an_outage_that_is_not_a_restart_has_no_retry_after, ApiFixture) {
  limiter.status = Unavailable("redis_unavailable", "connection refused");
  HttpReply r = Post(R"({"userId":"alice","message":"Hi"})");
  BOOST_TEST(r.status == 503);
  BOOST_TEST(r.body.find(R"("code":"rate_limiter_unavailable")") != std::string::npos);
  BOOST_TEST(Header(r, "Retry-After") == "<none>");
}

namespace {
struct LoadingRedis : HealthProbe {
  std::vector<DependencyState> Check() override {
    return {{"redis", "loading", false}, {"chroma", "ok", true}, {"model", "configured", true}};
  }
};
}  // namespace

struct LoadingFixture : ApiFixture {
  LoadingRedis probe;
  HttpApi health_api{config, service, nullptr, nullptr, &probe};
};

BOOST_FIXTURE_TEST_CASE(health_says_redis_is_loading_with_retry_after, LoadingFixture) {
  HttpReply r = Get("/api/health", health_api);
  BOOST_TEST(r.status == 503);
  BOOST_TEST(r.body.find(R"("redis":"loading")") != std::string::npos);
  BOOST_TEST(r.body.find(R"("code":"redis_loading")") != std::string::npos);
  BOOST_TEST(Header(r, "Retry-After") == "2");
}

BOOST_FIXTURE_TEST_CASE(unknown_paths_are_json_404, ApiFixture) {
  HttpRequest req;
  req.method = "GET";
  req.path = "/nope";
  HttpReply r = api.Handle(req, log);
  BOOST_TEST(r.status == 404);
  BOOST_TEST(r.content_type == "application/json");
}

BOOST_AUTO_TEST_CASE(every_code_maps_to_one_status) {
  BOOST_TEST(HttpStatusFor(Code::kInvalidArgument) == 400);
  BOOST_TEST(HttpStatusFor(Code::kRateLimited) == 429);
  BOOST_TEST(HttpStatusFor(Code::kUpstream) == 502);
  BOOST_TEST(HttpStatusFor(Code::kUnavailable) == 503);
  BOOST_TEST(HttpStatusFor(Code::kDeadlineExceeded) == 504);
  BOOST_TEST(HttpStatusFor(Code::kInternal) == 500);
}

BOOST_AUTO_TEST_CASE(content_length_is_digits_only) {
  size_t n = 7;
  BOOST_TEST(ParseContentLength("0", n));
  BOOST_TEST(n == 0u);
  BOOST_TEST(ParseContentLength("65536", n));
  BOOST_TEST(n == 65536u);
  BOOST_TEST(ParseContentLength("999999999999999999", n));  // 18 digits: the longest accepted
  n = 7;
  for (std::string_view bad : {"", "-1", "+1", " 1", "1 ", "0x10", "1e3", "1000000000000000000"}) {
    BOOST_TEST(!ParseContentLength(bad, n), bad);
    BOOST_TEST(n == 7u);  // untouched on failure
  }
}

// Idempotency-Key: the header's validation, the replay marker, and the honest
// answer when the record's outcome is unknown.
constexpr char kHi[] = R"({"userId":"alice","message":"Hi"})";

BOOST_FIXTURE_TEST_CASE(an_invalid_idempotency_key_is_400_before_anything_runs, ApiFixture) {
  for (std::string bad : {std::string(), std::string(256, 'k'), std::string("caf\xc3\xa9")}) {
    HttpReply r = Post(kHi, "application/json", bad);
    BOOST_TEST(r.status == 400);
    BOOST_TEST(r.body.find("\"code\":\"invalid_idempotency_key\"") != std::string::npos);
  }
  BOOST_TEST(keys.claim_calls == 0);
  BOOST_TEST(llm.calls == 0);
}

BOOST_FIXTURE_TEST_CASE(a_replay_is_marked_and_carries_the_first_turn, ApiFixture) {
  HttpReply first = Post(kHi, "application/json", "k1");
  BOOST_TEST(first.status == 200);
  BOOST_TEST(Header(first, "Idempotent-Replayed") == "<none>");
  HttpReply again = Post(kHi, "application/json", "\"k1\"");  // the quoted form names the same key
  BOOST_TEST(again.status == 200);
  BOOST_TEST(Header(again, "Idempotent-Replayed") == "true");
  BOOST_TEST(again.body == first.body);  // same response, requestId (same here) and turnId
  BOOST_TEST(Header(again, "RateLimit-Policy") == "\"default\";q=30;w=60");
  BOOST_TEST(Post(R"({"userId":"alice","message":"Other"})", "application/json", "k1").status == 422);
}

BOOST_FIXTURE_TEST_CASE(an_unknown_record_outcome_is_503_with_the_turn_id, ApiFixture) {
  recent.record_status = Status(Code::kUnavailable, std::string(kRecordOutcomeUnknown), "lost");
  HttpReply r = Post(kHi);
  BOOST_TEST(r.status == 503);
  BOOST_TEST(r.body.find("\"code\":\"record_outcome_unknown\"") != std::string::npos);
  const size_t at = r.body.find("\"turnId\":\"");
  BOOST_REQUIRE(at != std::string::npos);
  const std::string turn = r.body.substr(at + 10, r.body.find('"', at + 10) - at - 10);
  BOOST_TEST(turn.size() == 32u);
  BOOST_TEST(turn.find_first_not_of("0123456789abcdef") == std::string::npos);
}

BOOST_AUTO_TEST_SUITE_END()
