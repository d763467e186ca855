#include "chroma.h"
#include "chroma_json.h"
#include "uid.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>

#include <cfloat>
#include <cstdio>
#include <charconv>
#include <cstring>
#include <random>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace chatd {
namespace {

StoredMessage Record(const std::string& id, Role role, const std::string& content,
                     std::vector<float> embedding) {
  StoredMessage m;
  m.id = id;
  m.user_id = "alice";
  m.turn_id = id.substr(0, id.find(':'));
  m.role = role;
  m.content = content;
  m.ts_ms = 1700000000123;
  m.embedding = std::move(embedding);
  return m;
}

int ClosedPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// A /query answer as Chroma 1.5.9 sends it (captured from a real server).
constexpr char kQueryAnswer[] =
    R"({"ids":[["t1:u","t1:a"]],"embeddings":null,"documents":[["hi","hello"]],"uris":null,)"
    R"("metadatas":[[{"role":"user","ts":1700000000000,"user":"alice","turn":"t1"},)"
    R"({"role":"assistant","ts":1700000000001,"turn":"t1","user":"alice"}]],)"
    R"("distances":[[0.0049628615,0.9004963]],"include":["documents","metadatas","distances"]})";

// A /get answer as Chroma 1.5.9 sends it.
constexpr char kGetAnswer[] =
    R"({"ids":["t1:a"],"embeddings":[[0.0,1.0,-0.4242641]],"documents":["hello"],"uris":null,)"
    R"("metadatas":[{"user":"alice","role":"assistant","turn":"t1","ts":1700000000001}],)"
    R"("include":["documents","metadatas","embeddings"]})";

}  // namespace

BOOST_AUTO_TEST_SUITE(chroma)

BOOST_AUTO_TEST_CASE(create_collection_request) {
  chroma_json::HnswBuild hnsw;
  hnsw.sync_threshold = 100;
  hnsw.max_neighbors = 12;
  hnsw.ef_construction = 60;
  BOOST_TEST(chroma_json::CreateCollectionRequest("chatd-s16-3", hnsw) ==
             R"({"name":"chatd-s16-3","get_or_create":true,)"
             R"("configuration":{"hnsw":{"space":"l2","sync_threshold":100,"max_neighbors":12,"ef_construction":60}}})");
}

BOOST_AUTO_TEST_CASE(collection_id_must_be_a_uuid) {
  auto id = chroma_json::ParseCollectionId(
      R"({"id":"63db29f1-3763-4db5-83f5-48a06ef0b590","name":"chatd-u-61","dimension":null})");
  BOOST_REQUIRE(id.ok());
  BOOST_TEST(*id == "63db29f1-3763-4db5-83f5-48a06ef0b590");
  // The id becomes part of a URL path: nothing but a UUID may get there.
  for (const char* body : {R"({"id":"../../heartbeat-0000-0000-000000000000"})", R"({"id":42})", R"({})",
                           R"([])", "", R"({"id":"63db29f1-3763-4db5-83f5-48a06ef0b59"})"}) {
    BOOST_TEST_CONTEXT(body) {
      auto bad = chroma_json::ParseCollectionId(body);
      BOOST_REQUIRE(!bad.ok());
      BOOST_TEST(bad.status().reason() == "chroma_unavailable");
    }
  }
}

BOOST_AUTO_TEST_CASE(upsert_request_carries_ids_vectors_and_metadata_with_the_text) {
  // No documents: Chroma would index them for a full-text search chatd never
  // runs. No role and no turn either: the ids say them.
  auto body = chroma_json::UpsertRequest({Record("t1:u", Role::kUser, "hi \"there\"", {0.1f, -0.5f}),
                                          Record("t1:a", Role::kAssistant, "caf\xc3\xa9", {1.0f, 0.0f})});
  BOOST_REQUIRE(body.ok());
  BOOST_TEST(*body ==
             R"({"ids":["alice/t1:u","alice/t1:a"],"embeddings":[[0.1,-0.5],[1,0]],)"
             R"("metadatas":[{"ts":1700000000123,"user":"alice","text":"hi \"there\""},)"
             R"({"ts":1700000000123,"user":"alice","text":"café"}]})");
}

