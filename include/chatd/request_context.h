// Everything the access log line and the counters need about one request,
// gathered as the request is handled: the FastCGI server fills in what it
// read and, once the answer is ready, its status and latency; the HTTP API
// adds the user, the outcome, how authentication went and the chat's trace.
// Observe (src/observe.h) turns it into the log line and every counter at
// once, so nothing along the way logs or counts the request itself, and what
// the log says and what /metrics counts cannot disagree.
#pragma once

#include <cstdint>
#include <string>

#include "chatd/chat_service.h"
#include "chatd/clock.h"
#include "chatd/status.h"

namespace chatd {

enum class AuthOutcome {
  kNotAsked,  // no credentials were checked (mode off, or refused before)
  kAccepted,
  kRefused,   // error_reason is the refusal's reason
};

struct RequestContext {
  // What the server read.
  std::string request_id;
  std::string method;
  std::string path;
  std::string remote_addr;

  // What the handler found out.
  std::string user_id;       // once known; empty before
  std::string error_reason;  // the failure's reason (an error's code, or "client_gone")
  AuthOutcome auth = AuthOutcome::kNotAsked;
  const char* auth_mode = "";  // "service" or "jwt" when credentials were checked
  // Set when ChatService::Chat ran: its trace and the code it ended with.
  bool chat_called = false;
  ChatTrace chat;
  Code chat_code = Code::kOk;
  bool chat_streamed = false;       // asked for as server-sent events
  bool stream_client_gone = false;  // ... and the client left before the model was done
  // A stream's time to its first delta, split: from the request's start to
  // the delta's event handed to nginx, and from the model call to the delta's
  // text parsed. Their difference is what chatd itself took (-1: no delta).
  int64_t first_byte_us = -1;
  int64_t model_first_delta_us = -1;

  SteadyClock::time_point started{};  // when the server began to read the request

  // The answer, set by the server when it is ready.
  int status = 0;
  SteadyClock::duration latency{};
};

}  // namespace chatd
