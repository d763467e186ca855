#include <boost/test/unit_test.hpp>

#include "chatd/http_api.h"
#include "redis_memory.h"
#include "chatd/user_data.h"
#include "fakes.h"

using namespace chatd;
using namespace chatd::testing;

namespace {

class FakeUserData : public UserDataStore {
 public:
  Result<int64_t> RestoreIfArchived(const UserId& user) override {
    restored_for.push_back(user.str());
    return restore_status.ok() ? Result<int64_t>(int64_t{0}) : Result<int64_t>(restore_status);
  }
  Result<HistoryPage> History(const UserId& user, int limit, const std::optional<HistoryCursor>& before) override {
    history_user = user.str();
    history_limit = limit;
    history_before = before;
    HistoryPage page;
    page.messages.push_back({Role::kUser, "hi \"there\"", 1795879061480, "t1"});
    page.next = FormatCursor({TurnIndexMember(1795879061480, "t1"), Role::kUser});
    return page;
  }
  Status Export(const UserId& user, int64_t, const std::function<bool(std::string_view)>& write) override {
    exported_for = user.str();
    write("{\"messages\":[");
    write("]}");
    return Status::Ok();
  }
  Result<int64_t> Erase(const UserId& user) override {
    erased.push_back(user.str());
    return erased.size() == 1 ? 12 : 0;
  }
  std::vector<std::string> restored_for, erased;
  std::string history_user, exported_for;
  int history_limit = 0;
  std::optional<HistoryCursor> history_before;
  Status restore_status;
};

// Speaks as the configured subject, like a valid user token.
class FakeAuth : public Authenticator {
 public:
  Result<Principal> Authenticate(const HttpRequest& req) override {
    if (req.authorization.empty()) return Status(Code::kUnauthorized, "missing_token", "no token");
    Principal p;
    p.subject = UserId::Parse(req.authorization).value();
    return p;
  }
};

struct DataFixture : ChatServiceFakes {
  FakeLimiter data_limiter;
  FakeUserData data;
  RequestContext log;

  HttpReply Send(HttpApi& api, std::string method, std::string path, std::string query, std::string auth = "") {
    HttpRequest req;
    req.method = std::move(method);
    req.path = std::move(path);
    req.query = std::move(query);
    req.authorization = std::move(auth);
    HttpReply r = api.Handle(req, log);
    if (r.stream) {
      r.stream([&r](std::string_view piece) {
        r.body.append(piece);
        return true;
      });
    }
    return r;
  }
  HttpReply Send(std::string method, std::string path, std::string query) {
    HttpApi api{config, service, nullptr, nullptr, nullptr};
    api.EnableUserData(&data, &data_limiter);
    return Send(api, std::move(method), std::move(path), std::move(query));
  }
  static std::string Header(const HttpReply& r, const std::string& name) {
    for (const auto& [k, v] : r.headers) {
      if (k == name) return v;
    }
    return "<none>";
  }
};

bool Has(const std::string& body, const std::string& part) { return body.find(part) != std::string::npos; }

}  // namespace

BOOST_AUTO_TEST_SUITE(user_data)

BOOST_AUTO_TEST_CASE(turn_index_members_sort_by_time_as_strings) {
  BOOST_TEST(TurnIndexMember(1795879061480, "ab") == "001795879061480:ab");
  BOOST_TEST(TurnIndexMember(999, "z") < TurnIndexMember(1000, "a"));
}

BOOST_AUTO_TEST_CASE(message_ids_name_the_turn_and_its_half_and_split_back) {
  BOOST_TEST(MessageId("9f1e0a", Role::kUser) == "9f1e0a:u");
  BOOST_TEST(MessageId("9f1e0a", Role::kAssistant) == "9f1e0a:a");
  for (Role role : {Role::kUser, Role::kAssistant}) {
    const std::string id = MessageId("t-1", role);
    auto parts = SplitMessageId(id);
    BOOST_REQUIRE(parts.has_value());
    BOOST_TEST(parts->turn == "t-1");
    BOOST_TEST((parts->role == role));
  }
  for (const char* bad : {"", ":u", "t", "t:x", "t:U", "tu"}) BOOST_TEST(!SplitMessageId(bad).has_value(), bad);
}

