// RedisClient against a scripted in-process RESP server (FakeRedis), so the
// transport behaviour (reuse, drop after errors, timeouts, NOSCRIPT fallback,
// pipelining) is tested without a real Redis.
#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/test/unit_test.hpp>
#include <condition_variable>
#include <csignal>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "chatd/indexer.h"
#include "chatd/redis.h"
#include "redis_cluster.h"
#include "redis_idempotency.h"
#include "redis_memory.h"
#include "redis_rate_limiter.h"
#include "chatd/redis_schema.h"
#include "fakes.h"
#include "uid.h"

namespace chatd {
namespace {

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(Fd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = other.fd_;
      other.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

struct ReaderDeleter {
  void operator()(redisReader* r) const { redisReaderFree(r); }
};
using ReaderPtr = std::unique_ptr<redisReader, ReaderDeleter>;

struct ReplyDeleter {
  void operator()(void* r) const { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<void, ReplyDeleter>;

// A TCP socket on a loopback port chosen by the kernel.
Fd BoundLoopbackSocket(bool listening, int* port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  BOOST_REQUIRE(fd.get() >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  BOOST_REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  if (listening) BOOST_REQUIRE(::listen(fd.get(), 64) == 0);
  socklen_t len = sizeof(addr);
  BOOST_REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  *port = ntohs(addr.sin_port);
  return fd;
}

// What the fake server does with one command.
struct FakeReply {
  enum class Kind { kSend, kSilence, kHangUp };
  Kind kind = Kind::kSend;
  std::string bytes;  // raw RESP, for kSend

  static FakeReply Send(std::string resp) { return {Kind::kSend, std::move(resp)}; }
  static FakeReply Silence() { return {Kind::kSilence, ""}; }
  static FakeReply HangUp() { return {Kind::kHangUp, ""}; }
};

// A single-threaded RESP server on a loopback port. The handler runs on the
// server thread and sees every command (parsed with hiredis's own reader,
// since a request is a RESP array of bulk strings).
class FakeRedis {
 public:
  using Handler = std::function<FakeReply(const std::vector<std::string>&)>;

  explicit FakeRedis(Handler handler) : handler_(std::move(handler)) {
    // The server writes to sockets the client may have closed.
    std::signal(SIGPIPE, SIG_IGN);
    listen_ = BoundLoopbackSocket(true, &port_);
    int pipe_fds[2];
    BOOST_REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
    wake_read_ = Fd(pipe_fds[0]);
    wake_write_ = Fd(pipe_fds[1]);
    thread_ = std::thread([this] { Run(); });
  }

  ~FakeRedis() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    Wake();
    thread_.join();
  }

  int port() const { return port_; }

  int accepted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return accepted_;
  }

  std::vector<std::vector<std::string>> commands() const {
    std::lock_guard<std::mutex> lock(mu_);
    return commands_;
  }

  // Closes every accepted connection and returns once that is done, as
  // Redis does on a restart or CLIENT KILL.
  void HangUpAll() {
    std::unique_lock<std::mutex> lock(mu_);
    hang_up_requested_ = true;
    lock.unlock();
    Wake();
    lock.lock();
    done_.wait(lock, [this] { return !hang_up_requested_; });
  }

 private:
  struct Conn {
    Fd fd;
    ReaderPtr reader;
  };

  void Wake() {
    const char b = 1;
    BOOST_REQUIRE(::write(wake_write_.get(), &b, 1) == 1);
  }

  static bool WriteAll(int fd, const std::string& bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }

  // False when the connection must be closed.
  bool Serve(Conn& conn) {
    char buf[16384];
    ssize_t n = ::read(conn.fd.get(), buf, sizeof(buf));
    if (n <= 0) return false;
    if (redisReaderFeed(conn.reader.get(), buf, static_cast<size_t>(n)) != REDIS_OK) return false;
    for (;;) {
      void* raw = nullptr;
      if (redisReaderGetReply(conn.reader.get(), &raw) != REDIS_OK) return false;
      ReplyPtr request(raw);
      if (!request) return true;  // need more bytes
      const redisReply* r = static_cast<const redisReply*>(request.get());
      if (r->type != REDIS_REPLY_ARRAY) return false;
      std::vector<std::string> argv;
      for (size_t i = 0; i < r->elements; ++i) argv.emplace_back(r->element[i]->str, r->element[i]->len);
      {
        std::lock_guard<std::mutex> lock(mu_);
        commands_.push_back(argv);
      }
      FakeReply reply = handler_(argv);
      if (reply.kind == FakeReply::Kind::kHangUp) return false;
      if (reply.kind == FakeReply::Kind::kSend && !WriteAll(conn.fd.get(), reply.bytes)) return false;
    }
  }

  void Run() {
    std::vector<Conn> conns;
    for (;;) {
      std::vector<pollfd> fds(2 + conns.size());
      fds[0] = {wake_read_.get(), POLLIN, 0};
      fds[1] = {listen_.get(), POLLIN, 0};
      for (size_t i = 0; i < conns.size(); ++i) fds[2 + i] = {conns[i].fd.get(), POLLIN, 0};
      if (::poll(fds.data(), fds.size(), -1) < 0) continue;
      if (fds[0].revents != 0) {
        char b[64];
        (void)!::read(wake_read_.get(), b, sizeof(b));
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
        if (hang_up_requested_) {
          conns.clear();
          hang_up_requested_ = false;
          done_.notify_all();
          continue;  // the pollfds refer to closed connections
        }
      }
      std::vector<Conn> alive;
      for (size_t i = 0; i < conns.size(); ++i) {
        if (fds[2 + i].revents == 0 || Serve(conns[i])) alive.push_back(std::move(conns[i]));
      }
      conns = std::move(alive);
      if (fds[1].revents != 0) {
        Fd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (fd.get() >= 0) {
          conns.push_back(Conn{std::move(fd), ReaderPtr(redisReaderCreate())});
          std::lock_guard<std::mutex> lock(mu_);
          ++accepted_;
        }
      }
    }
  }

  Handler handler_;
  Fd listen_;
  Fd wake_read_;
  Fd wake_write_;
  int port_ = 0;
  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable done_;
  bool stop_ = false;               // guarded by mu_
  bool hang_up_requested_ = false;  // guarded by mu_
  int accepted_ = 0;                // guarded by mu_
  std::vector<std::vector<std::string>> commands_;  // guarded by mu_
};

std::string Bulk(const std::string& s) { return "$" + std::to_string(s.size()) + "\r\n" + s + "\r\n"; }

// A tiny Redis: PING, ECHO, INCR (one counter), ERRME (an error reply),
// SLEEP (never answers), DIE (closes the connection).
FakeRedis::Handler BasicHandler(std::shared_ptr<std::atomic<int64_t>> counter) {
  return [counter](const std::vector<std::string>& argv) {
    const std::string& cmd = argv[0];
    if (cmd == "PING") return FakeReply::Send("+PONG\r\n");
    if (cmd == "ECHO" && argv.size() == 2) return FakeReply::Send(Bulk(argv[1]));
    if (cmd == "INCR") return FakeReply::Send(":" + std::to_string(++*counter) + "\r\n");
    if (cmd == "ERRME") return FakeReply::Send("-ERR boom\r\n");
    if (cmd == "SLEEP") return FakeReply::Silence();
    if (cmd == "DIE") return FakeReply::HangUp();
    return FakeReply::Send("-ERR unknown command\r\n");
  };
}

RedisOptions OptionsFor(int port, int64_t timeout_ms = 2000) {
  RedisOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.timeout_ms = timeout_ms;
  return o;
}

// Reads one reply the way every RedisClient connection does.
RedisValue Parse(const std::string& resp) {
  ReaderPtr reader(redisReaderCreateWithFunctions(RedisReplyFunctions()));
  BOOST_REQUIRE(reader);
  BOOST_REQUIRE(redisReaderFeed(reader.get(), resp.data(), resp.size()) == REDIS_OK);
  void* raw = nullptr;
  BOOST_REQUIRE(redisReaderGetReply(reader.get(), &raw) == REDIS_OK);
  std::unique_ptr<RedisValue> reply(static_cast<RedisValue*>(raw));
  BOOST_REQUIRE(reply);
  return std::move(*reply);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(redis)

BOOST_AUTO_TEST_CASE(script_sha1_is_the_one_redis_computes) {
  // Redis answers SCRIPT LOAD "return 1" with this digest.
  BOOST_TEST(RedisScript("return 1").sha1() == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
  BOOST_TEST(RedisScript("").sha1() == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  BOOST_TEST(RedisScript("return 1").source() == "return 1");
}

BOOST_AUTO_TEST_CASE(reply_conversion_covers_every_type_binary_safe) {
  using namespace std::string_literals;
  const RedisValue v =
      Parse("*7\r\n:-42\r\n$3\r\na\0b\r\n$-1\r\n+OK\r\n-ERR bad thing\r\n*-1\r\n*2\r\n$0\r\n\r\n*1\r\n:7\r\n"s);
  BOOST_REQUIRE(v.type == RedisValue::Type::kArray);
  BOOST_REQUIRE_EQUAL(v.elements.size(), 7u);
  BOOST_TEST((v.elements[0].type == RedisValue::Type::kInteger));
  BOOST_TEST(v.elements[0].integer == -42);
  BOOST_TEST((v.elements[1].type == RedisValue::Type::kString));
  BOOST_TEST(v.elements[1].str == std::string("a\0b", 3));
  BOOST_TEST(v.elements[2].is_nil());
  BOOST_TEST((v.elements[3].type == RedisValue::Type::kStatus));
  BOOST_TEST(v.elements[3].str == "OK");
  BOOST_TEST(v.elements[4].is_error());
  BOOST_TEST(v.elements[4].str == "ERR bad thing");
  BOOST_TEST(v.elements[5].is_nil());  // a nil array
  const RedisValue& nested = v.elements[6];
  BOOST_REQUIRE(nested.type == RedisValue::Type::kArray);
  BOOST_REQUIRE_EQUAL(nested.elements.size(), 2u);
  BOOST_TEST((nested.elements[0].type == RedisValue::Type::kString));
  BOOST_TEST(nested.elements[0].str.empty());
  BOOST_REQUIRE_EQUAL(nested.elements[1].elements.size(), 1u);
  BOOST_TEST(nested.elements[1].elements[0].integer == 7);
}

BOOST_AUTO_TEST_CASE(a_reply_fed_in_pieces_is_built_whole) {
  // A large reply arrives over several reads; nested arrays are built in
  // place while their parent waits for the rest.
  const std::string resp = "*3\r\n*2\r\n$5\r\nfirst\r\n:1\r\n$6\r\nsecond\r\n*1\r\n*1\r\n+deep\r\n";
  ReaderPtr reader(redisReaderCreateWithFunctions(RedisReplyFunctions()));
  BOOST_REQUIRE(reader);
  void* raw = nullptr;
  for (char c : resp) {
    BOOST_REQUIRE(raw == nullptr);
    BOOST_REQUIRE(redisReaderFeed(reader.get(), &c, 1) == REDIS_OK);
    BOOST_REQUIRE(redisReaderGetReply(reader.get(), &raw) == REDIS_OK);
  }
  std::unique_ptr<RedisValue> v(static_cast<RedisValue*>(raw));
  BOOST_REQUIRE(v);
  BOOST_REQUIRE_EQUAL(v->elements.size(), 3u);
  BOOST_TEST(v->elements[0].elements[0].str == "first");
  BOOST_TEST(v->elements[0].elements[1].integer == 1);
  BOOST_TEST(v->elements[1].str == "second");
  BOOST_TEST(v->elements[2].elements[0].elements[0].str == "deep");
}

BOOST_AUTO_TEST_CASE(a_protocol_error_inside_an_array_frees_what_was_built) {
  // hiredis hands the half-built root back to be freed: the sanitizer build
  // reports a leak or a double free here if ownership is wrong.
  const std::string resp = "*3\r\n$1\r\na\r\n*2\r\n:1\r\n?bad\r\n";
  ReaderPtr reader(redisReaderCreateWithFunctions(RedisReplyFunctions()));
  BOOST_REQUIRE(reader);
  BOOST_REQUIRE(redisReaderFeed(reader.get(), resp.data(), resp.size()) == REDIS_OK);
  void* raw = nullptr;
  BOOST_TEST(redisReaderGetReply(reader.get(), &raw) == REDIS_ERR);
  BOOST_TEST(raw == nullptr);
}

BOOST_AUTO_TEST_CASE(refused_connection_is_unavailable_and_never_echoes_arguments) {
  // Bound but not listening: the kernel refuses connections, and no other
  // process can take the port meanwhile.
  int port = 0;
  Fd held = BoundLoopbackSocket(false, &port);
  RedisClient client(OptionsFor(port));
  auto r = client.Command({"SET", "secret-user-text", "v"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kUnavailable));
  BOOST_TEST(r.status().reason() == "redis_unavailable");
  BOOST_TEST(r.status().message().find("connect") != std::string::npos);
  BOOST_TEST(r.status().message().find(std::to_string(port)) != std::string::npos);
  BOOST_TEST(r.status().message().find("secret") == std::string::npos);
}

BOOST_AUTO_TEST_CASE(reuses_one_connection_for_sequential_calls) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  for (int i = 1; i <= 5; ++i) {
    auto r = client.Command({"INCR", "k"});
    BOOST_REQUIRE(r.ok());
    BOOST_TEST(r->integer == i);
  }
  auto echo = client.Command({"ECHO", std::string_view("x\0y\r\n", 5)});
  BOOST_REQUIRE(echo.ok());
  BOOST_TEST(echo->str == std::string("x\0y\r\n", 5));
  BOOST_TEST(server.accepted() == 1);
}

BOOST_AUTO_TEST_CASE(error_reply_is_a_value_and_keeps_the_connection) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  auto r = client.Command({"ERRME"});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->is_error());
  BOOST_TEST(r->str == "ERR boom");
  BOOST_REQUIRE(client.Command({"PING"}).ok());
  BOOST_TEST(server.accepted() == 1);
}

BOOST_AUTO_TEST_CASE(command_timeout_is_unavailable_and_drops_the_connection,
                     *boost::unit_test::timeout(30)) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port(), 100));
  auto r = client.Command({"SLEEP"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kUnavailable));
  BOOST_TEST(r.status().message().find("timed out after 100 ms") != std::string::npos);
  // The late reply would otherwise be read as the answer to the next command.
  auto next = client.Command({"PING"});
  BOOST_REQUIRE(next.ok());
  BOOST_TEST(next->str == "PONG");
  BOOST_TEST(server.accepted() == 2);
}

BOOST_AUTO_TEST_CASE(connection_lost_mid_command_is_unavailable_then_redialled) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  BOOST_REQUIRE(client.Command({"PING"}).ok());
  auto r = client.Command({"DIE"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kUnavailable));
  BOOST_REQUIRE(client.Command({"PING"}).ok());
  BOOST_TEST(server.accepted() == 2);
}