BOOST_AUTO_TEST_CASE(a_message_whose_id_does_not_say_its_turn_and_role_keeps_them_in_the_metadata) {
  StoredMessage odd = Record("t1:u", Role::kUser, "hi", {1.0f});
  odd.id = "t1-question";  // not "<turn>:u"
  StoredMessage mislabelled = Record("t2:a", Role::kUser, "yo", {1.0f});  // ":a" but a user's message
  StoredMessage other_turn = Record("t3:u", Role::kUser, "hey", {1.0f});
  other_turn.turn_id = "t9";
  auto body = chroma_json::UpsertRequest({odd, mislabelled, other_turn});
  BOOST_REQUIRE(body.ok());
  BOOST_TEST(*body == R"({"ids":["alice/t1-question","alice/t2:a","alice/t3:u"],"embeddings":[[1],[1],[1]],)"
                      R"("metadatas":[{"role":"user","turn":"t1","ts":1700000000123,"user":"alice","text":"hi"},)"
                      R"({"role":"user","turn":"t2","ts":1700000000123,"user":"alice","text":"yo"},)"
                      R"({"role":"user","turn":"t9","ts":1700000000123,"user":"alice","text":"hey"}]})");
  // And each reads back as it was written.
  const std::string get = R"({"ids":["alice/t1-question","alice/t2:a","alice/t3:u"],"documents":[null,null,null],)"
                          R"("metadatas":[{"role":"user","turn":"t1","ts":1,"user":"alice","text":"hi"},)"
                          R"({"role":"user","turn":"t2","ts":1,"user":"alice","text":"yo"},)"
                          R"({"role":"user","turn":"t9","ts":1,"user":"alice","text":"hey"}]})";
  auto records = chroma_json::ParseGetDocumentsResponse(get, "alice", nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->size(), 3u);
  BOOST_TEST((*records)[0].turn_id == "t1");
  BOOST_TEST(((*records)[1].role == Role::kUser));
  BOOST_TEST((*records)[1].turn_id == "t2");
  BOOST_TEST((*records)[2].turn_id == "t9");
}

BOOST_AUTO_TEST_CASE(role_and_turn_are_read_from_the_id_when_the_metadata_leaves_them_out) {
  // As written now (ids only), as written before (metadata too), and a
  // record with neither: the last is malformed, in /get and /query answers.
  const std::string get = R"({"ids":["alice/t1:u","alice/t1:a","alice/t0:a"],"documents":[null,null,null],)"
                          R"("metadatas":[{"ts":1,"user":"alice","text":"q"},{"ts":1,"user":"alice","text":"a"},)"
                          R"({"role":"assistant","ts":0,"user":"alice","turn":"t0","text":"old"}]})";
  auto records = chroma_json::ParseGetDocumentsResponse(get, "alice", nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->size(), 3u);
  BOOST_TEST(((*records)[0].role == Role::kUser));
  BOOST_TEST((*records)[0].turn_id == "t1");
  BOOST_TEST(((*records)[1].role == Role::kAssistant));
  BOOST_TEST((*records)[1].turn_id == "t1");
  BOOST_TEST(((*records)[2].role == Role::kAssistant));
  BOOST_TEST((*records)[2].turn_id == "t0");

  const std::string query = R"({"ids":[["alice/t5:a"]],"documents":[[null]],)"
                            R"("metadatas":[[{"ts":5,"user":"alice","text":"answer"}]],"distances":[[0.1]]})";
  auto recalled = chroma_json::ParseQueryResponse(query, "alice");
  BOOST_REQUIRE(recalled.ok());
  BOOST_REQUIRE_EQUAL(recalled->messages.size(), 1u);
  BOOST_TEST(((recalled->messages[0].message.role == Role::kAssistant)));
  BOOST_TEST(recalled->messages[0].message.turn_id == "t5");

  for (const char* bad : {R"({"ids":["alice/t1"],"documents":[null],"metadatas":[{"ts":1,"user":"alice","text":"x"}]})",
                          R"({"ids":["alice/:u"],"documents":[null],"metadatas":[{"ts":1,"user":"alice","text":"x"}]})",
                          R"({"ids":["alice/t1:u"],"documents":[null],"metadatas":[{"role":7,"ts":1,"user":"alice","text":"x"}]})",
                          R"({"ids":["alice/t1:u"],"documents":[null],"metadatas":[{"turn":7,"ts":1,"user":"alice","text":"x"}]})"}) {
    BOOST_TEST_CONTEXT(bad) {
      auto r = chroma_json::ParseGetDocumentsResponse(bad, "alice", nullptr);
      BOOST_REQUIRE(!r.ok());
      BOOST_TEST(r.status().reason() == "chroma_unavailable");
    }
  }
}

