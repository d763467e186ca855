#include "recall.h"

#include <boost/test/unit_test.hpp>
#include <cmath>
#include <limits>

#include "hot_record.h"

namespace chatd {
namespace {

StoredMessage Msg(const std::string& id, int64_t ts, std::vector<float> v) {
  StoredMessage m;
  m.id = id;
  m.turn_id = id.substr(0, id.find(':'));
  m.role = id.back() == 'u' ? Role::kUser : Role::kAssistant;
  m.content = "text of " + id;
  m.ts_ms = ts;
  m.embedding = std::move(v);
  return m;
}

std::vector<std::string> Packed(const std::vector<StoredMessage>& messages) {
  std::vector<std::string> out;
  for (const StoredMessage& m : messages) out.push_back(PackHotRecord(m));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(recall)

BOOST_AUTO_TEST_CASE(squared_l2_is_chromas_distance) {
  BOOST_TEST(SquaredL2({1, 0}, {1, 0}) == 0.0);
  BOOST_TEST(SquaredL2({1, 0}, {0, 1}) == 2.0);  // unit vectors: 2 - 2cos
  BOOST_TEST(std::isinf(SquaredL2({1, 0}, {1, 0, 0})));
  BOOST_TEST(std::isinf(SquaredL2({}, {})));
}

BOOST_AUTO_TEST_CASE(the_distance_in_lanes_matches_a_plain_sum_at_every_length) {
  // The lanes cover whole groups of 8 and the tail separately: try lengths
  // around the group size and a real embedding size.
  for (size_t n : {1u, 7u, 8u, 9u, 17u, 256u, 1536u}) {
    std::vector<float> a(n), b(n);
    double plain = 0;
    for (size_t i = 0; i < n; ++i) {
      a[i] = static_cast<float>(std::sin(static_cast<double>(i) + 1));
      b[i] = static_cast<float>(std::cos(static_cast<double>(i) * 0.5));
      plain += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    }
    BOOST_TEST(SquaredL2(a, b) == plain, boost::test_tools::tolerance(1e-5));
    BOOST_TEST(SquaredL2(a, a) == 0.0);
    // In place from a record's unaligned bytes, the same figure.
    std::string bytes = "x" + PackEmbedding(a);
    BOOST_TEST(SquaredL2Packed(bytes.data() + 1, b.data(), n) == SquaredL2(a, b));
  }
}

BOOST_AUTO_TEST_CASE(the_hot_set_is_ranked_nearest_first_without_excluded_or_odd_sized_vectors) {
  std::vector<std::string> hot = Packed({Msg("t1:u", 1, {0, 1}), Msg("t2:u", 2, {1, 0}), Msg("t3:u", 3, {0.8f, 0.6f}),
                                         Msg("t4:u", 4, {1, 0, 0}), Msg("t5:u", 5, {1, 0}), Msg("t6:a", 6, {1, 0})});
  hot.push_back("not a record");  // costs recall one candidate, nothing else
  auto ranked = RankHot(hot, {1, 0}, 2, {"t5:u", "t6:a"});
  BOOST_REQUIRE_EQUAL(ranked.size(), 2u);
  BOOST_TEST(ranked[0].message.id == "t2:u");
  BOOST_TEST(ranked[0].message.content == "text of t2:u");  // decoded whole
  BOOST_TEST(ranked[0].message.embedding == (std::vector<float>{1, 0}));
  BOOST_TEST(ranked[0].distance == 0.0);
  BOOST_TEST(ranked[1].message.id == "t3:u");
  BOOST_TEST(RankHot(hot, {1, 0}, 0, {}).empty());
  BOOST_TEST(RankHot(hot, {1, 0}, 10, {}).size() == 5u);  // the 3-d vector and the junk never rank
  BOOST_TEST(RankHot(hot, {1, 0}, 10, {"t6:u", "t5:a"}).size() == 5u);  // the role is part of the id
}

BOOST_AUTO_TEST_CASE(a_tie_goes_to_the_newer_message) {
  auto ranked = RankHot(Packed({Msg("old:u", 1, {1, 0}), Msg("new:u", 9, {1, 0})}), {1, 0}, 1, {});
  BOOST_REQUIRE_EQUAL(ranked.size(), 1u);
  BOOST_TEST(ranked[0].message.id == "new:u");
}

BOOST_AUTO_TEST_CASE(merging_keeps_the_k_nearest_of_both_once_each) {
  std::vector<RecalledMessage> hot = {{Msg("a:u", 5, {}), 0.5}, {Msg("b:u", 6, {}), 0.1}};
  std::vector<RecalledMessage> older = {{Msg("c:u", 1, {}), 0.2}, {Msg("b:u", 6, {}), 0.1}, {Msg("d:u", 2, {}), 0.9}};
  auto merged = MergeNearest(hot, older, 3);
  BOOST_REQUIRE_EQUAL(merged.size(), 3u);
  BOOST_TEST(merged[0].message.id == "b:u");
  BOOST_TEST(merged[1].message.id == "c:u");
  BOOST_TEST(merged[2].message.id == "a:u");
}

BOOST_AUTO_TEST_CASE(a_hot_record_round_trips_bit_exact) {
  StoredMessage m = Msg("0123456789abcdef0123456789abcdef:a", 1700000000123,
                        {0.1f, -0.0f, 1e-45f, std::numeric_limits<float>::max()});
  m.content = std::string("caf\xc3\xa9 with a \0 byte", 19);
  auto back = UnpackHotRecord(PackHotRecord(m));
  BOOST_REQUIRE(back.ok());
  BOOST_TEST(back->id == m.id);
  BOOST_TEST(back->turn_id == m.turn_id);
  BOOST_TEST((back->role == Role::kAssistant));
  BOOST_TEST(back->content == m.content);
  BOOST_TEST(back->ts_ms == m.ts_ms);
  BOOST_TEST(PackEmbedding(back->embedding) == PackEmbedding(m.embedding));
}

BOOST_AUTO_TEST_CASE(a_truncated_or_foreign_hot_record_is_refused) {
  const std::string good = PackHotRecord(Msg("t1:u", 1, {1, 0}));
  for (size_t n = 0; n < good.size(); ++n) {
    BOOST_TEST_CONTEXT(n) {
      auto r = UnpackHotRecord(good.substr(0, n));
      // Cut inside the vector leaves a whole number of floats only by chance:
      // then it is a shorter vector, which recall skips by size.
      if (r.ok()) BOOST_TEST(r->embedding.size() < 2u);
    }
  }
  std::string other_version = good;
  other_version[0] = 2;
  BOOST_TEST(UnpackHotRecord(other_version).status().reason() == "bad_hot_record");
  std::string bad_role = good;
  bad_role[9] = 7;
  BOOST_TEST(!UnpackHotRecord(bad_role).ok());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
