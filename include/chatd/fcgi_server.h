// The FastCGI side of a worker process: T threads accepting on the listening
// socket that spawn-fcgi put on fd 0 (shared with the other worker processes),
// each turning a request into an HttpRequest, calling the handler and writing
// the HttpReply back.
//
// Stopping: libfcgi's own shutdown flag reaches only the thread that takes the
// signal, while the others stay blocked in accept() (libfcgi's os_unix.c). So the
// threads never block in accept(): the listening socket is made non-blocking
// and each thread waits in epoll for either a connection (EPOLLEXCLUSIVE, so a
// connection wakes one thread, not all) or the stop eventfd. Stop() makes the
// eventfd readable: idle threads return at once, busy ones finish their request
// first. Nothing is done to the shared socket, so sibling processes are
// unaffected.
#pragma once

#include <functional>
#include <thread>
#include <vector>

#include "chatd/http.h"
#include "chatd/metrics.h"
#include "chatd/request_context.h"
#include "chatd/status.h"

namespace chatd {

class FcgiServer {
 public:
  // The ResponseStream is for answers sent piece by piece; a handler that
  // used it returns a reply with `streamed` set.
  // The handler fills the RequestContext as it goes; the server observes it
  // (observe.h) once the reply is ready, before writing it.
  using Handler = std::function<HttpReply(const HttpRequest&, RequestContext&, ResponseStream&)>;

  // `metrics` (may be null) receives every request's counters.
  FcgiServer(int listen_fd, int threads, size_t max_body_bytes, Handler handler, Metrics* metrics);
  ~FcgiServer();
  FcgiServer(const FcgiServer&) = delete;
  FcgiServer& operator=(const FcgiServer&) = delete;

  // Starts the threads. Fails if fd `listen_fd` is not a listening socket.
  Status Start();
  // Asks every thread to stop after its current request. Thread-safe.
  void Stop();
  // Waits for all threads to end.
  void Join();

 private:
  void ThreadMain();

  int listen_fd_;
  int threads_;
  size_t max_body_bytes_;
  Handler handler_;
  Metrics* metrics_;
  int stop_fd_ = -1;  // eventfd, readable once Stop() was called
  std::vector<std::thread> workers_;
};

}  // namespace chatd