BOOST_AUTO_TEST_CASE(upsert_request_refuses_bad_records) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    StoredMessage record;
    const char* reason;
  };
  std::vector<Case> cases = {
      {Record("t1:u", Role::kUser, "x", {nan}), "bad_embedding"},
      {Record("t1:u", Role::kUser, "x", {inf}), "bad_embedding"},
      {Record("t1:u", Role::kUser, "x", {}), "missing_embedding"},
      {Record("", Role::kUser, "x", {1}), "missing_id"},
      {Record("t1:u", Role::kUser, "\xff", {1}), "invalid_utf8"},
  };
  StoredMessage nobody = Record("t1:u", Role::kUser, "x", {1});
  nobody.user_id = "";
  cases.push_back({nobody, "missing_user"});
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT(c.reason) {
      auto body = chroma_json::UpsertRequest({c.record});
      BOOST_REQUIRE(!body.ok());
      BOOST_TEST(body.status().reason() == c.reason);
    }
  }
}

BOOST_AUTO_TEST_CASE(floats_round_trip_through_the_json) {
  // The shortest text of a float must read back as the very same float.
  const std::vector<float> v = {0.1f,        -0.42426407f, 1e-30f,         3.4028235e38f, -3.4028235e38f,
                                -0.0f,       0.33333334f,  1.17549435e-38f, 1e-45f /* denormal */};
  auto body = chroma_json::QueryRequest(v, 3, "u");
  BOOST_REQUIRE(body.ok());
  // Reuse the /get parser to read the numbers back.
  const std::string vector_json = body->substr(body->find("[[") + 1, body->find("]]") - body->find("[[") - 0);
  const std::string get = R"({"ids":["a"],"documents":["d"],"metadatas":[{"role":"user","ts":1,"turn":"a","user":"u"}],)"
                          R"("embeddings":[)" + vector_json + "]}";
  auto parsed = chroma_json::ParseGetResponse(get, "u", true, nullptr, nullptr, nullptr);
  BOOST_REQUIRE(parsed.ok());
  BOOST_REQUIRE_EQUAL(parsed->size(), 1u);
  BOOST_TEST((*parsed)[0].embedding == v);
}

BOOST_AUTO_TEST_CASE(query_request) {
  auto body = chroma_json::QueryRequest({0.5f, 0.25f}, 7, "alice");
  BOOST_REQUIRE(body.ok());
  BOOST_TEST(*body == R"({"query_embeddings":[[0.5,0.25]],"n_results":7,"where":{"user":"alice"},)"
                      R"("include":["documents","metadatas","distances"]})");
  BOOST_TEST(chroma_json::QueryRequest({}, 7, "alice").status().reason() == "missing_embedding");
  BOOST_TEST(chroma_json::GetPageRequest("alice", 100, 200, true) ==
             R"({"where":{"user":"alice"},"limit":100,"offset":200,)"
             R"("include":["metadatas","documents","embeddings"]})");
  BOOST_TEST(chroma_json::GetPageRequest("", 1000, 0, false) ==
             R"({"limit":1000,"offset":0,"include":["metadatas"]})");
  BOOST_TEST(chroma_json::DeleteIdsRequest({"alice/t1:u", "alice/t1:a"}) == R"({"ids":["alice/t1:u","alice/t1:a"]})");
  // Recall by id: no user filter (the ids name the user; records are checked).
  auto by_id = chroma_json::GetIdsWithEmbeddingsRequest({"alice/t1:u", "alice/t1:a"});
  BOOST_REQUIRE(by_id.ok());
  BOOST_TEST(*by_id == R"({"ids":["alice/t1:u","alice/t1:a"],"include":["documents","metadatas","embeddings"]})");
}

