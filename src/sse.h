// An incremental parser of the text/event-stream format (WHATWG HTML,
// "server-sent events", interpreting an event stream), for the model's
// streamed replies. Bytes arrive in arbitrary pieces, as the network hands
// them over: a line, an event, even a CRLF pair may be split across two
// Feed calls. Lines end with CRLF, LF or CR; ":" starts a comment; several
// "data:" lines of one event are joined with LF; an empty line ends the event.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

namespace chatd {

struct SseEvent {
  std::string type;  // the "event:" field; empty means the default, "message"
  std::string data;  // the "data:" lines joined with LF, without the final LF
  std::string id;    // the last "id:" seen in the stream (the spec's last event ID)
};

class SseParser {
 public:
  // `max_event_bytes` bounds one line and one event's data: an upstream that
  // never ends a line must not grow our memory without limit.
  explicit SseParser(size_t max_event_bytes) : max_event_bytes_(max_event_bytes) {}

  // Parses `bytes` and appends every event they complete to `out`. Fails
  // (kUpstream, "stream_too_large") when a line or an event exceeds the
  // bound; the parser is then unusable.
  Status Feed(std::string_view bytes, std::vector<SseEvent>& out);

  // Whether the bytes fed so far end inside an event (a partial line or
  // data not yet dispatched). Per the spec, such an event is dropped when
  // the stream ends.
  bool HasPartialEvent() const { return !line_.empty() || data_started_; }

 private:
  Status Line(std::string_view line, std::vector<SseEvent>& out);

  size_t max_event_bytes_;
  std::string line_;          // the current line, not yet ended
  std::string data_;          // data of the current event
  std::string type_;          // event type of the current event
  std::string last_id_;
  bool data_started_ = false;  // a data field was seen in the current event
  bool after_cr_ = false;      // the last byte was a CR: a following LF ends nothing
  bool at_start_ = true;       // nothing fed yet: a leading BOM is skipped
  bool failed_ = false;
};

}  // namespace chatd
