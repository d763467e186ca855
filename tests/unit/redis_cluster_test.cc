// The pure parts of the cluster client: slots, key positions, redirects and
// the slot map. Routing against servers is in redis_test.cc (fake nodes) and
// tests/integration/test_redis_cluster.py (a real cluster).
#include "redis_cluster.h"

#include <boost/test/unit_test.hpp>

namespace chatd {
namespace {

RedisValue Of(RedisValue::Type type, std::string str, int64_t integer = 0, std::vector<RedisValue> elements = {}) {
  RedisValue r;
  r.type = type;
  r.str = std::move(str);
  r.integer = integer;
  r.elements = std::move(elements);
  return r;
}
RedisValue Int(int64_t v) { return Of(RedisValue::Type::kInteger, "", v); }
RedisValue Str(std::string s) { return Of(RedisValue::Type::kString, std::move(s)); }
RedisValue Err(std::string s) { return Of(RedisValue::Type::kError, std::move(s)); }
RedisValue Arr(std::vector<RedisValue> e) { return Of(RedisValue::Type::kArray, "", 0, std::move(e)); }

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_cluster)

BOOST_AUTO_TEST_CASE(crc16_is_xmodem_as_the_cluster_spec_says) {
  // The Redis Cluster specification gives this check value.
  BOOST_TEST(RedisCrc16("123456789") == 0x31C3);
  BOOST_TEST(RedisCrc16("") == 0);
}

BOOST_AUTO_TEST_CASE(key_slots_match_cluster_keyslot) {
  // Every expected value is what redis-server 7.0 answers to CLUSTER KEYSLOT.
  BOOST_TEST(RedisKeySlot("foo") == 12182);
  BOOST_TEST(RedisKeySlot("bar") == 5061);
  BOOST_TEST(RedisKeySlot("123456789") == 12739);
  BOOST_TEST(RedisKeySlot("{user1000}.following") == 3443);
  BOOST_TEST(RedisKeySlot("foo{}{bar}") == 8363);     // an empty tag hashes the whole key
  BOOST_TEST(RedisKeySlot("foo{{bar}}zap") == 4015);  // the tag is "{bar"
  BOOST_TEST(RedisKeySlot("foo{bar}{zap}") == 5061);  // only the first tag counts
  BOOST_TEST(RedisKeySlot("{}") == 15257);
  BOOST_TEST(RedisKeySlot("") == 0);
  BOOST_TEST(RedisKeySlot("rl:{u-42}:fixed") == 9703);
  // One user's keys share a slot: what makes their scripts and pipelines legal.
  BOOST_TEST(RedisKeySlot("chat:{alice}:recent") == 749);
  BOOST_TEST(RedisKeySlot("chat:{alice}:hot") == RedisKeySlot("alice"));
}

BOOST_AUTO_TEST_CASE(first_key_follows_each_command_shape) {
  using V = std::vector<std::string_view>;
  BOOST_TEST(RedisFirstKeyIndex(V{"GET", "k"}).value() == 1u);
  BOOST_TEST(RedisFirstKeyIndex(V{"zrange", "k", "0", "-1"}).value() == 1u);
  BOOST_TEST(RedisFirstKeyIndex(V{"EVALSHA", "abc", "2", "k1", "k2", "a"}).value() == 3u);
  BOOST_TEST(!RedisFirstKeyIndex(V{"EVAL", "return 1", "0"}).has_value());
  BOOST_TEST(!RedisFirstKeyIndex(V{"EVAL", "return 1", "x", "k"}).has_value());
  BOOST_TEST(RedisFirstKeyIndex(V{"XREADGROUP", "GROUP", "g", "c", "COUNT", "5", "STREAMS", "s", ">"}).value() ==
             7u);
  BOOST_TEST(RedisFirstKeyIndex(V{"XGROUP", "CREATE", "s", "g", "0"}).value() == 2u);
  BOOST_TEST(RedisFirstKeyIndex(V{"XINFO", "STREAM", "s"}).value() == 2u);
  for (const char* keyless : {"PING", "INFO", "TIME", "SCRIPT", "CLUSTER"}) {
    BOOST_TEST(!RedisFirstKeyIndex(V{keyless, "x"}).has_value());
  }
  BOOST_TEST(!RedisFirstKeyIndex(V{"PING"}).has_value());
}

BOOST_AUTO_TEST_CASE(redirects_are_parsed_and_garbage_is_not_one) {
  auto moved = ParseRedisRedirect(Err("MOVED 3999 127.0.0.1:6381"));
  BOOST_REQUIRE(moved.has_value());
  BOOST_TEST((moved->kind == RedisRedirect::Kind::kMoved));
  BOOST_TEST(moved->slot == 3999);
  BOOST_TEST(moved->node.host == "127.0.0.1");
  BOOST_TEST(moved->node.port == 6381);
  auto ask = ParseRedisRedirect(Err("ASK 1 ::1:7000"));
  BOOST_REQUIRE(ask.has_value());
  BOOST_TEST((ask->kind == RedisRedirect::Kind::kAsk));
  BOOST_TEST(ask->node.host == "::1");
  BOOST_TEST(ask->node.port == 7000);
  auto hostless = ParseRedisRedirect(Err("MOVED 5 :7001"));  // "the node you asked"
  BOOST_REQUIRE(hostless.has_value());
  BOOST_TEST(hostless->node.host.empty());
  for (const char* bad : {"MOVED", "MOVED 3999", "MOVED x 1.2.3.4:5", "MOVED 16384 h:1", "ASK 1 h:0", "ASK 1 h",
                          "ERR MOVED 1 h:1", "MOVEDX 1 h:1"}) {
    BOOST_TEST(!ParseRedisRedirect(Err(bad)).has_value(), bad);
  }
  BOOST_TEST(!ParseRedisRedirect(Str("MOVED 1 h:1")).has_value());  // not an error reply
}

BOOST_AUTO_TEST_CASE(cluster_slots_reply_becomes_ranges) {
  const RedisValue reply =
      Arr({Arr({Int(0), Int(5460), Arr({Str("127.0.0.1"), Int(7000), Str("id-a")}),
                Arr({Str("127.0.0.1"), Int(7003), Str("id-d")})}),
           Arr({Int(5461), Int(16383), Arr({Str(""), Int(7001), Str("id-b")})})});
  auto ranges = ParseClusterSlots(reply, "10.1.1.1");
  BOOST_REQUIRE(ranges.ok());
  BOOST_REQUIRE_EQUAL(ranges->size(), 2u);
  BOOST_TEST((*ranges)[0].first == 0);
  BOOST_TEST((*ranges)[0].last == 5460);
  BOOST_TEST((*ranges)[0].primary.port == 7000);
  BOOST_TEST((*ranges)[1].primary.host == "10.1.1.1");  // no host: the node we asked
  BOOST_TEST((*ranges)[1].primary.port == 7001);

  auto refused = ParseClusterSlots(Err("ERR This instance has cluster support disabled"), "h");
  BOOST_REQUIRE(!refused.ok());
  BOOST_TEST(refused.status().reason() == "redis_error");
  BOOST_TEST(!ParseClusterSlots(Arr({Arr({Int(0), Int(16384), Arr({Str("h"), Int(1)})})}), "h").ok());
  BOOST_TEST(!ParseClusterSlots(Arr({Arr({Int(9), Int(3), Arr({Str("h"), Int(1)})})}), "h").ok());
  BOOST_TEST(!ParseClusterSlots(Arr({Arr({Int(0), Int(1)})}), "h").ok());
  BOOST_TEST(!ParseClusterSlots(Str("nope"), "h").ok());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
