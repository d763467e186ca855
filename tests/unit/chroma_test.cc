#include "chatd/chroma.h"
#include "chroma_json.h"
#include "uid.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>
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
  BOOST_TEST(chroma_json::CreateCollectionRequest("chatd-s16-3", 100) ==
             R"({"name":"chatd-s16-3","get_or_create":true,)"
             R"("configuration":{"hnsw":{"space":"l2","sync_threshold":100}}})");
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

BOOST_AUTO_TEST_CASE(upsert_request_carries_ids_vectors_documents_and_metadata) {
  auto body = chroma_json::UpsertRequest({Record("t1:u", Role::kUser, "hi \"there\"", {0.1f, -0.5f}),
                                          Record("t1:a", Role::kAssistant, "caf\xc3\xa9", {1.0f, 0.0f})});
  BOOST_REQUIRE(body.ok());
  BOOST_TEST(*body ==
             R"({"ids":["alice/t1:u","alice/t1:a"],"embeddings":[[0.1,-0.5],[1,0]],"documents":["hi \"there\"","café"],)"
             R"("metadatas":[{"role":"user","ts":1700000000123,"user":"alice","turn":"t1"},)"
             R"({"role":"assistant","ts":1700000000123,"user":"alice","turn":"t1"}]})");
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

BOOST_AUTO_TEST_CASE(malformed_get_answers_are_errors) {
  const std::string meta = R"("metadatas":[{"role":"user","ts":1,"user":"alice","turn":"a"}])";
  const std::string bodies[] = {
      R"({"ids":["a"],"documents":["d"],)" + meta + "}",                          // no embeddings
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":null})",     // not included
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1,"x"]]})",
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[[1e39]]})",  // beyond float
      R"({"ids":["a"],"documents":["d"],)" + meta + R"(,"embeddings":[1]})",
      R"({"ids":["a","b"],"documents":["d"],)" + meta + R"(,"embeddings":[[1]]})",
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