BOOST_AUTO_TEST_CASE(parses_a_query_answer) {
  auto parsed = chroma_json::ParseQueryResponse(kQueryAnswer, "alice");
  BOOST_REQUIRE(parsed.ok());
  const auto* records = &parsed->messages;
  BOOST_REQUIRE_EQUAL(records->size(), 2u);
  const RecalledMessage& first = (*records)[0];
  BOOST_TEST(first.message.id == "t1:u");
  BOOST_TEST(first.message.content == "hi");
  BOOST_TEST((first.message.role == Role::kUser));
  BOOST_TEST(first.message.ts_ms == 1700000000000);
  BOOST_TEST(first.message.turn_id == "t1");
  BOOST_TEST(first.message.user_id == "alice");
  BOOST_TEST(std::abs(first.distance - 0.0049628615) < 1e-12);
  BOOST_TEST(((*records)[1].message.role == Role::kAssistant));
  BOOST_TEST((*records)[1].distance > first.distance);
}

BOOST_AUTO_TEST_CASE(query_answer_is_sorted_nearest_first) {
  const std::string body =
      R"({"ids":[["far","near"]],"documents":[["f","n"]],)"
      R"("metadatas":[[{"role":"user","ts":1,"user":"alice","turn":"far"},{"role":"user","ts":2,"user":"alice","turn":"near"}]],)"
      R"("distances":[[0.9,0.1]]})";
  auto records = chroma_json::ParseQueryResponse(body, "alice");
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->messages.size(), 2u);
  BOOST_TEST(records->messages[0].message.id == "near");
}

BOOST_AUTO_TEST_CASE(empty_query_answer_is_no_memory) {
  auto records = chroma_json::ParseQueryResponse(
      R"({"ids":[[]],"embeddings":null,"documents":[[]],"uris":null,"metadatas":[[]],"distances":[[]]})", "alice");
  BOOST_REQUIRE(records.ok());
  BOOST_TEST(records->messages.empty());
}

BOOST_AUTO_TEST_CASE(records_caught_in_a_delete_are_skipped) {
  // What 1.5.9 answered for a record whose collection was being deleted.
  auto records = chroma_json::ParseQueryResponse(
      R"({"ids":[["t2-6","t1:u"]],"embeddings":null,"documents":[[null,"hi"]],"uris":null,)"
      R"("metadatas":[[null,{"role":"user","ts":1,"user":"alice","turn":"t1"}]],)"
      R"("distances":[[5.9604645e-8,0.5]],"include":["documents","metadatas","distances"]})",
      "alice");
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->messages.size(), 1u);
  BOOST_TEST(records->messages[0].message.id == "t1:u");
}

BOOST_AUTO_TEST_CASE(malformed_query_answers_are_errors) {
  // One query's columns; each case breaks one thing in an otherwise good answer.
  auto body = [](const std::string& ids, const std::string& documents, const std::string& metadatas,
                 const std::string& distances) {
    std::string out = "{";
    if (!ids.empty()) out += R"("ids":[)" + ids + "],";
    if (!documents.empty()) out += R"("documents":[)" + documents + "],";
    if (!metadatas.empty()) out += R"("metadatas":[)" + metadatas + "],";
    if (!distances.empty()) out += R"("distances":[)" + distances + "],";
    out.back() = '}';
    return out;
  };
  const std::string meta = R"([{"role":"user","ts":1,"user":"alice","turn":"a"}])";
  BOOST_REQUIRE(chroma_json::ParseQueryResponse(body(R"(["a"])", R"(["d"])", meta, "[0.1]"), "alice").ok());
  const std::string bodies[] = {
      "",
      "null",
      "[]",
      R"({"ids":[],"documents":[],"metadatas":[],"distances":[]})",
      body(R"(["a"])", R"(["d"])", meta, ""),
      body(R"(["a","b"])", R"(["d"])", meta, "[0.1]"),
      body("[1]", R"(["d"])", meta, "[0.1]"),
      body(R"(["a"])", "[null]", meta, "[0.1]"),
      body(R"(["a"])", R"(["d"])", "[null]", "[0.1]"),
      body(R"(["a"])", R"(["d"])", R"([{"role":"system","ts":1,"user":"alice","turn":"a"}])", "[0.1]"),
      body(R"(["a"])", R"(["d"])", R"([{"role":"user","ts":1.5,"user":"alice","turn":"a"}])", "[0.1]"),
      body(R"(["a"])", R"(["d"])", R"([{"role":"user","ts":1,"user":"alice"}])", "[0.1]"),
      body(R"(["a"])", R"(["d"])", R"([{"role":"user","ts":1,"turn":"a"}])", "[0.1]"),  // no user
      body(R"(["a"])", R"(["d"])", meta, R"(["0.1"])"),
      body(R"(["a"])", R"(["d"])", meta, "[1e999]"),
      body("[\"\xff\"]", R"(["d"])", meta, "[0.1]"),  // invalid UTF-8
  };
  for (const std::string& b : bodies) {
    BOOST_TEST_CONTEXT(b) {
      auto records = chroma_json::ParseQueryResponse(b, "alice");
      BOOST_REQUIRE(!records.ok());
      BOOST_TEST(records.status().reason() == "chroma_unavailable");
    }
  }
}