BOOST_AUTO_TEST_CASE(idle_connection_closed_by_the_server_is_not_used) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  BOOST_REQUIRE(client.Command({"PING"}).ok());
  server.HangUpAll();  // like a Redis restart between two requests
  auto r = client.Command({"INCR", "k"});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->integer == 1);
  BOOST_TEST(server.accepted() == 2);
}

BOOST_AUTO_TEST_CASE(pipeline_returns_replies_in_order_in_one_connection) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  auto r = client.Pipeline({{"ECHO", "a"}, {"ERRME"}, {"INCR", "k"}, {"ECHO", "b"}});
  BOOST_REQUIRE(r.ok());
  BOOST_REQUIRE_EQUAL(r->size(), 4u);
  BOOST_TEST((*r)[0].str == "a");
  BOOST_TEST((*r)[1].is_error());
  BOOST_TEST((*r)[2].integer == 1);
  BOOST_TEST((*r)[3].str == "b");
  BOOST_TEST(server.accepted() == 1);
  BOOST_TEST(server.commands().size() == 4u);

  auto empty = client.Pipeline({});
  BOOST_REQUIRE(empty.ok());
  BOOST_TEST(empty->empty());
}

BOOST_AUTO_TEST_CASE(empty_command_is_refused_without_a_round_trip) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  auto r = client.Command({});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.status().code() == Code::kInternal));
  BOOST_TEST(server.commands().empty());
}

