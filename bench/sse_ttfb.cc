// sse_ttfb: the stream benchmark's client. `--connections` closed loops, each
// sending one streamed request over HTTP/1.0 after another for a fixed time,
// and recording for each the time from writing the request to the first byte
// of the first event that carries text (`--first`), and whether the end marker
// (`--end`) came before the server closed.
//
// Why not the bench's Python client: at 64 streams it shares the two cores with
// the server under test, and an asyncio loop that is busy with other sockets
// notices a first delta late; that lateness was counted as chatd's. One epoll
// thread here costs a few microseconds per read.
//
//   sse_ttfb --port P [--host 127.0.0.1] --path /api/chat --connections C --duration-s S
//            --body TEMPLATE --first MARKER --end MARKER [--header "Name: value"]...
//            [--users N] [--timeout-s T]
//
// TEMPLATE may hold {w} (the connection), {i} (its request number) and {u}
// ((w * 7919 + i) mod N, a user drawn from N). Output on stdout, one JSON
// object: {"requests":[[w,i,ok,ttfb_ms],...]}; ttfb_ms is null when no first
// marker came. Exit 2 on a usage error.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "bench_util.h"

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kUserStride = 7919;  // as the Python bench: spreads one connection's users
constexpr size_t kReadChunk = 64 * 1024;
constexpr size_t kMarkerWindow = 4096;  // bytes kept to find a marker split across reads
constexpr int kEpollTimeoutMs = 50;
constexpr int kMaxEvents = 256;

struct Options {
  std::string host = "127.0.0.1";
  int64_t port = 0;
  std::string path = "/api/chat";
  int64_t connections = 1;
  int64_t duration_s = 10;
  int64_t timeout_s = 60;
  int64_t users = 2000;
  std::string body;
  std::string first;
  std::string end;
  std::vector<std::string> headers;
};

struct Result {
  int w;
  long i;
  bool ok;
  double ttfb_ms;  // < 0: no first marker
};

struct Conn {
  int w = 0;
  long i = 0;
  int fd = -1;
  std::string out;
  size_t sent = 0;
  std::string seen;  // the tail of what was read, for the markers
  Clock::time_point started;
  double ttfb_ms = -1;
  bool ended = false;
};

std::string Replace(std::string s, std::string_view key, const std::string& value) {
  for (size_t at = s.find(key); at != std::string::npos; at = s.find(key, at + value.size())) {
    s.replace(at, key.size(), value);
  }
  return s;
}

std::string Request(const Options& o, int w, long i) {
  std::string body = Replace(o.body, "{w}", std::to_string(w));
  body = Replace(body, "{i}", std::to_string(i));
  body = Replace(body, "{u}", std::to_string((static_cast<int64_t>(w) * kUserStride + i) % o.users));
  std::string head = "POST " + o.path + " HTTP/1.0\r\nHost: bench\r\nContent-Type: application/json\r\n";
  for (const auto& h : o.headers) head += h + "\r\n";
  return head + "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

bool Open(const Options& o, int epfd, Conn& c) {
  c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c.fd < 0) return false;
  int one = 1;
  setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(o.port));
  inet_pton(AF_INET, o.host.c_str(), &addr.sin_addr);
  c.out = Request(o, c.w, c.i);
  c.sent = 0;
  c.seen.clear();
  c.ttfb_ms = -1;
  c.ended = false;
  c.started = Clock::now();
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT;
  ev.data.ptr = &c;
  if ((connect(c.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 && errno != EINPROGRESS) ||
      epoll_ctl(epfd, EPOLL_CTL_ADD, c.fd, &ev) != 0) {
    close(c.fd);
    c.fd = -1;
    return false;
  }
  return true;
}