BOOST_AUTO_TEST_CASE(another_users_records_are_dropped_and_counted) {
  auto records = chroma_json::ParseQueryResponse(kQueryAnswer, "bob");
  BOOST_REQUIRE(records.ok());
  BOOST_TEST(records->messages.empty());
  BOOST_TEST(records->foreign_dropped == 2u);
  size_t foreign = 0;
  auto got = chroma_json::ParseGetResponse(kGetAnswer, "Alice", true, &foreign, nullptr, nullptr);
  BOOST_REQUIRE(got.ok());
  BOOST_TEST(got->empty());
  BOOST_TEST(foreign == 1u);
}

BOOST_AUTO_TEST_CASE(a_record_whose_id_names_another_user_is_foreign_even_with_our_metadata) {
  // Metadata says alice, the id says bob: refuse it, whichever is wrong.
  const std::string body =
      R"({"ids":[["bob/t1:u","alice/t2:u"]],"documents":[["b","a"]],)"
      R"("metadatas":[[{"role":"user","ts":1,"user":"alice","turn":"t1"},{"role":"user","ts":2,"user":"alice","turn":"t2"}]],)"
      R"("distances":[[0.1,0.2]]})";
  auto records = chroma_json::ParseQueryResponse(body, "alice");
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->messages.size(), 1u);
  BOOST_TEST(records->messages[0].message.id == "t2:u");  // the user prefix is stripped
  BOOST_TEST(records->foreign_dropped == 1u);
}

BOOST_AUTO_TEST_CASE(shards_are_stable_and_spread) {
  // The shard decides where records live: it must never change.
  BOOST_TEST(ChromaShardOf("alice", 16) == ChromaShardOf("alice", 16));
  BOOST_TEST(ChromaShardName(3, 16) == "chatd-s16-3");
  std::vector<int> seen(16, 0);
  for (int i = 0; i < 1600; ++i) ++seen[static_cast<size_t>(ChromaShardOf("user-" + std::to_string(i), 16))];
  for (int n : seen) BOOST_TEST(n > 50);  // about 100 each
  for (int i = 0; i < 100; ++i) BOOST_TEST(ChromaShardOf("u" + std::to_string(i), 1) == 0);
}

