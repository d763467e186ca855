#include "observe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include "chatd/log.h"

namespace chatd {

namespace {

// Refusals this process has made, for the auth_failed line (docs/auth.md):
// the pool-wide figure is chatd_auth_failures_total.
std::atomic<uint64_t> g_auth_refusals{0};

void CountChat(const RequestContext& ctx, Metrics& metrics) {
  SharedMetrics& m = metrics.shared();
  const ChatTrace& trace = ctx.chat;
  if (ctx.chat_code == Code::kRateLimited) Metrics::Add(m.rate_limited);
  if (trace.rate_limiter_failed_open) Metrics::Add(m.rate_limiter_failed_open);
  if (trace.recall_degraded) Metrics::Add(m.recall_degraded);
  if (trace.long_term_queried) Metrics::Add(m.recall_long_term_queries);
  if (trace.foreign_records_dropped > 0) Metrics::Add(m.recall_foreign_dropped, trace.foreign_records_dropped);
  Metrics::Add(m.prompt_tokens, static_cast<uint64_t>(std::max<int64_t>(trace.prompt_tokens, 0)));
  Metrics::Add(m.completion_tokens, static_cast<uint64_t>(std::max<int64_t>(trace.completion_tokens, 0)));
  if (trace.upstream_ms >= 0) {
    metrics.CountModelCall(!trace.model_failed, trace.model_timed_out, trace.upstream_ms * 1000);
  }
  if (ctx.chat_streamed) {
    Metrics::Add(m.chat_streams);
    if (ctx.stream_client_gone) Metrics::Add(m.chat_streams_client_gone);
  }
}

}  // namespace

void Observe(const RequestContext& ctx, Metrics* metrics) {
  if (ctx.auth == AuthOutcome::kRefused) {
    const uint64_t n = g_auth_refusals.fetch_add(1, std::memory_order_relaxed) + 1;
    LogWarn("auth_failed")
        .Str("mode", ctx.auth_mode)
        .Str("reason", ctx.error_reason)
        .Str("request_id", ctx.request_id)
        .Str("remote_addr", ctx.remote_addr)
        .Int("failures", static_cast<int64_t>(n))
        .Emit();
  }
  if (ctx.chat_called && ctx.chat.rate_limiter_failed_open) {
    LogWarn("rate_limiter_failed_open").Str("user", ctx.user_id).Emit();
  }

  if (metrics != nullptr) {
    metrics->CountRequest(ctx.status, std::chrono::duration_cast<std::chrono::microseconds>(ctx.latency).count());
    if (ctx.auth == AuthOutcome::kRefused) Metrics::Add(metrics->shared().auth_failures);
    if (ctx.chat_called) CountChat(ctx, *metrics);
  }

  LogLine line = LogInfo("request");
  line.Str("request_id", ctx.request_id)
      .Str("method", ctx.method)
      .Str("path", ctx.path)
      .Int("status", ctx.status)
      .Num("latency_ms", std::chrono::duration<double, std::milli>(ctx.latency).count())
      .Int("upstream_ms", ctx.chat_called ? ctx.chat.upstream_ms : -1)
      .Str("user", ctx.user_id);
  // Where a chat's own time went: before the model call (admission, memory,
  // recall, prompt) is this; after it is latency - upstream - this.
  if (ctx.chat_called && ctx.chat.model_started != SteadyClock::time_point{} &&
      ctx.started != SteadyClock::time_point{}) {
    line.Num("before_model_ms", std::chrono::duration<double, std::milli>(ctx.chat.model_started - ctx.started).count());
  }
  if (!ctx.error_reason.empty()) line.Str("error", ctx.error_reason);
  if (ctx.chat_called && ctx.chat.recall_degraded) line.Bool("recall_degraded", true);
  if (ctx.first_byte_us >= 0) {
    line.Num("first_byte_ms", static_cast<double>(ctx.first_byte_us) / 1000.0)
        .Num("model_first_delta_ms", static_cast<double>(ctx.model_first_delta_us) / 1000.0);
  }
  line.Emit();
}

}  // namespace chatd