// Writes what is left of the request; then only reading matters.
bool Send(int epfd, Conn& c) {
  while (c.sent < c.out.size()) {
    ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN;
    c.sent += static_cast<size_t>(n);
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &c;
  return epoll_ctl(epfd, EPOLL_CTL_MOD, c.fd, &ev) == 0;
}

// Reads what is there. Returns false when the request is over (closed, ended or failed).
bool Receive(const Options& o, Conn& c) {
  char buf[kReadChunk];
  for (;;) {
    ssize_t n = recv(c.fd, buf, sizeof buf, 0);
    if (n == 0) return false;
    if (n < 0) return errno == EAGAIN;
    auto now = Clock::now();
    c.seen.append(buf, static_cast<size_t>(n));
    if (c.ttfb_ms < 0 && c.seen.find(o.first) != std::string::npos) {
      c.ttfb_ms = std::chrono::duration<double, std::milli>(now - c.started).count();
    }
    if (c.ttfb_ms >= 0 && c.seen.find(o.end) != std::string::npos) {
      c.ended = true;
      return false;
    }
    if (c.seen.size() > kMarkerWindow) c.seen.erase(0, c.seen.size() - kMarkerWindow);
  }
}

void Finish(int epfd, Conn& c, std::vector<Result>& results) {
  epoll_ctl(epfd, EPOLL_CTL_DEL, c.fd, nullptr);
  close(c.fd);
  c.fd = -1;
  results.push_back({c.w, c.i, c.ended, c.ttfb_ms});
  ++c.i;
}

bool ParseArgs(int argc, char** argv, Options& o) {
  const bench::IntFlag<int64_t> ints[] = {
      {"--port", 1, 65535, &o.port},          {"--connections", 1, 100000, &o.connections},
      {"--duration-s", 1, 86400, &o.duration_s}, {"--timeout-s", 1, 3600, &o.timeout_s},
      {"--users", 1, 1000000000, &o.users},
  };
  for (int k = 1; k + 1 < argc; k += 2) {
    std::string_view flag = argv[k];
    const char* v = argv[k + 1];
    const bench::FlagParse number = bench::ParseIntFlag(flag, v, ints);
    if (number == bench::FlagParse::kBad) return false;
    if (number == bench::FlagParse::kSet) continue;
    if (flag == "--host") {
      o.host = v;
    } else if (flag == "--path") {
      o.path = v;
    } else if (flag == "--body") {
      o.body = v;
    } else if (flag == "--first") {
      o.first = v;
    } else if (flag == "--end") {
      o.end = v;
    } else if (flag == "--header") {
      o.headers.emplace_back(v);
    } else {
      return false;
    }
  }
  return argc % 2 == 1 && o.port > 0 && !o.body.empty() && !o.first.empty() && !o.end.empty();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!ParseArgs(argc, argv, o)) {
    std::fprintf(stderr,
                 "usage: sse_ttfb --port P [--host H] [--path /api/chat] --connections C --duration-s S "
                 "--body TEMPLATE --first MARKER --end MARKER [--header 'N: v']... [--users N] [--timeout-s T]\n");
    return 2;
  }
  int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) return 1;
  std::vector<Conn> conns(static_cast<size_t>(o.connections));
  std::vector<Result> results;
  const auto stop_at = Clock::now() + std::chrono::seconds(o.duration_s);
  const auto timeout = std::chrono::seconds(o.timeout_s);
  int open = 0;
  for (int w = 0; w < static_cast<int>(o.connections); ++w) {
    conns[static_cast<size_t>(w)].w = w;
    if (!Open(o, epfd, conns[static_cast<size_t>(w)])) {
      std::perror("sse_ttfb: connect");
      return 1;
    }
    ++open;
  }
  epoll_event events[kMaxEvents];
  while (open > 0) {
    int n = epoll_wait(epfd, events, kMaxEvents, kEpollTimeoutMs);
    for (int k = 0; k < n; ++k) {
      Conn& c = *static_cast<Conn*>(events[k].data.ptr);
      bool alive = true;
      if ((events[k].events & EPOLLOUT) && c.sent < c.out.size()) alive = Send(epfd, c);
      if (alive && (events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) alive = Receive(o, c);
      if (alive) continue;
      Finish(epfd, c, results);
      if (Clock::now() < stop_at && Open(o, epfd, c)) continue;
      --open;
    }
    // A request that outlives the timeout counts as failed; the loop goes on.
    auto now = Clock::now();
    for (auto& c : conns) {
      if (c.fd >= 0 && now - c.started > timeout) {
        Finish(epfd, c, results);
        if (!(now < stop_at && Open(o, epfd, c))) --open;
      }
    }
  }
  close(epfd);
  std::string out = "{\"requests\":[";
  for (size_t k = 0; k < results.size(); ++k) {
    const Result& r = results[k];
    char row[96];
    if (r.ttfb_ms >= 0) {
      std::snprintf(row, sizeof row, "%s[%d,%ld,%s,%.3f]", k ? "," : "", r.w, r.i, r.ok ? "true" : "false",
                    r.ttfb_ms);
    } else {
      std::snprintf(row, sizeof row, "%s[%d,%ld,%s,null]", k ? "," : "", r.w, r.i, r.ok ? "true" : "false");
    }
    out += row;
  }
  out += "]}\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}