BOOST_AUTO_TEST_CASE(parses_a_get_answer) {
  std::vector<std::string> raw;
  auto records = chroma_json::ParseGetResponse(kGetAnswer, "alice", true, nullptr, &raw, nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_TEST(raw == std::vector<std::string>{"t1:a"});
  BOOST_REQUIRE_EQUAL(records->size(), 1u);
  const StoredMessage& m = (*records)[0];
  BOOST_TEST(m.id == "t1:a");
  BOOST_TEST(m.content == "hello");
  BOOST_TEST((m.role == Role::kAssistant));
  BOOST_TEST(m.ts_ms == 1700000000001);
  BOOST_TEST(m.embedding == std::vector<float>({0.0f, 1.0f, -0.4242641f}));
}

BOOST_AUTO_TEST_CASE(get_answer_vectors_stay_with_their_records_whatever_the_order_of_members) {
  // The vectors are read aside from the rest of the answer: they must still
  // pair with their ids when a foreign record between them is dropped, when the
  // column comes first, and whatever the numbers' spelling.
  const std::string body = R"({"embeddings":[[0.5,-2],[7,8],[1e-3,3.4028234663852886e38]],)"
                           R"("ids":["alice/t1:u","bob/t2:u","alice/t3:a"],"documents":["one","two","th{r\\\"ee\",\"embeddings\":[[9]]"],)"
                           R"("metadatas":[{"role":"user","ts":9007199254740993,"user":"alice","turn":"t1"},)"
                           R"({"role":"user","ts":2,"user":"bob","turn":"t2"},)"
                           R"({"role":"assistant","ts":3,"user":"alice","turn":"t3","extra":[1.5,{"n":-0}]}],)"
                           R"("uris":null,"included":["documents","metadatas","embeddings"]})";
  size_t foreign = 0;
  auto records = chroma_json::ParseGetResponse(body, "alice", true, &foreign, nullptr, nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_TEST(foreign == 1u);
  BOOST_REQUIRE_EQUAL(records->size(), 2u);
  BOOST_TEST((*records)[0].content == "one");
  BOOST_TEST((*records)[0].ts_ms == 9007199254740993);  // an integer beyond a double's 53 bits stays exact
  BOOST_TEST((*records)[0].embedding == std::vector<float>({0.5f, -2.0f}));
  BOOST_TEST((*records)[1].content == R"(th{r\"ee","embeddings":[[9]])");
  BOOST_TEST((*records)[1].embedding == std::vector<float>({1e-3f, FLT_MAX}));

  // Without embeddings asked for, the column is an ordinary member.
  auto documents = chroma_json::ParseGetDocumentsResponse(body, "alice", &foreign);
  BOOST_REQUIRE(documents.ok());
  BOOST_TEST(documents->size() == 2u);
  BOOST_TEST((*documents)[0].embedding.empty());
}

BOOST_AUTO_TEST_CASE(get_answer_numbers_read_as_the_exact_conversion_reads_them) {
  // The embeddings column has a fast reader of its own. Whatever the text, it
  // must give the float that the exact conversion (std::from_chars to double,
  // then to float) gives: for floats printed every way a server might (their
  // shortest text, their double's, %.17g), and for arbitrary decimals, some
  // of them next to the middle between two floats.
  std::mt19937_64 rng(20261201);
  std::vector<std::string> texts = {"0", "-0", "0.0", "1", "-1", "1e-3", "1E+2", "0.5e1", "123456789012345678901234",
                                    "3.4028234663852886e38", "1.1754943508222875e-38", "1e-45", "7e-46",
                                    "0.000000000000000000000000000001", "16777217", "16777216.999999999999",
                                    "0.10000000149011612", "0.100000001490116119384765625", "2.5e-39", "1e38"};
  char buf[64];
  for (int i = 0; i < 30000; ++i) {
    uint32_t bits = static_cast<uint32_t>(rng());
    float f;
    std::memcpy(&f, &bits, sizeof f);
    if (!std::isfinite(f)) continue;
    texts.emplace_back(buf, std::to_chars(buf, buf + sizeof buf, f).ptr);
    texts.emplace_back(buf, std::to_chars(buf, buf + sizeof buf, static_cast<double>(f)).ptr);
    std::snprintf(buf, sizeof buf, "%.17g", static_cast<double>(f));
    texts.emplace_back(buf);
    // Between f and its neighbour, a hair from the middle.
    const double mid = (static_cast<double>(f) + std::nextafter(f, HUGE_VALF)) / 2;
    std::snprintf(buf, sizeof buf, "%.*g", 9 + static_cast<int>(rng() % 10), mid);
    texts.emplace_back(buf);
    // A random decimal: up to 20 digits, an exponent around float's range.
    std::string t = (rng() & 1) ? "-" : "";
    const int n = 1 + static_cast<int>(rng() % 20);
    for (int d = 0; d < n; ++d) t += static_cast<char>('0' + rng() % 10);
    t += "e" + std::to_string(static_cast<int>(rng() % 90) - 60);
    texts.push_back(t);
  }
  std::string body = R"({"ids":["alice/t1:u"],"embeddings":[[)";
  std::vector<float> expected;
  for (const std::string& t : texts) {
    double d = 0;
    auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), d);
    // Only what the exact conversion accepts (no float overflow, no underflow
    // to an error) belongs in the column.
    if (ec != std::errc() || end != t.data() + t.size() || std::fabs(d) > FLT_MAX) continue;
    if (!expected.empty()) body += ',';
    body += t;
    expected.push_back(static_cast<float>(d));
  }
  body += R"(]],"documents":["d"],"metadatas":[{"role":"user","ts":1,"user":"alice","turn":"t1"}]})";
  BOOST_TEST_MESSAGE(expected.size() << " numbers");
  auto records = chroma_json::ParseGetResponse(body, "alice", true, nullptr, nullptr, nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->size(), 1u);
  const std::vector<float>& got = (*records)[0].embedding;
  BOOST_REQUIRE_EQUAL(got.size(), expected.size());
  size_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    // Bit for bit: -0 and 0 are told apart.
    if (std::memcmp(&got[i], &expected[i], sizeof(float)) != 0 && wrong++ < 5) {
      BOOST_ERROR("number " << i << ": read " << got[i] << ", exact " << expected[i]);
    }
  }
  BOOST_TEST(wrong == 0u);
}

