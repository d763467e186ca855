#include "chatd/embeddings.h"

#include <boost/test/unit_test.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "openai_embedder.h"
#include "local_embedder.h"

namespace chatd {
namespace {

double Norm(const std::vector<float>& v) {
  double sum = 0;
  for (float x : v) sum += static_cast<double>(x) * x;
  return std::sqrt(sum);
}

// Cosine similarity of two unit vectors.
double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

void CheckGolden(const std::string& text, const std::vector<double>& expected) {
  const std::vector<float> v = LocalEmbed(text, expected.size());
  BOOST_REQUIRE_EQUAL(v.size(), expected.size());
  for (size_t i = 0; i < v.size(); ++i) {
    BOOST_TEST_CONTEXT("text '" << text << "' component " << i) {
      BOOST_TEST(std::fabs(v[i] - expected[i]) < 1e-6);
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_SUITE(embeddings)

BOOST_AUTO_TEST_CASE(local_embed_has_unit_length) {
  const char* texts[] = {"hello", "The quick brown fox jumps over the lazy dog.", "a", "\xc3\xbcn\xc3\xaf" "c 123"};
  for (const char* text : texts) {
    for (size_t d : {8u, 64u, 256u, 1536u}) {
      const std::vector<float> v = LocalEmbed(text, d);
      BOOST_REQUIRE_EQUAL(v.size(), d);
      BOOST_TEST(std::fabs(Norm(v) - 1.0) < 1e-5);
    }
  }
}

BOOST_AUTO_TEST_CASE(local_embed_is_deterministic) {
  const std::string text = "Remember that my sister lives in Lisbon.";
  BOOST_TEST(LocalEmbed(text, 256) == LocalEmbed(text, 256));
  LocalEmbedder embedder(256);
  auto batch = embedder.Embed({text, "other"});
  BOOST_REQUIRE(batch.ok());
  BOOST_REQUIRE_EQUAL(batch->size(), 2u);
  BOOST_TEST((*batch)[0] == LocalEmbed(text, 256));
  BOOST_TEST(embedder.dimensions() == 256u);
}

BOOST_AUTO_TEST_CASE(no_tokens_gives_the_first_unit_vector) {
  for (const char* text : {"", "   ", "?!., -- ;;", "\t\n"}) {
    const std::vector<float> v = LocalEmbed(text, 16);
    BOOST_REQUIRE_EQUAL(v.size(), 16u);
    BOOST_TEST(v[0] == 1.0f);
    for (size_t i = 1; i < v.size(); ++i) BOOST_TEST(v[i] == 0.0f);
  }
}

BOOST_AUTO_TEST_CASE(ascii_case_and_punctuation_do_not_matter) {
  BOOST_TEST(LocalEmbed("Hello, WORLD!", 128) == LocalEmbed("hello world", 128));
  // Only ASCII is folded: non-ASCII bytes are taken as they are.
  BOOST_TEST(LocalEmbed("ÉCOLE", 128) != LocalEmbed("école", 128));
}

BOOST_AUTO_TEST_CASE(similar_texts_are_closer_than_unrelated_ones) {
  const auto question = LocalEmbed("What is my favourite colour?", 256);
  const auto related = LocalEmbed("My favourite colour is dark green.", 256);
  const auto unrelated = LocalEmbed("The train to Porto leaves at nine tomorrow.", 256);
  BOOST_TEST(Dot(question, related) > Dot(question, unrelated));
  const auto typo = LocalEmbed("My favorite colours are green", 256);
  BOOST_TEST(Dot(related, typo) > Dot(related, unrelated));
}

// Expected values come from an independent Python implementation of the
// algorithm in embeddings.h (the fake model server implements it too).
BOOST_AUTO_TEST_CASE(golden_values) {
  CheckGolden("Hello, World!", {0.288675129, -0.288675129, 0, 0, -0.288675129, 0, -0.288675129, 0.577350259,
                                0, -0.288675129, 0, 0.288675129, -0.288675129, 0.288675129, 0, 0});
  CheckGolden("x", {0, 0, 0, 0, 0.89442718, 0, -0.44721359, 0});
  CheckGolden("Caf\xc3\xa9 na\xc3\xafve 42",
              {-0.333333343, 0, 0, 0, 0, 0.333333343, 0.333333343, 0, 0, 0, 0, 0, 0.333333343, 0, 0.333333343,
               -0.333333343, 0, 0, 0, 0, -0.333333343, 0, 0.333333343, 0, 0, 0, 0, -0.333333343, 0, 0, 0, 0});
  CheckGolden("Mixed CASE words, MIXED case Words; 2024-05!",
              {-0.571428597, 0.0714285746, 0, 0.428571433, 0, 0, 0.142857149, 0.142857149, -0.285714298, 0, 0,
               0, -0.285714298, 0.285714298, -0.0714285746, 0.142857149, 0, 0.0714285746, 0, 0.285714298,
               -0.142857149, 0, -0.214285716, -0.142857149});
  const auto cat = LocalEmbed("The cat sat on the mat.", 256);
  BOOST_TEST(std::fabs(cat[13] - 0.256073773) < 1e-6);
  BOOST_TEST(std::fabs(cat[27] - 0.38411063) < 1e-6);
  BOOST_TEST(std::fabs(cat[87] - -0.512147546) < 1e-6);
  BOOST_TEST(cat[100] == 0.0f);
}

BOOST_AUTO_TEST_CASE(embeddings_request_is_escaped_json) {
  auto body = BuildEmbeddingsRequest("m", {"a \"quote\"", "line\nbreak"}, 8);
  BOOST_REQUIRE(body.ok());
  BOOST_TEST(*body == R"({"model":"m","input":["a \"quote\"","line\nbreak"],"dimensions":8})");
  auto bad = BuildEmbeddingsRequest("m", {"\xff\xfe"}, 8);
  BOOST_REQUIRE(!bad.ok());
  BOOST_TEST(bad.status().reason() == "invalid_utf8");
}

BOOST_AUTO_TEST_CASE(embeddings_response_is_ordered_by_index_and_normalised) {
  const std::string body = R"({"object":"list","data":[
      {"object":"embedding","index":1,"embedding":[0,3,4]},
      {"object":"embedding","index":0,"embedding":[2,0,0]}],
      "model":"m","usage":{"prompt_tokens":2,"total_tokens":2}})";
  auto vectors = ParseEmbeddingsResponse(body, 2, 3);
  BOOST_REQUIRE(vectors.ok());
  BOOST_REQUIRE_EQUAL(vectors->size(), 2u);
  BOOST_TEST((*vectors)[0] == std::vector<float>({1, 0, 0}));
  BOOST_TEST(std::fabs((*vectors)[1][1] - 0.6f) < 1e-7);
  BOOST_TEST(std::fabs((*vectors)[1][2] - 0.8f) < 1e-7);
}

