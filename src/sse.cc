#include "sse.h"

namespace chatd {

namespace {

constexpr std::string_view kBom = "\xEF\xBB\xBF";

Status TooLarge() {
  return Status(Code::kUpstream, "stream_too_large", "The model sent an event larger than the limit");
}

}  // namespace

Status SseParser::Feed(std::string_view bytes, std::vector<SseEvent>& out) {
  if (failed_) return TooLarge();
  if (at_start_ && !bytes.empty()) {
    // The BOM may itself arrive split: hold back a prefix of it until we know.
    line_.append(bytes);
    if (line_.size() < kBom.size() && kBom.substr(0, line_.size()) == line_) return Status::Ok();
    at_start_ = false;
    std::string pending = std::move(line_);
    line_.clear();
    std::string_view rest = pending;
    if (rest.substr(0, kBom.size()) == kBom) rest.remove_prefix(kBom.size());
    return Feed(rest, out);
  }
  size_t start = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const char c = bytes[i];
    if (c != '\r' && c != '\n') continue;
    if (c == '\n' && after_cr_ && i == start && line_.empty()) {
      // The LF of a CRLF whose CR ended the previous line.
      after_cr_ = false;
      start = i + 1;
      continue;
    }
    after_cr_ = c == '\r';
    std::string_view piece = bytes.substr(start, i - start);
    // The same bound whether or not the line arrived in one piece.
    if (line_.size() + piece.size() > max_event_bytes_) {
      failed_ = true;
      return TooLarge();
    }
    Status s;
    if (line_.empty()) {
      s = Line(piece, out);
    } else {
      line_.append(piece);
      std::string whole = std::move(line_);
      line_.clear();
      s = Line(whole, out);
    }
    if (!s.ok()) {
      failed_ = true;
      return s;
    }
    start = i + 1;
  }
  if (start < bytes.size()) {
    after_cr_ = false;
    std::string_view tail = bytes.substr(start);
    if (line_.size() + tail.size() > max_event_bytes_) {
      failed_ = true;
      return TooLarge();
    }
    line_.append(tail);
  }
  return Status::Ok();
}

Status SseParser::Line(std::string_view line, std::vector<SseEvent>& out) {
  if (line.empty()) {
    // Dispatch. An event without data is no event (the spec resets and
    // fires nothing), which also makes blank keep-alive lines harmless.
    if (data_started_) {
      SseEvent event;
      event.type = std::move(type_);
      event.data = std::move(data_);
      if (!event.data.empty() && event.data.back() == '\n') event.data.pop_back();
      event.id = last_id_;
      out.push_back(std::move(event));
    }
    type_.clear();
    data_.clear();
    data_started_ = false;
    return Status::Ok();
  }
  if (line.front() == ':') return Status::Ok();  // a comment, e.g. a keep-alive
  std::string_view field = line, value;
  if (size_t colon = line.find(':'); colon != std::string_view::npos) {
    field = line.substr(0, colon);
    value = line.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  }
  if (field == "data") {
    if (data_.size() + value.size() + 1 > max_event_bytes_) return TooLarge();
    data_.append(value).push_back('\n');
    data_started_ = true;
  } else if (field == "event") {
    type_.assign(value);
  } else if (field == "id") {
    if (value.find('\0') == std::string_view::npos) last_id_.assign(value);
  }
  // "retry" is for reconnecting browsers, and unknown fields are ignored.
  return Status::Ok();
}

}  // namespace chatd