// A Redis that does not know the script until an EVAL brings it (as after a
// restart): its scripts answer 7, ECHO echoes, anything else is an error.
FakeRedis::Handler ScriptLoadingHandler() {
  auto loaded = std::make_shared<bool>(false);  // touched by the server thread only
  return [loaded](const std::vector<std::string>& argv) {
    if (argv[0] == "EVALSHA") {
      return *loaded ? FakeReply::Send(":7\r\n") : FakeReply::Send("-NOSCRIPT No matching script. Please use EVAL.\r\n");
    }
    if (argv[0] == "EVAL") {
      *loaded = true;
      return FakeReply::Send(":7\r\n");
    }
    if (argv[0] == "ECHO") return FakeReply::Send(Bulk(argv[1]));
    return FakeReply::Send("-ERR unexpected\r\n");
  };
}

BOOST_AUTO_TEST_CASE(eval_sends_evalsha_and_falls_back_to_eval_on_noscript) {
  const RedisScript script("return redis.call('INCR', KEYS[1]) + ARGV[1]");
  FakeRedis server(ScriptLoadingHandler());
  RedisClient client(OptionsFor(server.port()));
  for (int i = 0; i < 2; ++i) {
    auto r = client.Eval(script, {"chat:{a}:k"}, {"6"});
    BOOST_REQUIRE(r.ok());
    BOOST_TEST(r->integer == 7);
  }
  const std::vector<std::vector<std::string>> expected = {
      {"EVALSHA", script.sha1(), "1", "chat:{a}:k", "6"},
      {"EVAL", script.source(), "1", "chat:{a}:k", "6"},
      {"EVALSHA", script.sha1(), "1", "chat:{a}:k", "6"},
  };
  BOOST_TEST((server.commands() == expected));
  BOOST_TEST(server.accepted() == 1);
}