BOOST_AUTO_TEST_CASE(embeddings_response_rejects_bad_shapes) {
  struct Case {
    const char* body;
    const char* reason;
  };
  const Case cases[] = {
      {"not json", "embedder_unavailable"},
      {"[]", "embedder_unavailable"},
      {R"({"data":{}})", "embedder_unavailable"},
      {R"({"data":[]})", "embedder_unavailable"},                                       // too few
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":0,"embedding":[1,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":"0","embedding":[1,0]},{"index":1,"embedding":[1,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":2,"embedding":[1,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":"AAAA"}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":[1,null]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":[1e39,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":[1e999,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":[0,0]}]})", "embedder_unavailable"},
      {R"({"data":[{"index":0,"embedding":[1,0]},{"index":1,"embedding":[1,0,0]}]})", "dimension_mismatch"},
      {R"({"data":[{"index":0,"embedding":[1,0]},1]})", "embedder_unavailable"},
  };
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT(c.body) {
      auto result = ParseEmbeddingsResponse(c.body, 2, 2);
      BOOST_REQUIRE(!result.ok());
      BOOST_TEST(result.status().reason() == c.reason);
      BOOST_TEST(static_cast<int>(result.status().code()) == static_cast<int>(Code::kUnavailable));
      // The upstream body never becomes part of the message.
      BOOST_TEST(result.status().message().find(c.body) == std::string::npos);
    }
  }
}

BOOST_AUTO_TEST_CASE(openai_embedder_unreachable_is_unavailable) {
  OpenAIEmbedderOptions options;
  options.base_url = "http://127.0.0.1:1/v1";  // port 1: nothing listens there
  options.dimensions = 8;
  options.timeout_ms = 2000;
  OpenAIEmbedder embedder(options);
  BOOST_TEST(embedder.dimensions() == 8u);
  auto result = embedder.Embed({"hello"});
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(result.status().reason() == "embedder_unavailable");
  auto empty = embedder.Embed({});
  BOOST_REQUIRE(empty.ok());
  BOOST_TEST(empty->empty());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