BOOST_AUTO_TEST_CASE(cursors_round_trip_and_nothing_else_parses) {
  HistoryCursor c{TurnIndexMember(1795879061480, "9f1e0a"), Role::kAssistant};
  auto parsed = ParseCursor(FormatCursor(c));
  BOOST_REQUIRE(parsed.has_value());
  BOOST_TEST(parsed->member == c.member);
  BOOST_TEST((parsed->role == Role::kAssistant));
  for (const char* bad : {"", "x", "001795879061480:9f1e0a", "001795879061480:9f1e0a:x", "01795879061480:9f:u",
                          "00179587906148a:9f:u", "001795879061480::u", "001795879061480:9f 1:u",
                          "001795879061480:9f/1:a"}) {
    BOOST_TEST(!ParseCursor(bad).has_value(), bad);
  }
  BOOST_TEST(!ParseCursor("001795879061480:" + std::string(65, 'a') + ":u").has_value());
}

BOOST_AUTO_TEST_CASE(query_parameters_are_decoded_and_repeats_refused) {
  auto v = QueryParam("a=1&userId=al%40ice+x&b", "userId");
  BOOST_REQUIRE(v.ok());
  BOOST_TEST(**v == "al@ice x");
  auto none = QueryParam("a=1", "userId");
  BOOST_REQUIRE(none.ok());
  BOOST_TEST(!none->has_value());
  BOOST_TEST(QueryParam("userId=a&userId=b", "userId").status().reason() == "invalid_query");
  BOOST_TEST(QueryParam("userId=%4", "userId").status().reason() == "invalid_query");
  BOOST_TEST(QueryParam("userId=%zz", "userId").status().reason() == "invalid_query");
  auto empty = QueryParam("userId=", "userId");
  BOOST_REQUIRE(empty.ok());
  BOOST_TEST(**empty == "");
}

BOOST_FIXTURE_TEST_CASE(history_pages_are_json_with_a_cursor, DataFixture) {
  HttpReply r = Send("GET", "/api/history", "userId=alice&limit=7");
  BOOST_TEST(r.status == 200);
  BOOST_TEST(data.history_user == "alice");
  BOOST_TEST(data.history_limit == 7);
  BOOST_TEST(data.restored_for == std::vector<std::string>{"alice"});
  BOOST_TEST(Has(r.body, R"({"messages":[{"role":"user","content":"hi \"there\"","at":"2026-11-28T)"));
  BOOST_TEST(Has(r.body, R"("turnId":"t1"}],"next":"001795879061480:t1:u"})"));
  BOOST_TEST(data_limiter.calls == 1);
  BOOST_TEST(limiter.calls == 0);  // the chat's quota is untouched
}

BOOST_FIXTURE_TEST_CASE(history_defaults_and_cursor_reach_the_store, DataFixture) {
  BOOST_TEST(Send("GET", "/api/history", "userId=alice").status == 200);
  BOOST_TEST(data.history_limit == kHistoryDefaultLimit);
  BOOST_TEST(!data.history_before.has_value());
  BOOST_TEST(Send("GET", "/api/history", "userId=alice&before=001795879061480:t1:a").status == 200);
  BOOST_REQUIRE(data.history_before.has_value());
  BOOST_TEST(data.history_before->member == "001795879061480:t1");
}

