// A small, thread-safe Redis client over hiredis.
//
// hiredis contexts are not thread-safe and are useless after any error, so the
// client keeps a pool of connections: a thread borrows one per call, and a
// connection that saw an error is dropped instead of returned. Reconnection is
// therefore automatic: the next call dials again.
//
// hiredis writes with write(2): the process must ignore SIGPIPE before it uses
// this client, or a write to a connection Redis closed kills it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/status.h"

struct redisContext;
struct redisReplyObjectFunctions;

namespace chatd {

// A reply, as hiredis builds it for chatd (RedisReplyFunctions): callers
// never touch hiredis structs.
struct RedisValue {
  enum class Type { kNil, kInteger, kString, kStatus, kArray, kError };
  Type type = Type::kNil;
  int64_t integer = 0;
  std::string str;  // kString, kStatus, kError
  std::vector<RedisValue> elements;

  bool is_nil() const { return type == Type::kNil; }
  bool is_error() const { return type == Type::kError; }
};

// hiredis reader functions that build each reply as a RedisValue (the
// reader's reply is then a RedisValue* that the caller deletes). Every
// connection of RedisClient reads with them; exposed for tests.
redisReplyObjectFunctions* RedisReplyFunctions();

// Error replies that mean "Redis cannot serve right now, the command did not
// run" (LOADING after a restart, BUSY while a script runs, MASTERDOWN,
// TRYAGAIN...), as opposed to "this command is wrong": retrying later helps.
bool IsTransientRedisError(std::string_view error_reply);
// The Status for an error reply `error_reply` to `what`: kUnavailable with the
// reason "redis_loading" (LOADING), "redis_busy" (BUSY), "redis_unavailable"
// (the other transient ones) or "redis_error". Only the error's first word is
// quoted: the rest may quote arguments or script internals.
Status RedisReplyError(std::string_view error_reply, std::string_view what);

// A Lua script known by its text; the client sends EVALSHA and falls back to
// EVAL when the server answers NOSCRIPT (after a restart or SCRIPT FLUSH).
class RedisScript {
 public:
  explicit RedisScript(std::string source);
  const std::string& source() const { return source_; }
  const std::string& sha1() const { return sha1_; }  // lower-case hex, as SCRIPT LOAD returns it

 private:
  std::string source_;
  std::string sha1_;
};

// A node's TCP address.
struct RedisAddress {
  std::string host;
  int port = 0;
  bool operator==(const RedisAddress&) const = default;
};

struct RedisOptions {
  std::string host = "127.0.0.1";  // a name, an address, or a Unix socket path (starts with '/')
  int port = 6379;                 // ignored for a Unix socket
  int64_t timeout_ms = 200;        // connect and every command
  size_t max_idle = 64;            // idle connections kept for reuse
  // AUTH on every new connection when the password is set: with a username
  // as an ACL user (AUTH user pass), else as the default user (requirepass).
  // The password never appears in a Status or a log line.
  std::string username;
  std::string password;
  // How long a call keeps trying while Redis cannot serve it yet: while every
  // reply is a transient error (IsTransientRedisError: nothing ran) or the
  // connection is refused (nothing was sent). 0, the request path's setting,
  // answers at once; batch tools (chatd-cleanup) wait through a restart.
  // A command that may have run (a timeout, a dropped reply) is never resent.
  int64_t transient_wait_ms = 0;
  // Seed nodes of a Redis Cluster; when set, host and port are ignored and
  // every call is routed by its first key (redis_cluster.h).
  std::vector<RedisAddress> cluster_seeds;
  // Counted once per round trip (a pipeline is one) when not null: the
  // request path's figure in /metrics (metrics.h).
  std::atomic<uint64_t>* round_trips = nullptr;
};

class RedisCluster;

class RedisClient {
 public:
  explicit RedisClient(RedisOptions options);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // One command, arguments passed binary-safe. A Redis error reply is returned
  // as a value of type kError (the connection stays usable); only transport
  // failures (connect, timeout, protocol) are a non-ok Result (kUnavailable,
  // reason "redis_unavailable"). Messages never contain arguments.
  Result<RedisValue> Command(const std::vector<std::string_view>& argv);