BOOST_AUTO_TEST_CASE(eval_then_sends_the_script_and_the_commands_in_one_round_trip) {
  // The script's EVALSHA first, the commands after it, one write; after
  // NOSCRIPT all of them again with EVAL, so the commands never run before
  // the script does.
  const RedisScript script("return redis.call('INCR', KEYS[1])");
  FakeRedis server(ScriptLoadingHandler());
  RedisClient client(OptionsFor(server.port()));
  for (int i = 0; i < 2; ++i) {
    auto r = client.EvalThen(script, {"chat:{a}:k"}, {"x"}, {{"ECHO", "first"}, {"ECHO", "second"}});
    BOOST_REQUIRE(r.ok());
    BOOST_REQUIRE_EQUAL(r->size(), 3u);
    BOOST_TEST((*r)[0].integer == 7);
    BOOST_TEST((*r)[1].str == "first");
    BOOST_TEST((*r)[2].str == "second");
  }
  const std::vector<std::string> evalsha = {"EVALSHA", script.sha1(), "1", "chat:{a}:k", "x"};
  const std::vector<std::string> eval = {"EVAL", script.source(), "1", "chat:{a}:k", "x"};
  const std::vector<std::string> first = {"ECHO", "first"}, second = {"ECHO", "second"};
  const std::vector<std::vector<std::string>> expected = {evalsha, first, second, eval,  first,
                                                          second,  evalsha, first, second};
  BOOST_TEST((server.commands() == expected));
  BOOST_TEST(server.accepted() == 1);

  auto alone = client.EvalThen(script, {"chat:{a}:k"}, {}, {});
  BOOST_REQUIRE(alone.ok());
  BOOST_TEST(alone->size() == 1u);
  auto empty = client.EvalThen(script, {"chat:{a}:k"}, {}, {{}});
  BOOST_REQUIRE(!empty.ok());
  BOOST_TEST((empty.status().code() == Code::kInternal));
}

BOOST_AUTO_TEST_CASE(eval_returns_other_errors_without_retrying) {
  FakeRedis server([](const std::vector<std::string>&) { return FakeReply::Send("-BUSY script running\r\n"); });
  RedisClient client(OptionsFor(server.port()));
  auto r = client.Eval(RedisScript("return 1"), {}, {});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->is_error());
  BOOST_TEST(r->str == "BUSY script running");
  BOOST_TEST(server.commands().size() == 1u);
}

BOOST_AUTO_TEST_CASE(max_idle_bounds_the_kept_connections) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisOptions options = OptionsFor(server.port());
  options.max_idle = 0;
  RedisClient client(options);
  for (int i = 0; i < 3; ++i) BOOST_REQUIRE(client.Command({"PING"}).ok());
  BOOST_TEST(server.accepted() == 3);
}

BOOST_AUTO_TEST_CASE(concurrent_callers_share_the_pool_safely) {
  auto counter = std::make_shared<std::atomic<int64_t>>(0);
  FakeRedis server(BasicHandler(counter));
  RedisClient client(OptionsFor(server.port()));
  constexpr int kThreads = 8;
  constexpr int kCalls = 50;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kCalls; ++i) {
        auto r = client.Command({"INCR", "k"});
        if (!r.ok() || r->type != RedisValue::Type::kInteger) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  BOOST_TEST(failures.load() == 0);
  BOOST_TEST(counter->load() == kThreads * kCalls);
  BOOST_TEST(server.accepted() <= kThreads);
}

// Issue 12 B: Redis was used without credentials.

namespace {
// Accepts AUTH chatd right-pass only; everything else before it is NOAUTH.
FakeRedis::Handler AuthHandler() {
  auto authed = std::make_shared<std::atomic<bool>>(false);
  return [authed](const std::vector<std::string>& argv) {
    if (argv[0] == "AUTH") {
      bool ok = argv.size() == 3 && argv[1] == "chatd" && argv[2] == "right-pass";
      authed->store(ok);
      return FakeReply::Send(ok ? "+OK\r\n" : "-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    }
    if (!authed->load()) return FakeReply::Send("-NOAUTH Authentication required.\r\n");
    return FakeReply::Send("+PONG\r\n");
  };
}

RedisOptions AclUser(int port, const std::string& password) {
  RedisOptions o = OptionsFor(port);
  o.username = "chatd";
  o.password = password;
  return o;
}
}  // namespace

BOOST_AUTO_TEST_CASE(redis_without_credentials_auth_is_the_first_command_of_every_new_connection) {
  FakeRedis server(AuthHandler());
  RedisClient client(AclUser(server.port(), "right-pass"));
  BOOST_REQUIRE(client.CheckAccess().ok());
  auto r = client.Command({"PING"});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->str == "PONG");
  auto commands = server.commands();
  BOOST_REQUIRE(commands.size() >= 2u);
  BOOST_TEST(commands[0] == (std::vector<std::string>{"AUTH", "chatd", "right-pass"}));
  BOOST_TEST(server.accepted() == 1);  // the authenticated connection is reused
}

BOOST_AUTO_TEST_CASE(redis_wrong_password_is_a_clear_error_that_never_shows_the_password) {
  FakeRedis server(AuthHandler());
  RedisClient client(AclUser(server.port(), "wrong-pass"));
  for (int i = 0; i < 2; ++i) {  // not cached: each call dials and tries again
    auto r = client.Command({"PING"});
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.status().reason() == "redis_auth_failed");
    BOOST_TEST(r.status().message().find("WRONGPASS") != std::string::npos);
    BOOST_TEST(r.status().message().find("CHATD_REDIS_PASSWORD_FILE") != std::string::npos);
    BOOST_TEST(r.status().message().find("wrong-pass") == std::string::npos);
  }
  BOOST_TEST(server.accepted() == 2);
}

BOOST_AUTO_TEST_CASE(redis_without_a_password_configured_noauth_is_reported_as_an_auth_failure) {
  FakeRedis server(AuthHandler());
  RedisClient client(OptionsFor(server.port()));
  Status s = client.CheckAccess();
  BOOST_TEST(s.reason() == "redis_auth_failed");
  BOOST_TEST(s.message().find("NOAUTH") != std::string::npos);
}

// RecordTurn after a transport error: asked once more, and the answer says
// truthfully whether the turn is recorded.
namespace {
Turn SomeTurn() {
  Turn t(testing::Uid("alice"));
  t.turn_id = "0123456789abcdef0123456789abcdef";
  t.user_message = "hi";
  t.assistant_message = "hello";
  return t;
}

// Answers each record-script call with the next of `replies`.
FakeRedis::Handler RecordReplies(std::vector<FakeReply> replies) {
  auto next = std::make_shared<size_t>(0);
  return [replies, next](const std::vector<std::string>& argv) {
    if (argv[0] != "EVALSHA" || *next >= replies.size()) return FakeReply::Send("-ERR unexpected\r\n");
    return replies[(*next)++];
  };
}

constexpr int64_t kShortTimeoutMs = 100;
constexpr int64_t kRecordedWindowMs = 60000;
}  // namespace