BOOST_FIXTURE_TEST_CASE(bad_data_requests_get_json_errors, DataFixture) {
  struct Case {
    const char* method;
    const char* path;
    const char* query;
    int status;
    const char* code;
  };
  for (const Case& c : std::vector<Case>{
           {"GET", "/api/history", "", 400, "missing_field"},
           {"GET", "/api/history", "userId=a%7Bb", 400, "invalid_user_id"},
           {"GET", "/api/history", "userId=a&limit=0", 400, "invalid_limit"},
           {"GET", "/api/history", "userId=a&limit=201", 400, "invalid_limit"},
           {"GET", "/api/history", "userId=a&limit=-1", 400, "invalid_limit"},
           {"GET", "/api/history", "userId=a&before=zzz", 400, "invalid_cursor"},
           {"GET", "/api/history", "userId=a&userId=b", 400, "invalid_query"},
           {"POST", "/api/history", "userId=a", 405, "method_not_allowed"},
           {"GET", "/api/memory", "userId=a", 405, "method_not_allowed"},
           {"DELETE", "/api/export", "userId=a", 405, "method_not_allowed"},
       }) {
    HttpReply r = Send(c.method, c.path, c.query);
    BOOST_TEST(r.status == c.status, c.path << "?" << c.query);
    BOOST_TEST(Has(r.body, std::string("\"code\":\"") + c.code + "\""), r.body);
  }
  BOOST_TEST(data.erased.empty());
}

BOOST_FIXTURE_TEST_CASE(delete_answers_the_count_and_is_idempotent, DataFixture) {
  HttpReply r = Send("DELETE", "/api/memory", "userId=alice");
  BOOST_TEST(r.status == 200);
  BOOST_TEST(r.body == R"({"deleted":{"messages":12}})");
  BOOST_TEST(Send("DELETE", "/api/memory", "userId=alice").body == R"({"deleted":{"messages":0}})");
  BOOST_TEST(data.restored_for.empty());  // nothing to bring back before an erase
}

BOOST_FIXTURE_TEST_CASE(export_is_a_streamed_attachment, DataFixture) {
  HttpReply r = Send("GET", "/api/export", "userId=alice");
  BOOST_TEST(r.status == 200);
  BOOST_TEST(Header(r, "Content-Disposition").rfind("attachment", 0) == 0);
  BOOST_TEST(Header(r, "X-Accel-Buffering") == "no");
  BOOST_TEST(r.body == R"({"messages":[]})");
  BOOST_TEST(data.exported_for == "alice");
}

BOOST_FIXTURE_TEST_CASE(the_data_limit_refuses_with_retry_after, DataFixture) {
  data_limiter.allowed = false;
  HttpReply r = Send("GET", "/api/history", "userId=alice");
  BOOST_TEST(r.status == 429);
  BOOST_TEST(Header(r, "Retry-After") == "2");
  BOOST_TEST(Has(r.body, R"("code":"rate_limited","retryAfter":2})"));
  BOOST_TEST(data.history_user.empty());
}

BOOST_FIXTURE_TEST_CASE(a_failed_restore_is_a_503_not_a_partial_history, DataFixture) {
  data.restore_status = Unavailable("chroma_unavailable", "down");
  HttpReply r = Send("GET", "/api/history", "userId=alice");
  BOOST_TEST(r.status == 503);
  BOOST_TEST(Has(r.body, R"("code":"restore_failed")"));
  BOOST_TEST(data.history_user.empty());
}

BOOST_FIXTURE_TEST_CASE(a_user_token_acts_for_its_subject_only, DataFixture) {
  FakeAuth auth;
  HttpApi api{config, service, &auth, nullptr, nullptr};
  api.EnableUserData(&data, &data_limiter);
  HttpReply r = Send(api, "DELETE", "/api/memory", "userId=bob", "alice");
  BOOST_TEST(r.status == 403);
  BOOST_TEST(Has(r.body, R"("code":"user_mismatch")"));
  BOOST_TEST(data.erased.empty());
  BOOST_TEST(Send(api, "DELETE", "/api/memory", "", "alice").status == 200);
  BOOST_TEST(data.erased == std::vector<std::string>{"alice"});
  BOOST_TEST(Send(api, "GET", "/api/history", "userId=alice", "alice").status == 200);
  HttpReply none = Send(api, "GET", "/api/history", "userId=alice");
  BOOST_TEST(none.status == 401);
  BOOST_TEST(Header(none, "WWW-Authenticate") == "Bearer");
}

BOOST_FIXTURE_TEST_CASE(without_user_data_the_paths_do_not_exist, DataFixture) {
  HttpApi api{config, service, nullptr, nullptr, nullptr};
  BOOST_TEST(Send(api, "GET", "/api/history", "userId=alice").status == 404);
}

BOOST_AUTO_TEST_SUITE_END()
