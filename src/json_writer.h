// The one way chatd writes JSON: RapidJSON's Writer, appending to a string the
// caller owns, so an answer can be built in one piece or streamed out a page
// at a time (the caller sends and clears the string between pages; the
// writer keeps its place in the document).
//
// JsonWriter writes strings as given: text from upstreams is sanitised before
// it gets here (SanitizeUtf8). Request bodies for other services, which must
// refuse invalid UTF-8 rather than pass it on, use StrictJsonWriter, whose
// calls return false on it.
#pragma once

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace chatd {

class JsonWriter {
 public:
  explicit JsonWriter(std::string& out) : stream_{&out}, writer_(stream_) {}
  JsonWriter(const JsonWriter&) = delete;
  JsonWriter& operator=(const JsonWriter&) = delete;

  JsonWriter& StartObject() { writer_.StartObject(); return *this; }
  JsonWriter& EndObject() { writer_.EndObject(); return *this; }
  JsonWriter& StartArray() { writer_.StartArray(); return *this; }
  JsonWriter& EndArray() { writer_.EndArray(); return *this; }
  JsonWriter& Key(std::string_view key) {
    writer_.Key(key.data(), static_cast<rapidjson::SizeType>(key.size()));
    return *this;
  }
  JsonWriter& String(std::string_view s) {
    writer_.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
    return *this;
  }
  JsonWriter& Int(int64_t v) { writer_.Int64(v); return *this; }
  JsonWriter& Bool(bool v) { writer_.Bool(v); return *this; }
  JsonWriter& Null() { writer_.Null(); return *this; }
  // A number already formatted by the caller (a float's shortest digits, a
  // fixed precision), written as is.
  JsonWriter& RawNumber(std::string_view digits) {
    writer_.RawValue(digits.data(), digits.size(), rapidjson::kNumberType);
    return *this;
  }

 private:
  // RapidJSON's output-stream concept over a std::string.
  struct StringStream {
    using Ch = char;
    std::string* out;
    void Put(char c) { out->push_back(c); }
    void Flush() {}
  };
  StringStream stream_;
  rapidjson::Writer<StringStream> writer_;
};

using StrictJsonWriter = rapidjson::Writer<rapidjson::StringBuffer, rapidjson::UTF8<>, rapidjson::UTF8<>,
                                          rapidjson::CrtAllocator, rapidjson::kWriteValidateEncodingFlag>;

}  // namespace chatd