BOOST_AUTO_TEST_CASE(record_that_timed_out_after_running_is_confirmed_by_the_retry, *boost::unit_test::timeout(30)) {
  FakeRedis server(RecordReplies({FakeReply::Silence(), FakeReply::Send("*1\r\n$7\r\nalready\r\n")}));
  RedisClient client(OptionsFor(server.port(), kShortTimeoutMs));
  RedisShortTermStore store(client, 4, 64, kRecordedWindowMs);
  Status s = store.RecordTurn(SomeTurn());
  BOOST_TEST(s.ok(), s.reason());
  const auto commands = server.commands();
  BOOST_REQUIRE_EQUAL(commands.size(), 2u);
  BOOST_TEST((commands[0] == commands[1]));  // the same turn id, so the script can tell
  // recent, stream, activity, recorded turns, leases, tombstone, turn index, queued
  BOOST_TEST(commands[0][2] == "8");
  BOOST_TEST(commands[0][6] == RecordedTurnsKey(testing::Uid("alice")));
  BOOST_TEST(commands[0][12] == "0123456789abcdef0123456789abcdef");
}

BOOST_AUTO_TEST_CASE(record_unconfirmed_twice_is_unknown_never_not_recorded, *boost::unit_test::timeout(30)) {
  for (FakeReply second : {FakeReply::Silence(), FakeReply::Send("-LOADING Redis is loading\r\n")}) {
    FakeRedis server(RecordReplies({FakeReply::Silence(), second}));
    RedisClient client(OptionsFor(server.port(), kShortTimeoutMs));
    RedisShortTermStore store(client, 4, 64, kRecordedWindowMs);
    Status s = store.RecordTurn(SomeTurn());
    BOOST_TEST(s.reason() == "record_outcome_unknown");
    BOOST_TEST(server.commands().size() == 2u);
  }
}

BOOST_AUTO_TEST_CASE(record_refused_or_never_sent_is_not_recorded) {
  {
    FakeRedis server(RecordReplies({FakeReply::Send("-OOM command not allowed\r\n")}));
    RedisClient client(OptionsFor(server.port()));
    RedisShortTermStore store(client, 4, 64, kRecordedWindowMs);
    Status s = store.RecordTurn(SomeTurn());
    BOOST_TEST(s.reason() == "redis_error");
    BOOST_TEST(server.commands().size() == 1u);  // a refusal wrote nothing: no retry
  }
  int port = 0;
  Fd held = BoundLoopbackSocket(false, &port);
  RedisClient client(OptionsFor(port));
  RedisShortTermStore store(client, 4, 64, kRecordedWindowMs);
  bool may_have_run = true;
  BOOST_TEST(!client.Eval(RedisScript("return 1"), {}, {}, &may_have_run).ok());
  BOOST_TEST(!may_have_run);
  BOOST_TEST(store.RecordTurn(SomeTurn()).reason() == "redis_error");
}

BOOST_AUTO_TEST_CASE(transient_errors_are_classified_by_their_first_word) {
  BOOST_TEST(IsTransientRedisError("LOADING Redis is loading the dataset in memory"));
  BOOST_TEST(IsTransientRedisError("BUSY Redis is busy running a script."));
  BOOST_TEST(IsTransientRedisError("TRYAGAIN"));
  BOOST_TEST(!IsTransientRedisError("ERR unknown command"));
  BOOST_TEST(!IsTransientRedisError("LOADINGX nonsense"));
  BOOST_TEST(RedisReplyError("LOADING Redis is loading the dataset", "GET").reason() == "redis_loading");
  BOOST_TEST(RedisReplyError("BUSY Redis is busy", "GET").reason() == "redis_busy");
  BOOST_TEST(RedisReplyError("MASTERDOWN no link", "GET").reason() == "redis_unavailable");
  BOOST_TEST(RedisReplyError("WRONGTYPE Operation", "GET").reason() == "redis_error");
  // Only the first word: the rest may quote arguments.
  BOOST_TEST(RedisReplyError("ERR secret-arg", "GET").message().find("secret") == std::string::npos);
}

BOOST_AUTO_TEST_CASE(without_a_wait_a_loading_redis_is_answered_at_once) {
  FakeRedis server([](const std::vector<std::string>&) {
    return FakeReply::Send("-LOADING Redis is loading the dataset in memory\r\n");
  });
  RedisClient client(OptionsFor(server.port()));
  auto r = client.Command({"GET", "k"});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->is_error());
  BOOST_TEST(server.commands().size() == 1u);
}

BOOST_AUTO_TEST_CASE(with_a_wait_commands_and_scripts_are_resent_until_redis_has_loaded,
                     *boost::unit_test::timeout(30)) {
  // Redis answers LOADING (then BUSY) to everything for a while after a
  // restart: nothing ran, so resending is safe.
  auto refusals = std::make_shared<std::atomic<int>>(4);
  FakeRedis server([refusals](const std::vector<std::string>& argv) {
    if (refusals->fetch_sub(1) > 0) {
      return FakeReply::Send(refusals->load() % 2 ? "-LOADING Redis is loading\r\n" : "-BUSY script\r\n");
    }
    if (argv[0] == "EVALSHA") return FakeReply::Send(":7\r\n");
    return FakeReply::Send("+PONG\r\n");
  });
  RedisOptions options = OptionsFor(server.port());
  options.transient_wait_ms = 20000;
  RedisClient client(options);
  BOOST_REQUIRE(client.CheckAccess().ok());
  *refusals = 3;
  auto r = client.Eval(RedisScript("return 7"), {}, {});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->integer == 7);
  *refusals = 2;
  auto many = client.EvalMany(RedisScript("return 7"), {{{}, {}}, {{}, {}}});
  BOOST_REQUIRE(many.ok());
  BOOST_TEST((*many)[0].integer == 7);
  BOOST_TEST((*many)[1].integer == 7);
}

BOOST_AUTO_TEST_CASE(a_wait_is_bounded_and_then_fails_clearly, *boost::unit_test::timeout(30)) {
  FakeRedis server([](const std::vector<std::string>&) {
    return FakeReply::Send("-LOADING Redis is loading the dataset in memory\r\n");
  });
  RedisOptions options = OptionsFor(server.port());
  options.transient_wait_ms = 300;
  RedisClient client(options);
  Status access = client.CheckAccess();
  BOOST_TEST(access.reason() == "redis_loading");
  BOOST_TEST(access.message().find("loading") != std::string::npos);
  auto r = client.Command({"GET", "k"});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->is_error());
  BOOST_TEST(server.commands().size() > 2u);  // it did try again meanwhile
}

