// Chroma's answers, through the public chroma_json parsers only (the
// transport in src/chroma.cc is being rewritten; these functions are the
// stable boundary): collection, query, get, count and error bodies.
#include <cmath>

#include "chatd/chroma.h"
#include "chatd/user_id.h"
#include "fuzz_input.h"

namespace {
// The user the records must belong to; seeds use it in their metadata.
constexpr char kUser[] = "alice";
constexpr long kErrorStatuses[] = {400, 404, 409, 412, 422, 500};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  using fuzz::Require;
  std::string_view body = fuzz::Bytes(data, size);

  if (auto id = chroma_json::ParseCollectionId(body); id.ok()) {
    Require(id->size() == 36, "a collection id is a UUID");
  }
  if (auto records = chroma_json::ParseQueryResponse(body, kUser); records.ok()) {
    for (size_t i = 0; i < records->size(); ++i) {
      const RecalledMessage& r = (*records)[i];
      Require(r.message.user_id == kUser, "recalled records are the user's");
      Require(std::isfinite(r.distance), "finite distances");
      Require(i == 0 || (*records)[i - 1].distance <= r.distance, "nearest first");
    }
  }
  if (auto records = chroma_json::ParseGetResponse(body, kUser); records.ok()) {
    for (const StoredMessage& m : *records) {
      Require(m.user_id == kUser, "exported records are the user's");
      for (float x : m.embedding) Require(std::isfinite(x), "finite embeddings");
    }
  }
  if (auto count = chroma_json::ParseCount(body); count.ok()) Require(*count >= 0, "a count is not negative");
  for (long status : kErrorStatuses) {
    Status s = chroma_json::ErrorFromResponse(status, body, "fuzz");
    Require(!s.ok(), "an error answer is an error");
  }
  return 0;
}
