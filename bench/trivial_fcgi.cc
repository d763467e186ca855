// trivial_fcgi: the FastCGI ceiling of `make bench`. A worker process with
// chatd's threading model (src/fcgi_server.cc) and none of its work: T threads
// wait in epoll (EPOLLEXCLUSIVE) on the listening socket that spawn-fcgi put on
// fd 0, call FCGX_Accept_r, read the whole body, and answer a fixed small JSON.
// Run it exactly like chatd: spawn-fcgi -n -s SOCK -- multiwatch -f N -- trivial_fcgi,
// with CHATD_THREADS=T. Whatever chatd does beyond this costs what the
// benchmark's chat figures lose against this one.
#include <fcgiapp.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kListenFd = 0;  // where spawn-fcgi puts the socket
constexpr int kDefaultThreads = 8;
constexpr int kMaxThreads = 1024;  // chatd's own bound on CHATD_THREADS
constexpr int kReadChunk = 16 * 1024;
// chatd refuses larger bodies; the ceiling should not read more than it would.
constexpr long kMaxBodyBytes = 64 * 1024;
constexpr char kReply[] =
    "Status: 200 OK\r\n"
    "Content-Type: application/json\r\n"
    "Content-Length: 18\r\n"
    "Cache-Control: no-store\r\n"
    "\r\n"
    "{\"response\":\"ok\"}\n";

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Owns an initialised FCGX_Request.
class Request {
 public:
  Request() = default;
  ~Request() {
    if (initialised_) FCGX_Free(&req_, 1);
  }
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  bool Init(int listen_fd) {
    initialised_ = FCGX_InitRequest(&req_, listen_fd, 0) == 0;
    return initialised_;
  }
  FCGX_Request* get() { return &req_; }

 private:
  FCGX_Request req_{};
  bool initialised_ = false;
};

int ThreadsFromEnv() {
  const char* text = std::getenv("CHATD_THREADS");
  if (text == nullptr || *text == '\0') return kDefaultThreads;
  char* end = nullptr;
  long n = std::strtol(text, &end, 10);
  if (*end != '\0' || n < 1 || n > kMaxThreads) return -1;
  return static_cast<int>(n);
}

// Reads and drops the body, as chatd reads it (bounded by CONTENT_LENGTH).
void DrainBody(FCGX_Request& req) {
  const char* length_text = FCGX_GetParam("CONTENT_LENGTH", req.envp);
  if (length_text == nullptr) return;
  char* end = nullptr;
  long length = std::strtol(length_text, &end, 10);
  if (*end != '\0' || length <= 0 || length > kMaxBodyBytes) return;
  std::string body(static_cast<size_t>(length), '\0');
  long got = 0;
  while (got < length) {
    int want = static_cast<int>(std::min<long>(length - got, kReadChunk));
    int n = FCGX_GetStr(body.data() + got, want, req.in);
    if (n <= 0) break;
    got += n;
  }
}

void Serve(int stop_fd) {
  Fd ep(epoll_create1(EPOLL_CLOEXEC));
  if (ep.get() < 0) {
    std::fprintf(stderr, "trivial_fcgi: epoll_create1: %s\n", std::strerror(errno));
    return;
  }
  epoll_event listen_ev{};
  listen_ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  listen_ev.data.fd = kListenFd;
  epoll_event stop_ev{};
  stop_ev.events = EPOLLIN;
  stop_ev.data.fd = stop_fd;
  if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, kListenFd, &listen_ev) != 0 ||
      epoll_ctl(ep.get(), EPOLL_CTL_ADD, stop_fd, &stop_ev) != 0) {
    std::fprintf(stderr, "trivial_fcgi: epoll_ctl: %s\n", std::strerror(errno));
    return;
  }
  Request request;
  if (!request.Init(kListenFd)) {
    std::fprintf(stderr, "trivial_fcgi: FCGX_InitRequest failed\n");
    return;
  }
  FCGX_Request& req = *request.get();
  for (;;) {
    epoll_event ready[2];
    int n = epoll_wait(ep.get(), ready, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    bool incoming = false;
    for (int i = 0; i < n; ++i) {
      if (ready[i].data.fd == stop_fd) return;
      if (ready[i].data.fd == kListenFd) incoming = true;
    }
    if (!incoming) continue;
    // A negative result is usually a sibling thread or process winning the
    // race for the connection; epoll tells us when to try again.
    if (FCGX_Accept_r(&req) < 0) continue;
    DrainBody(req);
    FCGX_PutStr(kReply, static_cast<int>(sizeof(kReply) - 1), req.out);
    FCGX_Finish_r(&req);
  }
}

}  // namespace

int main() {
  const int threads = ThreadsFromEnv();
  if (threads < 0) {
    std::fprintf(stderr, "trivial_fcgi: CHATD_THREADS must be 1..%d\n", kMaxThreads);
    return 2;
  }
  // As in chatd: only the main thread takes the stop signals multiwatch sends.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGUSR1);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  int listening = 0;
  socklen_t len = sizeof(listening);
  if (getsockopt(kListenFd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) {
    std::fprintf(stderr, "trivial_fcgi: fd 0 is not a listening socket: run it under spawn-fcgi\n");
    return 1;
  }
  if (FCGX_Init() != 0) {
    std::fprintf(stderr, "trivial_fcgi: FCGX_Init failed\n");
    return 1;
  }
  int flags = fcntl(kListenFd, F_GETFL);
  if (flags < 0 || fcntl(kListenFd, F_SETFL, flags | O_NONBLOCK) != 0) {
    std::fprintf(stderr, "trivial_fcgi: fcntl: %s\n", std::strerror(errno));
    return 1;
  }
  Fd stop(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (stop.get() < 0) {
    std::fprintf(stderr, "trivial_fcgi: eventfd: %s\n", std::strerror(errno));
    return 1;
  }

  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) workers.emplace_back(Serve, stop.get());

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  uint64_t one = 1;
  // The counter stays non-zero, so every thread sees the eventfd readable.
  [[maybe_unused]] ssize_t written = ::write(stop.get(), &one, sizeof(one));
  for (auto& t : workers) t.join();
  return 0;
}
