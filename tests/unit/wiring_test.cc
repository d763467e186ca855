// The two binaries build their adapters through one function (wiring.h):
// what they must agree on is checked here for both, so a setting added for
// one and forgotten for the other fails a test instead of drifting.
#include <boost/test/unit_test.hpp>
#include <map>
#include <optional>
#include <string>

#include "chatd/config.h"
#include "chatd/wiring.h"
#include "wiring_internal.h"

using namespace chatd;

namespace {

Config Load(std::map<std::string, std::string> vars) {
  auto loaded = LoadConfig([vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  });
  BOOST_REQUIRE(loaded.ok());
  return *loaded;
}

constexpr Binary kBoth[] = {Binary::kChatd, Binary::kCleanup};

}  // namespace

BOOST_AUTO_TEST_SUITE(wiring)

BOOST_AUTO_TEST_CASE(both_binaries_give_the_openai_embedder_the_configured_connect_timeout) {
  Config c = Load({{"CHATD_EMBEDDER", "openai"}, {"CHATD_LLM_CONNECT_TIMEOUT_MS", "777"},
                   {"CHATD_EMBEDDING_MODEL", "m-embed"}});
  for (Binary b : kBoth) {
    OpenAIEmbedderOptions o = MakeOpenAIEmbedderOptions(c, b);
    BOOST_TEST(o.connect_timeout_ms == 777);
    BOOST_TEST(o.model == "m-embed");
    BOOST_TEST(o.dimensions == static_cast<size_t>(c.embedding_dimensions));
  }
  // The request path keeps an embedding as short as a recall; the batch may wait.
  BOOST_TEST(MakeOpenAIEmbedderOptions(c, Binary::kChatd).timeout_ms == c.chroma_timeout_ms);
  BOOST_TEST(MakeOpenAIEmbedderOptions(c, Binary::kCleanup).timeout_ms > c.chroma_timeout_ms);
}

BOOST_AUTO_TEST_CASE(both_binaries_reach_the_same_redis_and_chroma_the_same_way) {
  Config c = Load({{"CHATD_REDIS_HOST", "10.0.0.7"}, {"CHATD_REDIS_PORT", "6380"},
                   {"CHATD_CHROMA_URL", "http://10.0.0.8:8000"}, {"CHATD_CHROMA_SHARDS", "32"},
                   {"CHATD_CHROMA_TENANT", "t1"}, {"CHATD_CHROMA_DATABASE", "d1"}});
  RedisOptions chatd_redis = MakeRedisOptions(c, Binary::kChatd);
  RedisOptions cleanup_redis = MakeRedisOptions(c, Binary::kCleanup);
  BOOST_TEST(chatd_redis.host == "10.0.0.7");
  BOOST_TEST(cleanup_redis.host == chatd_redis.host);
  BOOST_TEST(cleanup_redis.port == 6380);
  BOOST_TEST(cleanup_redis.port == chatd_redis.port);
  BOOST_TEST(cleanup_redis.username == chatd_redis.username);
  BOOST_TEST(cleanup_redis.password == chatd_redis.password);
  // Only the batch waits through a Redis restart.
  BOOST_TEST(chatd_redis.transient_wait_ms == 0);
  BOOST_TEST(cleanup_redis.transient_wait_ms == c.cleanup_redis_wait_ms);
  BOOST_TEST(cleanup_redis.timeout_ms >= chatd_redis.timeout_ms);

  ChromaOptions chatd_chroma = MakeChromaOptions(c, Binary::kChatd, nullptr);
  ChromaOptions cleanup_chroma = MakeChromaOptions(c, Binary::kCleanup, nullptr);
  for (const ChromaOptions* o : {&chatd_chroma, &cleanup_chroma}) {
    BOOST_TEST(o->base_url == "http://10.0.0.8:8000");
    BOOST_TEST(o->shards == 32);
    BOOST_TEST(o->tenant == "t1");
    BOOST_TEST(o->database == "d1");
  }
  BOOST_TEST(chatd_chroma.timeout_ms == c.chroma_timeout_ms);
  BOOST_TEST(cleanup_chroma.timeout_ms >= chatd_chroma.timeout_ms);
}

BOOST_AUTO_TEST_CASE(the_hnsw_build_of_new_shards_is_the_configured_one_and_defaults_to_the_adapters_own) {
  // Config (public) cannot include the adapter's header, so the defaults are
  // written in both: this keeps them one.
  const chroma_json::HnswBuild adapter_default;
  Config defaults = Load({});
  Config set = Load({{"CHATD_CHROMA_HNSW_MAX_NEIGHBORS", "12"}, {"CHATD_CHROMA_HNSW_EF_CONSTRUCTION", "60"},
                     {"CHATD_CHROMA_SYNC_THRESHOLD", "500"}});
  for (Binary b : kBoth) {  // the cleanup's migration creates shards too
    const chroma_json::HnswBuild d = MakeChromaOptions(defaults, b, nullptr).hnsw;
    BOOST_TEST(d.max_neighbors == adapter_default.max_neighbors);
    BOOST_TEST(d.ef_construction == adapter_default.ef_construction);
    BOOST_TEST(d.sync_threshold == adapter_default.sync_threshold);
    const chroma_json::HnswBuild o = MakeChromaOptions(set, b, nullptr).hnsw;
    BOOST_TEST(o.max_neighbors == 12);
    BOOST_TEST(o.ef_construction == 60);
    BOOST_TEST(o.sync_threshold == 500);
  }
}

BOOST_AUTO_TEST_CASE(only_chatd_gets_a_model) {
  Config c = Load({});
  BOOST_TEST((Wire(c, Binary::kChatd).llm != nullptr));
  BOOST_TEST((Wire(c, Binary::kCleanup).llm == nullptr));
  BOOST_TEST(MakeOpenAIChatOptions(c).connect_timeout_ms == c.llm_connect_timeout_ms);
}

BOOST_AUTO_TEST_SUITE_END()