BOOST_AUTO_TEST_CASE(a_records_text_is_read_from_its_metadata_or_from_a_document_written_before) {
  // Records written since the text moved carry it in the metadata (document
  // null); older ones only as the document. Both read back, in answers of
  // /get and /query alike; the metadata's text wins when both are there.
  const std::string get = R"({"ids":["alice/t1:u","alice/t2:u","alice/t3:u"],)"
                          R"("documents":[null,"old text","stale"],"metadatas":[)"
                          R"({"role":"user","ts":1,"user":"alice","turn":"t1","text":"new text"},)"
                          R"({"role":"user","ts":2,"user":"alice","turn":"t2"},)"
                          R"({"role":"user","ts":3,"user":"alice","turn":"t3","text":"fresh"}]})";
  auto records = chroma_json::ParseGetDocumentsResponse(get, "alice", nullptr);
  BOOST_REQUIRE(records.ok());
  BOOST_REQUIRE_EQUAL(records->size(), 3u);
  BOOST_TEST((*records)[0].content == "new text");
  BOOST_TEST((*records)[1].content == "old text");
  BOOST_TEST((*records)[2].content == "fresh");

  const std::string query = R"({"ids":[["alice/t1:u","alice/t2:u"]],"documents":[[null,"old text"]],)"
                            R"("metadatas":[[{"role":"user","ts":1,"user":"alice","turn":"t1","text":"new text"},)"
                            R"({"role":"user","ts":2,"user":"alice","turn":"t2"}]],"distances":[[0.1,0.2]]})";
  auto recalled = chroma_json::ParseQueryResponse(query, "alice");
  BOOST_REQUIRE(recalled.ok());
  BOOST_REQUIRE_EQUAL(recalled->messages.size(), 2u);
  BOOST_TEST(recalled->messages[0].message.content == "new text");
  BOOST_TEST(recalled->messages[1].message.content == "old text");

  // Neither, or a text that is not a string: a malformed answer.
  for (const char* bad : {R"({"ids":["alice/t1:u"],"documents":[null],"metadatas":[{"role":"user","ts":1,"user":"alice","turn":"t1"}]})",
                          R"({"ids":["alice/t1:u"],"documents":["d"],"metadatas":[{"role":"user","ts":1,"user":"alice","turn":"t1","text":7}]})"}) {
    BOOST_TEST_CONTEXT(bad) {
      auto r = chroma_json::ParseGetDocumentsResponse(bad, "alice", nullptr);
      BOOST_REQUIRE(!r.ok());
      BOOST_TEST(r.status().reason() == "chroma_unavailable");
    }
  }
}