  // Runs a script in one round trip (two only after NOSCRIPT). `may_have_run`,
  // when given, tells a failed call apart: false when nothing reached Redis
  // (no connection could be made), true once the command was handed to a
  // connection, after which a transport error leaves unknown whether the
  // script ran.
  Result<RedisValue> Eval(const RedisScript& script, const std::vector<std::string_view>& keys,
                          const std::vector<std::string_view>& args, bool* may_have_run = nullptr);

  // One script run once per element of `calls` (keys, args), all in one round
  // trip (two only after NOSCRIPT); replies in order. Scripts of different
  // users stay separate calls, so each still touches one user's keys.
  struct ScriptCall {
    std::vector<std::string_view> keys;
    std::vector<std::string_view> args;
  };
  Result<std::vector<RedisValue>> EvalMany(const RedisScript& script, const std::vector<ScriptCall>& calls);

  // A script, then commands, in one round trip; replies in order, the
  // script's first. After NOSCRIPT the whole pipeline goes again with the
  // script's text (a second round trip), so the commands always run after the
  // script. Keep them reads of the script's slot: on a cluster this is two
  // calls, the script and then the commands.
  Result<std::vector<RedisValue>> EvalThen(const RedisScript& script, const std::vector<std::string_view>& keys,
                                           const std::vector<std::string_view>& args,
                                           const std::vector<std::vector<std::string_view>>& commands);

  // Several commands in one round trip; replies in order. `may_have_run` as
  // for Eval. On a cluster, one round trip per node the keys live on: keep one
  // pipeline to one user's keys (one slot).
  Result<std::vector<RedisValue>> Pipeline(const std::vector<std::vector<std::string_view>>& commands,
                                           bool* may_have_run = nullptr);

  const RedisOptions& options() const { return options_; }

  // PING on a new connection: ok when Redis answers and accepts our
  // credentials; else the reason ("redis_unavailable", "redis_auth_failed" for
  // refused credentials or NOAUTH) with a message that names the endpoint and
  // the variables to check. For a clear line at start-up; the request path
  // reports the same failure per request.
  Status CheckAccess();

 private:
  struct ContextDeleter {
    void operator()(redisContext* c) const;
  };
  using Context = std::unique_ptr<redisContext, ContextDeleter>;

  // Runs `attempt` (which sets `sent` once a command left this process) again
  // while transient_wait_ms allows and nothing can have run (see RedisOptions).
  template <typename Attempt>
  Result<std::vector<RedisValue>> Retrying(Attempt&& attempt);
  // Runs `exchange` (redisContext* -> Result<std::vector<RedisValue>>) on a
  // pooled connection, setting `sent` once a command may have left. The
  // connection goes back to the pool only when the whole exchange succeeded.
  template <typename Exchange>
  Result<std::vector<RedisValue>> OnConnection(bool& sent, Exchange&& exchange);
  Result<std::vector<RedisValue>> PipelineOnce(const std::vector<std::vector<std::string_view>>& commands,
                                               bool& sent);
  Result<std::vector<RedisValue>> EvalManyOnce(const RedisScript& script,
                                               const std::vector<std::vector<std::string_view>>& commands,
                                               bool& sent);
  // `commands` starts with the script's EVALSHA; it is made an EVAL on NOSCRIPT.
  Result<std::vector<RedisValue>> EvalThenOnce(const RedisScript& script,
                                               std::vector<std::vector<std::string_view>>& commands, bool& sent);
  Result<Context> Borrow();
  Result<Context> Connect() const;
  void Return(Context c);
  // Sends the commands on c and reads one reply each. On a transport error c
  // must not be returned to the pool.
  Result<std::vector<RedisValue>> RoundTrip(redisContext* c,
                                            const std::vector<std::vector<std::string_view>>& commands) const;
  Status TransportError(const redisContext* c, std::string_view what) const;
  Status AuthError(std::string_view redis_error) const;
  std::string Endpoint() const;

  RedisOptions options_;
  std::unique_ptr<RedisCluster> cluster_;  // set in cluster mode: every call goes through it
  std::mutex mu_;
  std::vector<Context> idle_;  // guarded by mu_
};

}  // namespace chatd