BOOST_AUTO_TEST_CASE(a_command_that_may_have_run_is_never_resent, *boost::unit_test::timeout(30)) {
  // The reply is lost after Redis got the command: it may have run, so even
  // with a wait it is reported, not sent again.
  FakeRedis server([](const std::vector<std::string>&) { return FakeReply::HangUp(); });
  RedisOptions options = OptionsFor(server.port());
  options.transient_wait_ms = 20000;
  RedisClient client(options);
  auto r = client.Command({"INCR", "k"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(server.commands().size() == 1u);
}

BOOST_AUTO_TEST_CASE(a_refused_connection_is_waited_for_within_the_bound, *boost::unit_test::timeout(30)) {
  int port = 0;
  Fd held = BoundLoopbackSocket(false, &port);
  RedisOptions options = OptionsFor(port);
  options.transient_wait_ms = 300;
  RedisClient client(options);
  auto r = client.Command({"GET", "k"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "redis_unavailable");
  BOOST_TEST(r.status().message().find("connect") != std::string::npos);
}

// A fake cluster node: CLUSTER SLOTS gives `ranges` (first, last, port) on
// 127.0.0.1, GET answers `value` unless `redirect` has an error for it.
struct FakeNodeState {
  std::mutex mu;
  std::vector<std::tuple<int, int, int>> ranges;
  std::string value;
  std::string redirect;  // an error reply for GET ("MOVED ..."), empty for none
  bool want_asking = false;  // GET without ASKING just before it is refused
  bool dead = false;         // hang up on everything, as a killed primary
  bool asked = false;
  int gets = 0;
};

FakeRedis::Handler FakeNode(std::shared_ptr<FakeNodeState> st) {
  return [st](const std::vector<std::string>& argv) {
    std::lock_guard<std::mutex> lock(st->mu);
    if (st->dead) return FakeReply::HangUp();
    const bool asked = st->asked;
    st->asked = false;
    if (argv[0] == "CLUSTER") {
      std::string out = "*" + std::to_string(st->ranges.size()) + "\r\n";
      for (const auto& [first, last, port] : st->ranges) {
        out += "*3\r\n:" + std::to_string(first) + "\r\n:" + std::to_string(last) + "\r\n*2\r\n" + Bulk("127.0.0.1") +
               ":" + std::to_string(port) + "\r\n";
      }
      return FakeReply::Send(out);
    }
    if (argv[0] == "ASKING") {
      st->asked = true;
      return FakeReply::Send("+OK\r\n");
    }
    if (argv[0] == "GET") {
      ++st->gets;
      if (st->want_asking && !asked) return FakeReply::Send("-MOVED 0 127.0.0.1:1\r\n");
      if (!st->redirect.empty()) return FakeReply::Send("-" + st->redirect + "\r\n");
      return FakeReply::Send(Bulk(st->value + ":" + argv[1]));
    }
    if (argv[0] == "PING") return FakeReply::Send("+PONG\r\n");
    return FakeReply::Send("-ERR unknown command\r\n");
  };
}

RedisOptions ClusterOptions(std::vector<int> seed_ports) {
  RedisOptions o = OptionsFor(0);
  for (int port : seed_ports) o.cluster_seeds.push_back({"127.0.0.1", port});
  return o;
}

BOOST_AUTO_TEST_CASE(cluster_follows_moved_and_remembers_the_new_owner, *boost::unit_test::timeout(30)) {
  auto a = std::make_shared<FakeNodeState>(), b = std::make_shared<FakeNodeState>();
  FakeRedis node_a(FakeNode(a)), node_b(FakeNode(b));
  a->ranges = {{0, kClusterSlots - 1, node_a.port()}};
  a->redirect = "MOVED " + std::to_string(RedisKeySlot("k")) + " 127.0.0.1:" + std::to_string(node_b.port());
  b->value = "b";
  RedisClient client(ClusterOptions({node_a.port()}));
  for (int i = 0; i < 3; ++i) {
    auto r = client.Command({"GET", "k"});
    BOOST_REQUIRE(r.ok());
    BOOST_TEST(r->str == "b:k");
  }
  std::lock_guard<std::mutex> la(a->mu), lb(b->mu);
  BOOST_TEST(a->gets == 1);  // asked once, then the slot was known to be on b
  BOOST_TEST(b->gets == 3);
}

BOOST_AUTO_TEST_CASE(cluster_sends_asking_before_the_one_command_an_ask_moves, *boost::unit_test::timeout(30)) {
  auto a = std::make_shared<FakeNodeState>(), b = std::make_shared<FakeNodeState>();
  FakeRedis node_a(FakeNode(a)), node_b(FakeNode(b));
  a->ranges = {{0, kClusterSlots - 1, node_a.port()}};
  a->redirect = "ASK " + std::to_string(RedisKeySlot("k")) + " 127.0.0.1:" + std::to_string(node_b.port());
  b->value = "b";
  b->want_asking = true;
  RedisClient client(ClusterOptions({node_a.port()}));
  for (int i = 0; i < 2; ++i) {
    auto r = client.Command({"GET", "k"});
    BOOST_REQUIRE(r.ok());
    BOOST_TEST(r->str == "b:k");
    // A pipeline is redirected per command too.
    auto p = client.Pipeline({{"GET", "k"}});
    BOOST_REQUIRE(p.ok());
    BOOST_TEST(p->front().str == "b:k");
  }
  std::lock_guard<std::mutex> la(a->mu);
  BOOST_TEST(a->gets == 4);  // ASK does not change the map: every call starts at a
}

BOOST_AUTO_TEST_CASE(cluster_pipeline_goes_to_each_key_owner_in_order, *boost::unit_test::timeout(30)) {
  auto a = std::make_shared<FakeNodeState>(), b = std::make_shared<FakeNodeState>();
  FakeRedis node_a(FakeNode(a)), node_b(FakeNode(b));
  a->ranges = {{0, 8191, node_a.port()}, {8192, kClusterSlots - 1, node_b.port()}};
  a->value = "a";
  b->value = "b";
  RedisClient client(ClusterOptions({node_a.port()}));
  // foo is in slot 12182 (b), bar in 5061 (a).
  auto r = client.Pipeline({{"GET", "foo"}, {"GET", "bar"}, {"GET", "foo"}, {"PING"}});
  BOOST_REQUIRE(r.ok());
  BOOST_REQUIRE_EQUAL(r->size(), 4u);
  BOOST_TEST((*r)[0].str == "b:foo");
  BOOST_TEST((*r)[1].str == "a:bar");
  BOOST_TEST((*r)[2].str == "b:foo");
  BOOST_TEST((*r)[3].str == "PONG");
}

BOOST_AUTO_TEST_CASE(cluster_reloads_the_map_when_a_primary_dies, *boost::unit_test::timeout(30)) {
  auto a = std::make_shared<FakeNodeState>(), b = std::make_shared<FakeNodeState>();
  FakeRedis node_a(FakeNode(a)), node_b(FakeNode(b));
  a->ranges = {{0, kClusterSlots - 1, node_a.port()}};
  a->value = "a";
  b->ranges = {{0, kClusterSlots - 1, node_b.port()}};  // b's view: it took over
  b->value = "b";
  RedisClient client(ClusterOptions({node_a.port(), node_b.port()}));
  auto before = client.Command({"GET", "k"});
  BOOST_REQUIRE(before.ok());
  BOOST_TEST(before->str == "a:k");
  {
    std::lock_guard<std::mutex> la(a->mu);
    a->dead = true;
  }
  node_a.HangUpAll();
  // The pooled connection to a is closed: a fresh one is refused... by a
  // hang-up after the command was sent, so this call may have run and fails.
  bool may_have_run = false;
  auto during = client.Pipeline({{"GET", "k"}}, &may_have_run);
  BOOST_REQUIRE(!during.ok());
  BOOST_TEST(may_have_run);
  // That failure reloaded the map (from b): the next call finds b.
  auto after = client.Command({"GET", "k"});
  BOOST_REQUIRE(after.ok());
  BOOST_TEST(after->str == "b:k");
}

BOOST_AUTO_TEST_CASE(cluster_ping_is_answered_by_every_primary, *boost::unit_test::timeout(30)) {
  auto a = std::make_shared<FakeNodeState>(), b = std::make_shared<FakeNodeState>();
  FakeRedis node_a(FakeNode(a)), node_b(FakeNode(b));
  a->ranges = {{0, 8191, node_a.port()}, {8192, kClusterSlots - 1, node_b.port()}};
  RedisClient client(ClusterOptions({node_a.port()}));
  auto healthy = client.Command({"PING"});
  BOOST_REQUIRE(healthy.ok());
  BOOST_TEST(healthy->str == "PONG");
  {
    std::lock_guard<std::mutex> lb(b->mu);
    b->dead = true;
  }
  node_b.HangUpAll();
  // Half the users are unserved: the health check must say so.
  BOOST_TEST(!client.Command({"PING"}).ok());
}

BOOST_AUTO_TEST_CASE(cluster_with_no_reachable_seed_is_unavailable, *boost::unit_test::timeout(30)) {
  int port = 0;
  Fd held = BoundLoopbackSocket(false, &port);
  RedisClient client(ClusterOptions({port}));
  auto r = client.Command({"GET", "k"});
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.status().reason() == "redis_unavailable");
  BOOST_TEST(!client.CheckAccess().ok());
}

namespace {

// The slot of a key as Redis Cluster computes it: CRC16 (XMODEM) of the
// hash tag (the text between the first '{' and the next '}', when not
// empty), else of the whole key, modulo 16384.
int KeySlot(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  uint16_t crc = 0;
  for (unsigned char c : key) {
    crc ^= static_cast<uint16_t>(c << 8);
    for (int i = 0; i < 8; ++i) crc = static_cast<uint16_t>((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
  }
  return crc % 16384;
}

}  // namespace

BOOST_AUTO_TEST_CASE(key_slot_matches_redis_cluster) {
  // The cluster specification's own example, and the hash-tag rule.
  BOOST_TEST(KeySlot("123456789") == 12739);
  BOOST_TEST(KeySlot("{user1000}.following") == KeySlot("{user1000}.followers"));
  BOOST_TEST(KeySlot("foo{{bar}}zap") == KeySlot("{bar"));
  BOOST_TEST(KeySlot("foo{}{bar}") != KeySlot("bar"));
}

// Every script call the schema and the Redis adapters make, recorded by a
// fake server: each call's KEYS must hash to one slot (else a cluster answers
// CROSSSLOT), the slot of the user's shard.
BOOST_AUTO_TEST_CASE(every_script_touches_the_slot_of_the_users_shard_only) {
  FakeRedis server([](const std::vector<std::string>&) { return FakeReply::Send(":1\r\n"); });
  RedisClient client(OptionsFor(server.port()));
  const UserId user = testing::Uid("alice");
  IdempotencyTicket ticket;
  ticket.key = "k1";
  ticket.token = "tok";
  ticket.fingerprint = "fp";
  ticket.keep_ms = 1000;
  Turn turn = SomeTurn();
  turn.idempotency = &ticket;
  auto call = RecordTurnCall::Make(turn, 4, "60000");
  BOOST_REQUIRE(call.ok());
  (void)call->Run(client, nullptr);
  StoredMessage m{"t1:u", user.str(), "t1", Role::kUser, "hi", 1, {0.5f}};
  (void)AddToHotSet(client, user, {m}, 8);
  (void)BeginIndexing(client, "c1", 1000, {{user, {{"1-0", 1}}}});
  (void)FinishIndexing(client, 8, {{user, false, {"1-0"}, {"t1"}, {&m}}});
  (void)RemoveGoneIndexConsumers(client, ShardOf(user), "c1", 1000);
  (void)TakeCleanupLock(client, user, "cleanup:x", 1000, "");
  (void)RenewCleanupLock(client, user, "cleanup:x", 1000);
  (void)ReleaseCleanupLock(client, user, "cleanup:x");
  (void)ReleaseAbandonedLock(client, user, "migrate");
  (void)SettleInProgress(client, user, 1000);
  (void)TakeCleanupLease(client, "lease", 1000, "");
  (void)RenewCleanupLease(client, "lease", 1000);
  (void)ReleaseCleanupLease(client, "lease");
  (void)FinishArchive(client, user, 1000, "cleanup:x", {"1-0"});
  (void)ForgetUser(client, user, "forget:x", 1000, false, {"1-0"}, {"2-0"}, {IdempotencyRedisKey(user, "k1").value()});
  (void)DropBeforeTombstone(client, user, "3-0", {"1-0"});
  RedisRateLimiter limiter(client, 10, 60, RateAlgorithm::kSliding, ConcurrencyCap{2, 1000});
  (void)limiter.Check(user);
  RedisIdempotencyStore idempotency(client, 1000);
  (void)idempotency.Claim(user, ticket);

  const int user_slot = KeySlot(IndexStreamKey(ShardOf(user)));
  size_t scripts = 0;
  for (const auto& argv : server.commands()) {
    if (argv[0] != "EVALSHA" && argv[0] != "EVAL") continue;
    ++scripts;
    const size_t n = std::stoul(argv[2]);
    BOOST_REQUIRE(argv.size() >= 3 + n);
    for (size_t i = 3; i < 3 + n; ++i) {
      // The lease is global: its scripts touch it alone.
      const int want = n == 1 && argv[i] == kCleanupLeaseKey ? KeySlot(kCleanupLeaseKey) : user_slot;
      BOOST_TEST(KeySlot(argv[i]) == want, argv[i]);
    }
  }
  BOOST_TEST(scripts == 18u);  // every call above ran its script
}

// Keys are named only for parsed ids: an unchecked string does not compile
// into one (user_id.h), so no key builder checks an id again.
BOOST_AUTO_TEST_CASE(keys_are_named_only_for_parsed_user_ids) {
  static_assert(std::is_invocable_v<decltype(&RecentKey), const UserId&>);
  static_assert(!std::is_invocable_v<decltype(&RecentKey), std::string_view>);
  static_assert(!std::is_invocable_v<decltype(&ShardOf), std::string_view>);
  static_assert(!std::is_invocable_v<decltype(&RateKey), std::string_view, RateCounter>);
  static_assert(!std::is_invocable_v<decltype(&IdempotencyRedisKey), std::string_view, std::string_view>);
  static_assert(!std::is_invocable_v<decltype(&UserKey), std::string_view, std::string_view>);
  static_assert(!std::is_invocable_v<decltype(&ChromaCollectionName), std::string_view>);
  BOOST_TEST(RecentKey(testing::Uid("a.b@c-d_e")) == "chatd:{s" + std::to_string(ShardOf(testing::Uid("a.b@c-d_e"))) +
                                                      "}:u:a.b@c-d_e:recent");
}

// Stream entries are data read back: the indexer parses each one's user
// before it names a key for it. An entry whose user is no id (the record
// script never writes one) can never be indexed: it goes to its shard's dead
// letters at once (reason invalid_user_id) and is acknowledged and deleted at
// the stream it came from, and no key is named for its user. A valid entry
// beside it takes its usual way (here a cleanup holds alice: hers waits).
BOOST_AUTO_TEST_CASE(the_indexer_dead_letters_an_entry_whose_user_is_not_an_id) {
  const UserId alice = testing::Uid("alice");
  const std::string bad_stream = IndexStreamKey(3), alice_stream = IndexStreamKey(ShardOf(alice));
  auto bulk = [](std::string_view s) { return "$" + std::to_string(s.size()) + "\r\n" + std::string(s) + "\r\n"; };
  auto read_reply = [&](const std::string& stream, std::string_view id, std::string_view user) {
    return "*1\r\n*2\r\n" + bulk(stream) + "*1\r\n*2\r\n" + bulk(id) + "*8\r\n" + bulk("user") + bulk(user) +
           bulk("turn") + bulk("t1") + bulk("u") + bulk("hi") + bulk("a") + bulk("hello");
  };
  FakeRedis server([&](const std::vector<std::string>& argv) {
    const std::string& cmd = argv[0];
    if (cmd == "XREADGROUP") {
      const std::string& stream = argv[argv.size() - 2];  // ... STREAMS <stream> >
      if (stream == bad_stream) return FakeReply::Send(read_reply(bad_stream, "1-1", "not a user"));
      if (stream == alice_stream) return FakeReply::Send(read_reply(alice_stream, "1-2", "alice"));
      return FakeReply::Send("*-1\r\n");
    }
    if (cmd == "XGROUP") return FakeReply::Send("+OK\r\n");
    if (cmd == "XPENDING") return FakeReply::Send("*0\r\n");
    if (cmd == "XADD") return FakeReply::Send(bulk("9-9"));
    if (cmd == "XACK" || cmd == "XDEL") return FakeReply::Send(":1\r\n");
    return FakeReply::Send(":0\r\n");  // the scripts: no consumer gone; a cleanup holds alice
  });
  RedisClient client(OptionsFor(server.port()));
  testing::FakeLongTerm store;
  testing::FakeEmbedder embedder;
  IndexerOptions options;
  options.consumer = "c1";
  options.linger_ms = 0;
  Indexer indexer(client, store, embedder, options, nullptr);
  Result<int> settled = indexer.RunOnce();
  BOOST_REQUIRE(settled.ok());
  BOOST_TEST(*settled == 1);  // the malformed entry; alice's waits for the cleanup

  bool dead_lettered = false, acked = false, deleted = false, alice_asked = false;
  for (const std::vector<std::string>& argv : server.commands()) {
    for (const std::string& arg : argv) {
      BOOST_TEST(arg.find(":u:not a user") == std::string::npos, "a key was named for a malformed id");
      if (arg == CleanupLockKey(alice)) alice_asked = true;
    }
    if (argv[0] == "XADD" && argv.size() > 14 && argv[1] == DeadLetterKey(3)) {
      dead_lettered = argv[3] == "user" && argv[4] == "not a user" && argv[13] == "reason" &&
                      argv[14] == "invalid_user_id";
    }
    if (argv == std::vector<std::string>{"XACK", bad_stream, std::string(kIndexGroup), "1-1"}) acked = true;
    if (argv == std::vector<std::string>{"XDEL", bad_stream, "1-1"}) deleted = true;
    BOOST_TEST(!(argv[0] == "XACK" && argv.back() == "1-2"), "alice's entry must wait for the cleanup");
  }
  BOOST_TEST(dead_lettered);
  BOOST_TEST(acked);
  BOOST_TEST(deleted);
  BOOST_TEST(alice_asked);
}

BOOST_AUTO_TEST_CASE(shards_are_stable_and_spread) {
  // The shard is part of every key name: it must never change for a user.
  BOOST_TEST(ShardOf(testing::Uid("alice")) == 7);
  BOOST_TEST(RecentKey(testing::Uid("alice")) == "chatd:{s7}:u:alice:recent");
  BOOST_TEST(IndexStreamKey(7) == "chatd:{s7}:index");
  std::vector<int> seen(kRedisShards, 0);
  for (int i = 0; i < 1600; ++i) ++seen[static_cast<size_t>(ShardOf(testing::Uid("user" + std::to_string(i))))];
  for (int n : seen) BOOST_TEST(n > 0);
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
