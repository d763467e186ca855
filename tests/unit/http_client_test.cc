#include "http_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace chatd {
namespace {

// A minimal HTTP/1.1 server on 127.0.0.1:0 with canned answers by path:
//   /ok    200, a body and both retry headers (in odd letter case)
//   /echo  200, "<METHOD> <body>"
//   /big   200, a body one byte over the client's limit (set per call)
//   /big-unsized  the same without Content-Length, ended by closing
//   /hang  never answers until the server stops
// It counts accepted connections, so tests can see keep-alive reuse.
class TinyHttpServer {
 public:
  static constexpr size_t kBigBodyBytes = 64 * 1024 + 1;

  TinyHttpServer() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    BOOST_REQUIRE(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    BOOST_REQUIRE(::listen(listen_fd_, 16) == 0);
    socklen_t len = sizeof(addr);
    BOOST_REQUIRE(::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }

  ~TinyHttpServer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
    }
    cv_.notify_all();
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    for (std::thread& t : handlers_) t.join();
    ::close(listen_fd_);
    for (int fd : conn_fds_) ::close(fd);
  }

  std::string Url(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(port_) + path;
  }
  int connections() const { return connections_.load(); }

 private:
  void AcceptLoop() {
    for (;;) {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;  // shut down
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        ::close(fd);
        return;
      }
      ++connections_;
      conn_fds_.push_back(fd);
      handlers_.emplace_back([this, fd] { Serve(fd); });
    }
  }

  void Serve(int fd) {
    std::string buffer;
    char chunk[4096];
    for (;;) {
      size_t header_end;
      while ((header_end = buffer.find("\r\n\r\n")) == std::string::npos) {
        ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
        if (n <= 0) return;
        buffer.append(chunk, static_cast<size_t>(n));
      }
      const std::string head = buffer.substr(0, header_end);
      size_t content_length = 0;
      const size_t cl = head.find("Content-Length: ");
      if (cl != std::string::npos) content_length = std::stoul(head.substr(cl + 16));
      while (buffer.size() < header_end + 4 + content_length) {
        ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
        if (n <= 0) return;
        buffer.append(chunk, static_cast<size_t>(n));
      }
      const std::string body = buffer.substr(header_end + 4, content_length);
      buffer.erase(0, header_end + 4 + content_length);

      const std::string method = head.substr(0, head.find(' '));
      const size_t path_start = head.find(' ') + 1;
      const std::string path = head.substr(path_start, head.find(' ', path_start) - path_start);

      std::string extra_headers;
      std::string reply;
      if (path == "/ok") {
        extra_headers = "rEtRy-AfTeR: 7\r\nRetry-After-Ms: 1500\r\n";
        reply = "{\"hello\":\"world\"}";
      } else if (path == "/echo") {
        reply = method + " " + body;
      } else if (path == "/big" || path == "/big-unsized") {
        reply.assign(kBigBodyBytes, 'x');
      } else if (path == "/hang") {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::seconds(30), [this] { return stopping_; });
        return;
      } else {
        reply = "not found";
      }
      const std::string status = reply == "not found" ? "404 Not Found" : "200 OK";
      const bool unsized = path == "/big-unsized";
      const std::string length_header =
          unsized ? "Connection: close\r\n" : "Content-Length: " + std::to_string(reply.size()) + "\r\n";
      const std::string response = "HTTP/1.1 " + status + "\r\nContent-Type: text/plain\r\n" + extra_headers +
                                   length_header + "\r\n" + reply;
      size_t sent = 0;
      while (sent < response.size()) {
        ssize_t n = ::send(fd, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) return;
        sent += static_cast<size_t>(n);
      }
      if (unsized) {
        ::shutdown(fd, SHUT_WR);
        return;
      }
    }
  }

  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<int> connections_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::vector<int> conn_fds_;
  std::vector<std::thread> handlers_;
  std::thread acceptor_;
};

// A port nobody listens on: bind one, note it, close it.
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

}  // namespace

BOOST_AUTO_TEST_SUITE(http_client)

BOOST_AUTO_TEST_CASE(captures_status_body_and_retry_headers) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.method = "GET";
  call.url = server.Url("/ok");
  auto result = client.Send(call);
  BOOST_REQUIRE(result.ok());
  BOOST_TEST(result->status == 200);
  BOOST_TEST(result->body == "{\"hello\":\"world\"}");
  BOOST_TEST(result->retry_after == "7");
  BOOST_TEST(result->retry_after_ms == "1500");
}

