// Chroma's answers, through the public chroma_json parsers: collection,
// collection list, query, get, count and error bodies. Records of another
// user must be dropped and counted, never returned.
#include <cmath>

#include "chroma.h"
#include "chatd/user_id.h"
#include "fuzz_input.h"
#include "chroma_json.h"

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
  if (auto names = chroma_json::ParseCollectionNames(body); names.ok()) {
    for (const std::string& name : *names) Require(name.size() <= body.size(), "names come from the body");
  }
  if (auto recalled = chroma_json::ParseQueryResponse(body, kUser); recalled.ok()) {
    const std::vector<RecalledMessage>& records = recalled->messages;
    for (size_t i = 0; i < records.size(); ++i) {
      const RecalledMessage& r = records[i];
      Require(r.message.user_id == kUser, "recalled records are the user's");
      Require(std::isfinite(r.distance), "finite distances");
      Require(i == 0 || records[i - 1].distance <= r.distance, "nearest first");
    }
  }
  for (bool full : {false, true}) {
    size_t foreign = 0, page = 0;
    std::vector<std::string> raw_ids;
    auto records = chroma_json::ParseGetResponse(body, kUser, full, &foreign, &raw_ids, &page);
    if (!records.ok()) continue;
    Require(raw_ids.size() == records->size(), "one stored id per kept record");
    Require(records->size() + foreign == page, "every record of the page is kept or counted as foreign");
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
