#include "chatd/fcgi_server.h"

#include <fcgiapp.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "chatd/clock.h"
#include "chatd/log.h"
#include "observe.h"
#include "random_id.h"
#include "unique_fd.h"

namespace chatd {

namespace {

// Chunk for reading the body; the body itself is capped by max_body_bytes.
constexpr int kReadChunk = 16 * 1024;
// After an accept error that is not "someone else took it", pause before
// retrying so that e.g. EMFILE does not spin a core.
constexpr int kAcceptErrorPauseMs = 50;

std::string Param(FCGX_Request& req, const char* name) {
  // Copied: libfcgi frees params at the next Accept/Finish.
  const char* v = FCGX_GetParam(name, req.envp);
  return v ? std::string(v) : std::string();
}

// Returns whether nginx's whole request was read: the body and the end of the
// input stream. Only then may the connection close without waiting for nginx.
bool ReadRequest(FCGX_Request& req, size_t max_body, HttpRequest& out) {
  out.method = Param(req, "REQUEST_METHOD");
  out.path = Param(req, "DOCUMENT_URI");
  if (out.path.empty()) {
    out.path = Param(req, "REQUEST_URI");
    if (auto q = out.path.find('?'); q != std::string::npos) out.path.resize(q);
  }
  out.query = Param(req, "QUERY_STRING");
  out.content_type = Param(req, "CONTENT_TYPE");
  out.authorization = Param(req, "HTTP_AUTHORIZATION");
  out.remote_addr = Param(req, "REMOTE_ADDR");
  if (const char* key = FCGX_GetParam("HTTP_IDEMPOTENCY_KEY", req.envp)) out.idempotency_key = key;
  out.accept = Param(req, "HTTP_ACCEPT");
  out.request_id = Param(req, "REQUEST_ID");
  if (out.request_id.empty()) out.request_id = RandomHexId();

  std::string length_text = Param(req, "CONTENT_LENGTH");
  size_t length = 0;
  if (!length_text.empty() && !ParseContentLength(length_text, length)) {
    out.body_unreadable = true;  // never read a body of unknown size
    return false;
  }
  if (length > max_body) {
    out.body_too_large = true;
    return false;
  }
  out.body.resize(length);
  size_t got = 0;
  while (got < length) {
    int want = static_cast<int>(std::min<size_t>(length - got, kReadChunk));
    int n = FCGX_GetStr(out.body.data() + got, want, req.in);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  if (got != length) {
    out.body.clear();
    out.body_unreadable = true;  // truncated: the client went away mid-body
    return false;
  }
  // nginx ends the input with an empty record, sent with the body; a byte
  // here instead would be a body longer than CONTENT_LENGTH.
  return FCGX_GetChar(req.in) == EOF;
}

// The CGI response head; a streamed reply has no length.
std::string Head(const HttpReply& reply, bool with_length) {
  std::string head;
  head.reserve(256);
  head.append("Status: ").append(std::to_string(reply.status)).append(" ");
  head.append(HttpReasonPhrase(reply.status)).append("\r\n");
  head.append("Content-Type: ").append(reply.content_type).append("\r\n");
  if (with_length && !reply.stream) {
    head.append("Content-Length: ").append(std::to_string(reply.body.size())).append("\r\n");
  }
  head.append("Cache-Control: no-store\r\n");
  for (const auto& [name, value] : reply.headers) head.append(name).append(": ").append(value).append("\r\n");
  head.append("\r\n");
  return head;
}

void WriteReply(FCGX_Request& req, const HttpReply& reply) {
  std::string head = Head(reply, /*with_length=*/true);
  // A failed write means nginx went away; there is nobody left to tell.
  FCGX_PutStr(head.data(), static_cast<int>(head.size()), req.out);
  if (reply.stream) {
    reply.stream([&req](std::string_view piece) {
      if (FCGX_PutStr(piece.data(), static_cast<int>(piece.size()), req.out) < 0) return false;
      return FCGX_FFlush(req.out) == 0 && FCGX_GetError(req.out) == 0;
    });
    return;
  }
  FCGX_PutStr(reply.body.data(), static_cast<int>(reply.body.size()), req.out);
}

// Server-sent events over the request's FastCGI connection. nginx closes that
// connection when its client leaves (fastcgi_ignore_client_abort is off), so
// a failed write or flush, or a hang-up seen by poll(), means the client is gone.
class FcgiStream : public ResponseStream {
 public:
  explicit FcgiStream(FCGX_Request& req) : req_(req) {}

  bool Start(const HttpReply& head) override {
    std::string text = Head(head, /*with_length=*/false);
    return Write(text);
  }

  bool Write(std::string_view bytes) override {
    if (gone_) return false;
    if (FCGX_PutStr(bytes.data(), static_cast<int>(bytes.size()), req_.out) < 0 || FCGX_FFlush(req_.out) < 0 ||
        FCGX_GetError(req_.out) != 0) {
      gone_ = true;
    }
    return !gone_;
  }

  bool ClientGone() override {
    if (gone_) return true;
    // Asked on every read from the model: one poll() per interval is plenty
    // to notice a departure well within a second.
    auto now = SteadyClock::now();
    if (now - last_check_ < kClientCheckInterval) return false;
    last_check_ = now;
    pollfd p{req_.ipcFd, POLLRDHUP, 0};
    if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) gone_ = true;
    return gone_;
  }

 private:
  static constexpr std::chrono::milliseconds kClientCheckInterval{100};
  FCGX_Request& req_;
  bool gone_ = false;
  SteadyClock::time_point last_check_{};
};

}  // namespace

FcgiServer::FcgiServer(int listen_fd, int threads, size_t max_body_bytes, Handler handler, Metrics* metrics)
    : listen_fd_(listen_fd),
      threads_(threads),
      max_body_bytes_(max_body_bytes),
      handler_(std::move(handler)),
      metrics_(metrics) {}

FcgiServer::~FcgiServer() {
  Stop();
  Join();
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

Status FcgiServer::Start() {
  int type = 0;
  socklen_t len = sizeof(type);
  int listening = 0;
  socklen_t llen = sizeof(listening);
  if (getsockopt(listen_fd_, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
      getsockopt(listen_fd_, SOL_SOCKET, SO_ACCEPTCONN, &listening, &llen) != 0 || !listening) {
    return Status(Code::kInternal, "no_listen_socket",
                  "fd " + std::to_string(listen_fd_) +
                      " is not a listening socket: run chatd under spawn-fcgi (see docs/deployment.md)");
  }
  if (FCGX_Init() != 0) return Internal("fcgi_init", "FCGX_Init failed");

  // Shared with the sibling processes; they all want it non-blocking, and
  // accepted connections do not inherit the flag on Linux.
  int flags = fcntl(listen_fd_, F_GETFL);
  if (flags < 0 || fcntl(listen_fd_, F_SETFL, flags | O_NONBLOCK) != 0) {
    return Internal("fcntl", std::string("cannot make the listening socket non-blocking: ") + strerror(errno));
  }
  stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (stop_fd_ < 0) return Internal("eventfd", std::string("eventfd: ") + strerror(errno));

  for (int i = 0; i < threads_; ++i) workers_.emplace_back([this] { ThreadMain(); });
  return Status::Ok();
}

void FcgiServer::Stop() {
  if (stop_fd_ < 0) return;
  uint64_t one = 1;
  // The counter stays non-zero, so the eventfd stays readable for every thread.
  [[maybe_unused]] ssize_t n = ::write(stop_fd_, &one, sizeof(one));
}

void FcgiServer::Join() {
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
}

void FcgiServer::ThreadMain() {
  UniqueFd ep(epoll_create1(EPOLL_CLOEXEC));
  if (!ep.valid()) {
    LogError("fcgi_thread").Str("error", strerror(errno)).Emit();
    return;
  }
  epoll_event listen_ev{};
  listen_ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  listen_ev.data.fd = listen_fd_;
  epoll_event stop_ev{};
  stop_ev.events = EPOLLIN;
  stop_ev.data.fd = stop_fd_;
  if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, listen_fd_, &listen_ev) != 0 ||
      epoll_ctl(ep.get(), EPOLL_CTL_ADD, stop_fd_, &stop_ev) != 0) {
    LogError("fcgi_thread").Str("error", strerror(errno)).Emit();
    return;
  }

  FCGX_Request req;
  if (FCGX_InitRequest(&req, listen_fd_, 0) != 0) {
    LogError("fcgi_thread").Str("error", "FCGX_InitRequest failed").Emit();
    return;
  }

  for (;;) {
    epoll_event ready[2];
    int n = epoll_wait(ep.get(), ready, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      LogError("fcgi_thread").Str("error", strerror(errno)).Emit();
      break;
    }
    bool stop = false, incoming = false;
    for (int i = 0; i < n; ++i) {
      if (ready[i].data.fd == stop_fd_) stop = true;
      if (ready[i].data.fd == listen_fd_) incoming = true;
    }
    if (stop) break;
    if (!incoming) continue;

    int rc = FCGX_Accept_r(&req);
    if (rc < 0) {
      // Another thread or process took the connection first.
      if (rc == -EAGAIN || rc == -EWOULDBLOCK || rc == -EINTR) continue;
      LogWarn("accept_failed").Int("rc", rc).Emit();
      usleep(kAcceptErrorPauseMs * 1000);
      continue;
    }

    auto started = SteadyClock::now();
    HttpRequest http;
    const bool read_whole = ReadRequest(req, max_body_bytes_, http);
    RequestContext ctx;
    ctx.started = started;
    ctx.request_id = http.request_id;
    ctx.method = http.method;
    ctx.path = http.path;
    ctx.remote_addr = http.remote_addr;
    FcgiStream stream(req);
    HttpReply reply = handler_(http, ctx, stream);

    // Observed before the reply is written (observe.h says why), so the
    // latency ends when the answer is ready, not when nginx has it.
    ctx.status = reply.status;
    ctx.latency = SteadyClock::now() - started;
    Observe(ctx, metrics_);

    if (!reply.streamed) WriteReply(req, reply);
    // libfcgi's close shuts down our side and then waits, up to 2 s, for
    // nginx to close its own, reading and dropping what it still sends: input
    // left unread can turn a close into a reset that loses the reply. With the
    // whole request read there is nothing left to drop, so the connection
    // closes at once (detached: no shutdown and no wait), which saves the
    // thread a wake-up and frees it for the next request sooner.
    if (read_whole) FCGX_Detach(&req);
    FCGX_Finish_r(&req);
  }
  FCGX_Free(&req, 1);
}

}  // namespace chatd