BOOST_AUTO_TEST_CASE(malformed_get_answers_are_errors) {
  const std::string meta = R"("metadatas":[{"role":"user","ts":1,"user":"alice","turn":"a"}])";
  const std::string bodies[] = {
      R"({"ids":["a"],"documents":["d"],)" + meta + "}",                          // no embeddings
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":null})",     // not included
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1,"x"]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1e39]]})",  // beyond float
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[1]})",
      R"({"ids":["a","b"],"documents":["d"],)" + meta + R"(,"embeddings":[[1]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[null]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[{"x":1}]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[[1]]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1.5.2]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[-inf]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1]],"x":1e999})",
  };
  for (const std::string& body : bodies) {
    BOOST_TEST_CONTEXT(body) {
      auto records = chroma_json::ParseGetResponse(body, "alice", true, nullptr, nullptr, nullptr);
      BOOST_REQUIRE(!records.ok());
      BOOST_TEST(records.status().reason() == "chroma_unavailable");
    }
  }
}

BOOST_AUTO_TEST_CASE(count_is_a_bare_integer) {
  auto count = chroma_json::ParseCount("42");
  BOOST_REQUIRE(count.ok());
  BOOST_TEST(*count == 42);
  for (const char* body : {"", "-1", "1.5", "\"3\"", "{}"}) {
    BOOST_TEST_CONTEXT(body) { BOOST_TEST(!chroma_json::ParseCount(body).ok()); }
  }
}

BOOST_AUTO_TEST_CASE(error_answers_map_to_reasons) {
  auto mismatch = chroma_json::ErrorFromResponse(
      400, R"({"error":"InvalidArgumentError","message":"Collection expecting embedding with dimension of 3, got 4"})",
      "upsert");
  BOOST_TEST(mismatch.reason() == "dimension_mismatch");
  BOOST_TEST(static_cast<int>(mismatch.code()) == static_cast<int>(Code::kUnavailable));

  auto other400 = chroma_json::ErrorFromResponse(
      400, R"({"error":"InvalidArgumentError","message":"Expected where to have exactly one operator, secret"})",
      "query");
  BOOST_TEST(other400.reason() == "chroma_rejected");
  BOOST_TEST(static_cast<int>(other400.code()) == static_cast<int>(Code::kInternal));
  BOOST_TEST(other400.message().find("InvalidArgumentError") != std::string::npos);
  BOOST_TEST(other400.message().find("secret") == std::string::npos);  // Chroma's text stays out

  auto server = chroma_json::ErrorFromResponse(500, "<html>oops</html>", "query");
  BOOST_TEST(server.reason() == "chroma_unavailable");
  BOOST_TEST(static_cast<int>(server.code()) == static_cast<int>(Code::kUnavailable));
  BOOST_TEST(server.message().find("oops") == std::string::npos);

  BOOST_TEST(chroma_json::ErrorFromResponse(429, "", "query").reason() == "chroma_unavailable");
  BOOST_TEST(chroma_json::ErrorFromResponse(
                 412, R"({"error":"ChromaError","message":"Missing field: [Missing metadata segment]"})", "query")
                 .reason() == "chroma_unavailable");
}

BOOST_AUTO_TEST_CASE(unreachable_chroma_fails_fast_with_chroma_unreachable) {
  ChromaOptions options;
  options.base_url = "http://127.0.0.1:" + std::to_string(ClosedPort()) + "/";
  ChromaStore store(options);
  auto recall = store.Recall(testing::Uid("alice"), {1.0f, 0.0f}, 5, {});
  BOOST_REQUIRE(!recall.ok());
  BOOST_TEST(recall.status().reason() == "chroma_unreachable");
  BOOST_TEST(static_cast<int>(recall.status().code()) == static_cast<int>(Code::kUnavailable));
  BOOST_TEST(store.Upsert({Record("t1:u", Role::kUser, "x", {1})}).reason() == "chroma_unreachable");
  BOOST_TEST(store.Count(testing::Uid("alice")).status().reason() == "chroma_unreachable");
  BOOST_TEST(store.Heartbeat().reason() == "chroma_unreachable");
  // Nothing to do needs no server.
  BOOST_TEST(store.Upsert({}).ok());
  auto none = store.Recall(testing::Uid("alice"), {1.0f}, 0, {});
  BOOST_REQUIRE(none.ok());
  BOOST_TEST(none->messages.empty());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
