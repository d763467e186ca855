#include <sys/stat.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "chatd/config.h"

using namespace chatd;

namespace {
EnvLookup Env(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}
// A secret file of the given content and mode, removed at scope exit.
class SecretFile {
 public:
  SecretFile(const std::string& content, mode_t mode) {
    char tmpl[] = "/tmp/chatd-config-test-XXXXXX";
    int fd = ::mkstemp(tmpl);
    BOOST_REQUIRE(fd >= 0);
    path_ = tmpl;
    BOOST_REQUIRE(::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
    ::close(fd);
    ::chmod(path_.c_str(), mode);
  }
  ~SecretFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};
}  // namespace

BOOST_AUTO_TEST_SUITE(config)

BOOST_AUTO_TEST_CASE(defaults_match_the_design_card) {
  auto c = LoadConfig(Env({}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->rate_limit == 30);
  BOOST_TEST(c->rate_window_s == 60);
  BOOST_TEST(c->recent_messages == 4);
  BOOST_TEST(c->recall_k == 5);
  BOOST_TEST(c->model == "gpt-4o-mini");
  BOOST_TEST(c->openai_base_url == "https://api.openai.com/v1");
  BOOST_TEST((c->rate_algorithm == RateAlgorithm::kFixed));
  BOOST_TEST((c->rate_failure_mode == FailureMode::kClosed));
}

BOOST_AUTO_TEST_CASE(reads_values_and_strips_trailing_slash_from_urls) {
  auto c = LoadConfig(Env({{"CHATD_THREADS", "3"},
                           {"OPENAI_BASE_URL", "http://127.0.0.1:9999/v1/"},
                           {"CHATD_RATE_ALGORITHM", "sliding"},
                           {"CHATD_RATE_FAILURE_MODE", "open"}}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->threads == 3);
  BOOST_TEST(c->openai_base_url == "http://127.0.0.1:9999/v1");
  BOOST_TEST((c->rate_algorithm == RateAlgorithm::kSliding));
  BOOST_TEST((c->rate_failure_mode == FailureMode::kOpen));
}

BOOST_AUTO_TEST_CASE(redis_cluster_seeds_are_parsed_and_the_counters_follow_them) {
  auto c = LoadConfig(Env({{"CHATD_REDIS_CLUSTER", "10.0.0.1:7000,redis-b:7001,::1:7002"}}));
  BOOST_REQUIRE(c.ok());
  BOOST_REQUIRE_EQUAL(c->redis_cluster.size(), 3u);
  BOOST_TEST(c->redis_cluster[0].host == "10.0.0.1");
  BOOST_TEST(c->redis_cluster[0].port == 7000);
  BOOST_TEST(c->redis_cluster[1].host == "redis-b");
  BOOST_TEST(c->redis_cluster[2].host == "::1");
  BOOST_TEST(c->redis_cluster[2].port == 7002);
  BOOST_TEST((c->rate_redis_cluster == c->redis_cluster));

  // A counters' Redis of its own keeps the counters off the cluster.
  auto own = LoadConfig(Env({{"CHATD_REDIS_CLUSTER", "10.0.0.1:7000"}, {"CHATD_RATE_REDIS_HOST", "10.0.0.9"}}));
  BOOST_REQUIRE(own.ok());
  BOOST_TEST(own->rate_redis_cluster.empty());
  auto rate = LoadConfig(Env({{"CHATD_RATE_REDIS_CLUSTER", "10.0.0.5:7000"}}));
  BOOST_REQUIRE(rate.ok());
  BOOST_TEST(rate->redis_cluster.empty());
  BOOST_REQUIRE_EQUAL(rate->rate_redis_cluster.size(), 1u);
  auto both = LoadConfig(Env({{"CHATD_RATE_REDIS_CLUSTER", "10.0.0.5:7000"}, {"CHATD_RATE_REDIS_PORT", "6380"}}));
  BOOST_REQUIRE(!both.ok());
  BOOST_TEST(both.status().message().find("CHATD_RATE_REDIS_CLUSTER") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_redis_cluster_seeds_name_the_variable) {
  for (const char* bad : {"", "host", "host:", ":7000", "host:0", "host:70000", "host:7000,", "host:7x"}) {
    auto c = LoadConfig(Env({{"CHATD_REDIS_CLUSTER", bad}}));
    BOOST_REQUIRE(!c.ok());
    BOOST_TEST(c.status().message().find("CHATD_REDIS_CLUSTER") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(bad_number_names_the_variable) {
  for (const char* bad : {"", "abc", "12x", "0", "-4", "99999999999999999999"}) {
    auto c = LoadConfig(Env({{"CHATD_THREADS", bad}}));
    BOOST_REQUIRE(!c.ok());
    BOOST_TEST(c.status().message().find("CHATD_THREADS") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(bad_enum_lists_the_choices) {
  auto c = LoadConfig(Env({{"CHATD_RATE_ALGORITHM", "leaky"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("fixed, sliding") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_url_is_refused) {
  auto c = LoadConfig(Env({{"CHATD_CHROMA_URL", "localhost:8000"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("CHATD_CHROMA_URL") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(odd_recent_size_is_refused_because_turns_come_in_pairs) {
  auto c = LoadConfig(Env({{"CHATD_RECENT_MESSAGES", "5"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("CHATD_RECENT_MESSAGES") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(message_limit_cannot_exceed_body_limit) {
  auto c = LoadConfig(Env({{"CHATD_MAX_BODY_BYTES", "1000"}, {"CHATD_MAX_MESSAGE_BYTES", "2000"}}));
  BOOST_REQUIRE(!c.ok());
}

BOOST_AUTO_TEST_CASE(one_user_cannot_occupy_the_pool_the_cap_defaults_to_4_and_is_validated) {
  auto c = LoadConfig(Env({}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->max_concurrent_per_user == 4);
  auto off = LoadConfig(Env({{"CHATD_MAX_CONCURRENT_PER_USER", "0"}}));
  BOOST_REQUIRE(off.ok());
  BOOST_TEST(off->max_concurrent_per_user == 0);
  for (const char* bad : {"-1", "x", "100001"}) {
    auto b = LoadConfig(Env({{"CHATD_MAX_CONCURRENT_PER_USER", bad}}));
    BOOST_REQUIRE(!b.ok());
    BOOST_TEST(b.status().message().find("CHATD_MAX_CONCURRENT_PER_USER") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(redis_without_credentials_reads_the_password_from_a_file_only) {
  SecretFile secret("s3cret pass\n", 0600);
  auto c = LoadConfig(Env({{"CHATD_REDIS_USERNAME", "chatd"}, {"CHATD_REDIS_PASSWORD_FILE", secret.path()}}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->redis_username == "chatd");
  BOOST_TEST(c->redis_password == "s3cret pass");  // the trailing newline is not part of it
  // The counters' Redis takes the same credentials unless told otherwise.
  BOOST_TEST(*c->rate_redis_username == "chatd");
  BOOST_TEST(*c->rate_redis_password == "s3cret pass");
}

BOOST_AUTO_TEST_CASE(redis_secret_file_errors_name_the_variable_never_the_secret) {
  SecretFile world_readable("hunter2", 0644);
  auto open = LoadConfig(Env({{"CHATD_REDIS_PASSWORD_FILE", world_readable.path()}}));
  BOOST_REQUIRE(!open.ok());
  BOOST_TEST(open.status().message().find("CHATD_REDIS_PASSWORD_FILE") != std::string::npos);
  BOOST_TEST(open.status().message().find("hunter2") == std::string::npos);

  SecretFile two_lines("hunter2\nx\n", 0600);
  auto bad = LoadConfig(Env({{"CHATD_RATE_REDIS_PASSWORD_FILE", two_lines.path()}}));
  BOOST_REQUIRE(!bad.ok());
  BOOST_TEST(bad.status().message().find("CHATD_RATE_REDIS_PASSWORD_FILE") != std::string::npos);
  BOOST_TEST(bad.status().message().find("hunter2") == std::string::npos);

  auto missing = LoadConfig(Env({{"CHATD_REDIS_PASSWORD_FILE", "/nonexistent/chatd-secret"}}));
  BOOST_REQUIRE(!missing.ok());
  BOOST_TEST(missing.status().message().find("CHATD_REDIS_PASSWORD_FILE") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(redis_acl_user_without_a_password_is_refused) {
  auto c = LoadConfig(Env({{"CHATD_REDIS_USERNAME", "chatd"}}));
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.status().message().find("CHATD_REDIS_PASSWORD_FILE") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(chroma_without_credentials_takes_a_token_file_a_tenant_and_a_database) {
  auto d = LoadConfig(Env({}));
  BOOST_REQUIRE(d.ok());
  BOOST_TEST(d->chroma_tenant == "default_tenant");
  BOOST_TEST(d->chroma_database == "default_database");
  BOOST_TEST(d->chroma_token.empty());
  SecretFile token("tok-123\n", 0640);
  auto c = LoadConfig(Env({{"CHATD_CHROMA_TOKEN_FILE", token.path()},
                           {"CHATD_CHROMA_TOKEN_HEADER", "X-Chroma-Token"},
                           {"CHATD_CHROMA_TENANT", "acme"},
                           {"CHATD_CHROMA_DATABASE", "chat_prod"}}));
  BOOST_REQUIRE(c.ok());
  BOOST_TEST(c->chroma_token == "tok-123");
  BOOST_TEST(c->chroma_token_header == "X-Chroma-Token");
  BOOST_TEST(c->chroma_tenant == "acme");
  BOOST_TEST(c->chroma_database == "chat_prod");
  // They become URL path segments.
  for (const char* bad : {"a/b", "..", "", "x?y"}) {
    auto b = LoadConfig(Env({{"CHATD_CHROMA_DATABASE", bad}}));
    BOOST_REQUIRE(!b.ok());
    BOOST_TEST(b.status().message().find("CHATD_CHROMA_DATABASE") != std::string::npos);
  }
}

BOOST_AUTO_TEST_SUITE_END()