BOOST_AUTO_TEST_CASE(non_2xx_is_a_response_not_an_error) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.method = "GET";
  call.url = server.Url("/missing");
  auto result = client.Send(call);
  BOOST_REQUIRE(result.ok());
  BOOST_TEST(result->status == 404);
  BOOST_TEST(result->retry_after.empty());
}

BOOST_AUTO_TEST_CASE(sends_method_and_binary_body) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.url = server.Url("/echo");
  call.body = std::string("a\0b", 3) + std::string(5000, 'z');  // NUL inside, and over 1 KiB
  call.headers = {"Content-Type: application/json"};
  auto post = client.Send(call);
  BOOST_REQUIRE(post.ok());
  BOOST_TEST(post->body == "POST " + call.body);

  call.method = "DELETE";
  call.body.clear();
  auto del = client.Send(call);
  BOOST_REQUIRE(del.ok());
  BOOST_TEST(del->body == "DELETE ");

  call.method = "GET";
  auto get = client.Send(call);
  BOOST_REQUIRE(get.ok());
  BOOST_TEST(get->body == "GET ");
}

BOOST_AUTO_TEST_CASE(reuses_one_connection_across_calls) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.url = server.Url("/echo");
  call.body = "one";
  BOOST_REQUIRE(client.Send(call).ok());
  call.body = "two";
  auto second = client.Send(call);
  BOOST_REQUIRE(second.ok());
  BOOST_TEST(second->body == "POST two");
  BOOST_TEST(server.connections() == 1);
}

BOOST_AUTO_TEST_CASE(timeout_is_deadline_exceeded_and_handle_stays_usable) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.method = "GET";
  call.url = server.Url("/hang");
  call.timeout_ms = 200;
  auto result = client.Send(call);
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(static_cast<int>(result.status().code()) == static_cast<int>(Code::kDeadlineExceeded));
  BOOST_TEST(result.status().reason() == "timeout");

  call.url = server.Url("/ok");
  call.timeout_ms = 5000;
  auto after = client.Send(call);
  BOOST_REQUIRE(after.ok());
  BOOST_TEST(after->status == 200);
}

BOOST_AUTO_TEST_CASE(no_time_left_fails_without_sending) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.url = server.Url("/echo");
  call.timeout_ms = 0;
  auto result = client.Send(call);
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(result.status().reason() == "timeout");
  BOOST_TEST(server.connections() == 0);
}

BOOST_AUTO_TEST_CASE(closed_port_is_unavailable) {
  HttpClient client;
  HttpCall call;
  call.url = "http://127.0.0.1:" + std::to_string(ClosedPort()) + "/x";
  auto result = client.Send(call);
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(static_cast<int>(result.status().code()) == static_cast<int>(Code::kUnavailable));
  BOOST_TEST(result.status().reason() == "connect");
  BOOST_TEST(!result.status().message().empty());
}

BOOST_AUTO_TEST_CASE(oversize_body_is_an_error) {
  TinyHttpServer server;
  HttpClient client;
  HttpCall call;
  call.method = "GET";
  call.url = server.Url("/big");
  call.max_response_bytes = TinyHttpServer::kBigBodyBytes - 1;
  auto result = client.Send(call);
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(result.status().reason() == "response_too_large");

  // Without Content-Length the limit must hold while the body streams in.
  call.url = server.Url("/big-unsized");
  auto unsized = client.Send(call);
  BOOST_REQUIRE(!unsized.ok());
  BOOST_TEST(unsized.status().reason() == "response_too_large");

  call.url = server.Url("/big");
  call.max_response_bytes = TinyHttpServer::kBigBodyBytes;
  auto exact = client.Send(call);
  BOOST_REQUIRE(exact.ok());
  BOOST_TEST(exact->body.size() == TinyHttpServer::kBigBodyBytes);
}

BOOST_AUTO_TEST_CASE(unknown_method_is_refused) {
  HttpClient client;
  HttpCall call;
  call.method = "PATCH";
  call.url = "http://127.0.0.1:1/";
  auto result = client.Send(call);
  BOOST_REQUIRE(!result.ok());
  BOOST_TEST(result.status().reason() == "bad_method");
}

BOOST_AUTO_TEST_CASE(thread_client_is_per_thread) {
  HttpClient* mine = &ThreadHttpClient();
  BOOST_TEST(mine == &ThreadHttpClient());
  HttpClient* other = nullptr;
  std::thread([&other] { other = &ThreadHttpClient(); }).join();
  BOOST_TEST(mine != other);
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace chatd
