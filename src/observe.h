// The one place a request becomes observable: its access log line and every
// counter it moves, written from its RequestContext.
//
// The FastCGI server calls it once per request, after the handler has
// returned and before the reply is written: FCGX_PutStr may already send a
// full buffer and FCGX_Finish_r sends the rest, and a client that holds its
// answer must find it in /metrics and in the log. A streamed answer is out
// already by then: it is observed when it has ended.
#pragma once

#include "chatd/metrics.h"
#include "chatd/request_context.h"

namespace chatd {

// Writes the "request" line (and the warnings that go with the request's
// outcome) to the log and counts the request in `metrics`, which may be null
// (nothing counted; the lines are still written). Thread-safe.
void Observe(const RequestContext& ctx, Metrics* metrics);

}  // namespace chatd
