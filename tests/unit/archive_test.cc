#include <boost/test/unit_test.hpp>

#include <cfloat>
#include <cstring>
#include <random>
#include <string>

#include "chatd/archive.h"

using namespace chatd;

namespace {

// Enough random bit patterns to meet every exponent many times, in well under
// a second.
constexpr int kRandomFloats = 200'000;
constexpr uint32_t kExponentMask = 0x7f800000u;

std::string OneRecordArchive(std::string_view embedding_json) {
  return R"({"format":"chatd-archive/1","user":"alice","last_activity_ms":1,"archived_at_ms":2,"records":[)"
         R"({"id":"t:u","document":"d","metadata":{"role":"user","ts":1,"user":"alice","turn":"t"},"embedding":)" +
         std::string(embedding_json) + "}]}";
}

}  // namespace

BOOST_AUTO_TEST_SUITE(archive)

// Found by fuzz_archive: RapidJSON's full-precision path read "0e39" as
// -1.5e228 (and did so through undefined behaviour).
BOOST_AUTO_TEST_CASE(zero_with_a_large_exponent_reads_as_zero) {
  auto a = ParseArchive(OneRecordArchive("[0e39,0.0e300,0e-400,-0e38]"));
  BOOST_REQUIRE(a.ok());
  BOOST_REQUIRE(a->records.size() == 1u);
  for (float x : a->records[0].embedding) BOOST_TEST(x == 0.0f);
}

// Found by fuzz_archive: an escaped lone low surrogate decoded into bytes
// that are not UTF-8, which the archive's own writer then could not read back.
BOOST_AUTO_TEST_CASE(lone_surrogate_escapes_are_refused) {
  std::string text = OneRecordArchive("[]");
  BOOST_REQUIRE(ParseArchive(text).ok());
  text.replace(text.find("\"d\""), 3, R"("a\udd00b")");
  auto a = ParseArchive(text);
  BOOST_REQUIRE(!a.ok());
  BOOST_TEST(a.status().reason() == "bad_archive");
}

// Every finite float survives SerializeArchive and ParseArchive bit for bit
// (apart from the sign of zero), including the extremes.
BOOST_AUTO_TEST_CASE(floats_round_trip_exactly) {
  Archive a;
  a.user_id = "alice";
  StoredMessage m;
  m.id = "t:u";
  m.user_id = "alice";
  m.turn_id = "t";
  m.embedding = {FLT_MAX, -FLT_MAX, FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN, 1.0f, 0.1f, 1e-10f};
  std::mt19937 rng(12345);
  while (m.embedding.size() < static_cast<size_t>(kRandomFloats)) {
    uint32_t bits = static_cast<uint32_t>(rng());
    if ((bits & kExponentMask) == kExponentMask) continue;  // infinities and NaNs are never written
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    m.embedding.push_back(f);
  }
  a.records.push_back(m);
  auto back = ParseArchive(SerializeArchive(a));
  BOOST_REQUIRE(back.ok());
  BOOST_REQUIRE(back->records.size() == 1u);
  const auto& got = back->records[0].embedding;
  BOOST_REQUIRE(got.size() == m.embedding.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) mismatches += got[i] != m.embedding[i];
  BOOST_TEST(mismatches == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
