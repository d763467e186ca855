// Observe (observe.h): a request's context in, its log lines and counters out.
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "chatd/metrics.h"
#include "chatd/request_context.h"
#include "observe.h"

using namespace chatd;

namespace {

uint64_t Read(const std::atomic<uint64_t>& counter) { return counter.load(); }

// Runs Observe with stderr sent to a file, and hands back the lines it wrote.
std::vector<std::string> ObserveAndCapture(const RequestContext& ctx, Metrics* metrics) {
  std::fflush(stderr);
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::tmpfile(), &std::fclose);
  BOOST_REQUIRE(file);
  const int saved = ::dup(STDERR_FILENO);
  BOOST_REQUIRE(saved >= 0);
  ::dup2(::fileno(file.get()), STDERR_FILENO);
  Observe(ctx, metrics);
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  std::rewind(file.get());
  std::vector<std::string> lines;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), file.get()) != nullptr) lines.emplace_back(buf);
  return lines;
}

bool Has(const std::string& line, const std::string& part) { return line.find(part) != std::string::npos; }

struct ObserveFixture {
  std::unique_ptr<Metrics> metrics = Metrics::Open("").value();
  SharedMetrics& m = metrics->shared();
  RequestContext ctx;

  ObserveFixture() {
    ctx.request_id = "rid-1";
    ctx.method = "POST";
    ctx.path = "/api/chat";
    ctx.remote_addr = "127.0.0.1";
    ctx.status = 200;
    ctx.latency = std::chrono::milliseconds(7);
  }
  uint64_t Requests(int status) const {
    std::string text = metrics->RenderPrometheus("");
    std::string series = "chatd_requests_total{status=\"" + std::to_string(status) + "\"} ";
    size_t at = text.find(series);
    return at == std::string::npos ? 0 : std::stoull(text.substr(at + series.size()));
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(observe)

BOOST_FIXTURE_TEST_CASE(a_chat_is_one_request_line_and_its_counters, ObserveFixture) {
  ctx.user_id = "alice";
  ctx.auth = AuthOutcome::kAccepted;
  ctx.chat_called = true;
  ctx.chat.upstream_ms = 42;
  ctx.chat.recall_degraded = true;
  ctx.chat.long_term_queried = true;
  ctx.chat.foreign_records_dropped = 2;
  ctx.chat.prompt_tokens = 11;
  ctx.chat.completion_tokens = 5;

  std::vector<std::string> lines = ObserveAndCapture(ctx, metrics.get());
  BOOST_REQUIRE(lines.size() == 1u);
  const std::string& line = lines[0];
  BOOST_TEST(Has(line, R"("event":"request")"));
  BOOST_TEST(Has(line, R"("request_id":"rid-1")"));
  BOOST_TEST(Has(line, R"("method":"POST")"));
  BOOST_TEST(Has(line, R"("path":"/api/chat")"));
  BOOST_TEST(Has(line, R"("status":200)"));
  BOOST_TEST(Has(line, R"("latency_ms":7.000)"));
  BOOST_TEST(Has(line, R"("upstream_ms":42)"));
  BOOST_TEST(Has(line, R"("user":"alice")"));
  BOOST_TEST(Has(line, R"("recall_degraded":true)"));
  BOOST_TEST(!Has(line, R"("error")"));

  BOOST_TEST(Requests(200) == 1u);
  BOOST_TEST(Read(m.request_latency.count) == 1u);
  BOOST_TEST(Read(m.request_latency.sum_us) == 7000u);
  BOOST_TEST(Read(m.model_calls) == 1u);
  BOOST_TEST(Read(m.model_errors) == 0u);
  BOOST_TEST(Read(m.model_latency.sum_us) == 42000u);
  BOOST_TEST(Read(m.recall_degraded) == 1u);
  BOOST_TEST(Read(m.recall_long_term_queries) == 1u);
  BOOST_TEST(Read(m.recall_foreign_dropped) == 2u);
  BOOST_TEST(Read(m.prompt_tokens) == 11u);
  BOOST_TEST(Read(m.completion_tokens) == 5u);
  BOOST_TEST(Read(m.auth_failures) == 0u);
  BOOST_TEST(Read(m.rate_limited) == 0u);
  BOOST_TEST(Read(m.chat_streams) == 0u);
}

BOOST_FIXTURE_TEST_CASE(a_request_without_a_chat_moves_no_chat_counter, ObserveFixture) {
  ctx.method = "GET";
  ctx.path = "/nowhere";
  ctx.status = 404;
  ctx.error_reason = "not_found";
  // A trace the chat never filled in must not leak into the line.
  ctx.chat.recall_degraded = true;
  ctx.chat.upstream_ms = 9;

  std::vector<std::string> lines = ObserveAndCapture(ctx, metrics.get());
  BOOST_REQUIRE(lines.size() == 1u);
  BOOST_TEST(Has(lines[0], R"("error":"not_found")"));
  BOOST_TEST(Has(lines[0], R"("upstream_ms":-1)"));
  BOOST_TEST(Has(lines[0], R"("user":"")"));
  BOOST_TEST(!Has(lines[0], "recall_degraded"));
  BOOST_TEST(Requests(404) == 1u);
  BOOST_TEST(Read(m.model_calls) == 0u);
  BOOST_TEST(Read(m.recall_degraded) == 0u);
}

BOOST_FIXTURE_TEST_CASE(a_refused_credential_is_counted_and_logged_with_its_reason, ObserveFixture) {
  ctx.status = 401;
  ctx.auth = AuthOutcome::kRefused;
  ctx.auth_mode = "jwt";
  ctx.error_reason = "token_expired";

  std::vector<std::string> lines = ObserveAndCapture(ctx, metrics.get());
  BOOST_REQUIRE(lines.size() == 2u);
  BOOST_TEST(Has(lines[0], R"("event":"auth_failed")"));
  BOOST_TEST(Has(lines[0], R"("mode":"jwt")"));
  BOOST_TEST(Has(lines[0], R"("reason":"token_expired")"));
  BOOST_TEST(Has(lines[0], R"("request_id":"rid-1")"));
  BOOST_TEST(Has(lines[0], R"("remote_addr":"127.0.0.1")"));
  BOOST_TEST(Has(lines[0], R"("failures":)"));
  BOOST_TEST(Has(lines[1], R"("event":"request")"));
  BOOST_TEST(Has(lines[1], R"("error":"token_expired")"));
  BOOST_TEST(Read(m.auth_failures) == 1u);
  BOOST_TEST(Requests(401) == 1u);
}

BOOST_FIXTURE_TEST_CASE(a_rate_limited_chat_and_a_failed_open_one, ObserveFixture) {
  ctx.chat_called = true;
  ctx.chat_code = Code::kRateLimited;
  ctx.status = 429;
  ctx.error_reason = "rate_limited";
  ObserveAndCapture(ctx, metrics.get());
  BOOST_TEST(Read(m.rate_limited) == 1u);
  BOOST_TEST(Read(m.model_calls) == 0u);  // upstream_ms -1: the model was not asked

  RequestContext open = ctx;
  open.chat_code = Code::kOk;
  open.status = 200;
  open.error_reason.clear();
  open.user_id = "bob";
  open.chat.rate_limiter_failed_open = true;
  std::vector<std::string> lines = ObserveAndCapture(open, metrics.get());
  BOOST_REQUIRE(lines.size() == 2u);
  BOOST_TEST(Has(lines[0], R"("event":"rate_limiter_failed_open")"));
  BOOST_TEST(Has(lines[0], R"("user":"bob")"));
  BOOST_TEST(Read(m.rate_limiter_failed_open) == 1u);
  BOOST_TEST(Read(m.rate_limited) == 1u);
}

BOOST_FIXTURE_TEST_CASE(a_failed_model_call_and_a_stream_whose_client_left, ObserveFixture) {
  ctx.chat_called = true;
  ctx.chat_code = Code::kDeadlineExceeded;
  ctx.chat.upstream_ms = 30;
  ctx.chat.model_failed = true;
  ctx.chat.model_timed_out = true;
  ctx.chat_streamed = true;
  ctx.stream_client_gone = true;
  ctx.error_reason = "client_gone";
  ctx.status = 499;
  ObserveAndCapture(ctx, metrics.get());
  BOOST_TEST(Read(m.model_calls) == 1u);
  BOOST_TEST(Read(m.model_errors) == 1u);
  BOOST_TEST(Read(m.model_timeouts) == 1u);
  BOOST_TEST(Read(m.chat_streams) == 1u);
  BOOST_TEST(Read(m.chat_streams_client_gone) == 1u);
  BOOST_TEST(Read(m.requests[kStatusSlots - 1]) == 1u);  // 499 is counted as "other"
}

BOOST_FIXTURE_TEST_CASE(without_metrics_the_line_is_still_written, ObserveFixture) {
  std::vector<std::string> lines = ObserveAndCapture(ctx, nullptr);
  BOOST_REQUIRE(lines.size() == 1u);
  BOOST_TEST(Has(lines[0], R"("event":"request")"));
}

BOOST_AUTO_TEST_SUITE_END()
