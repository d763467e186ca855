#include "chatd/redis.h"

#include <hiredis/hiredis.h>
#include <openssl/sha.h>
#include <poll.h>
#include <sys/time.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "redis_cluster.h"

namespace chatd {

namespace {

// hiredis builds every reply straight into RedisValues (RedisReplyFunctions):
// its own reply structs would cost a second allocation and copy per element,
// and a pass to free them, on every round trip. A child is built in place in
// its parent's elements, which are sized once when the array header is read,
// so the addresses hiredis keeps for nested arrays stay valid. hiredis frees
// only the root (on a protocol error, or a reply nobody asked for), and the
// root owns its children. Nothing may throw through hiredis's C frames: an
// allocation failure returns null, which hiredis reports as out of memory.
RedisValue* NewReplyValue(const redisReadTask* task) {
  if (task->parent == nullptr) return new RedisValue;
  auto* parent = static_cast<RedisValue*>(task->parent->obj);
  return &parent->elements[static_cast<size_t>(task->idx)];
}

// Builds the task's value with `fill`; null, hiredis's out of memory, when
// anything throws.
template <typename Fill>
void* BuildValue(const redisReadTask* task, Fill&& fill) noexcept {
  try {
    RedisValue* v = NewReplyValue(task);
    fill(*v);
    return v;
  } catch (...) {
    return nullptr;
  }
}

void* CreateStringValue(const redisReadTask* task, char* str, size_t len) noexcept {
  return BuildValue(task, [&](RedisValue& v) {
    v.type = task->type == REDIS_REPLY_ERROR    ? RedisValue::Type::kError
             : task->type == REDIS_REPLY_STATUS ? RedisValue::Type::kStatus
                                                : RedisValue::Type::kString;
    v.str.assign(str, len);
  });
}

void* CreateArrayValue(const redisReadTask* task, int elements) noexcept {
  return BuildValue(task, [&](RedisValue& v) {
    v.type = RedisValue::Type::kArray;
    v.elements.resize(static_cast<size_t>(std::max(elements, 0)));
  });
}

void* CreateIntegerValue(const redisReadTask* task, long long value) noexcept {
  return BuildValue(task, [&](RedisValue& v) {
    v.type = RedisValue::Type::kInteger;
    v.integer = value;
  });
}

void* CreateNilValue(const redisReadTask* task) noexcept {
  return BuildValue(task, [](RedisValue&) {});  // a new RedisValue is nil
}

void FreeValue(void* value) noexcept { delete static_cast<RedisValue*>(value); }

// The commands in Redis's protocol, in one buffer sized up front. hiredis's
// own formatting (redisAppendCommandArgv) builds each command with a
// printf-style call per argument and then copies it again into its output
// buffer; a chat's record carries its embedding and both texts, and an
// indexer batch the hot set's records.
void AppendResp(std::string& out, char kind, size_t n) {
  char digits[24];
  const auto end = std::to_chars(digits, digits + sizeof(digits), n).ptr;
  out.push_back(kind);
  out.append(digits, end);
  out.append("\r\n");
}

std::string EncodeCommands(const std::vector<std::vector<std::string_view>>& commands) {
  constexpr size_t kHeaderBytes = 1 + 20 + 2;  // a kind, up to 20 digits, CRLF
  size_t size = 0;
  for (const auto& argv : commands) {
    size += kHeaderBytes;
    for (std::string_view arg : argv) size += kHeaderBytes + arg.size() + 2;
  }
  std::string out;
  out.reserve(size);
  for (const auto& argv : commands) {
    AppendResp(out, '*', argv.size());
    for (std::string_view arg : argv) {
      AppendResp(out, '$', arg.size());
      out.append(arg).append("\r\n");
    }
  }
  return out;
}

redisReplyObjectFunctions reply_functions = {CreateStringValue, CreateArrayValue, CreateIntegerValue, CreateNilValue,
                                             FreeValue};

// SO_RCVTIMEO makes a blocking read fail with EAGAIN; hiredis reports it as this
// strerror text, which would puzzle whoever reads the log.
constexpr std::string_view kTimeoutErrstr = "Resource temporarily unavailable";
constexpr std::string_view kNoScriptPrefix = "NOSCRIPT";

// Only the first word of an error reply (WRONGPASS, NOAUTH, NOPERM...): the
// rest can quote arguments.
std::string_view ErrorCode(std::string_view redis_error) { return redis_error.substr(0, redis_error.find(' ')); }

// Replies with which Redis refuses a command it did not run and would run
// later: loading its data, a script running too long, a replica or cluster
// without its primary, out of memory under noeviction, a failed snapshot.
constexpr std::array<std::string_view, 9> kTransientErrors = {
    "LOADING", "BUSY", "MASTERDOWN", "READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"};
// Pauses between attempts while Redis cannot serve (transient_wait_ms > 0):
// short at first (a BUSY script usually ends soon), then at most a second.
constexpr std::chrono::milliseconds kFirstTransientPause{50};
constexpr std::chrono::milliseconds kMaxTransientPause{1000};

// Redis does not know the script (a restart, SCRIPT FLUSH): it did not run.
bool IsNoScript(const RedisValue& v) {
  return v.is_error() && std::string_view(v.str).substr(0, kNoScriptPrefix.size()) == kNoScriptPrefix;
}

// EVALSHA sha numkeys keys... args...; views of its arguments.
std::vector<std::string_view> EvalShaCommand(const RedisScript& script, std::string_view num_keys,
                                             const std::vector<std::string_view>& keys,
                                             const std::vector<std::string_view>& args) {
  std::vector<std::string_view> argv;
  argv.reserve(3 + keys.size() + args.size());
  argv.push_back("EVALSHA");
  argv.push_back(script.sha1());
  argv.push_back(num_keys);
  argv.insert(argv.end(), keys.begin(), keys.end());
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

bool AllTransient(const std::vector<RedisValue>& values) {
  return !values.empty() && std::all_of(values.begin(), values.end(), [](const RedisValue& v) {
    return v.is_error() && IsTransientRedisError(v.str);
  });
}

timeval ToTimeval(int64_t ms) {
  ms = std::max<int64_t>(ms, 1);  // a zero timeval would mean "block forever"
  timeval tv;
  tv.tv_sec = static_cast<time_t>(ms / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);
  return tv;
}

// An idle connection has nothing to read: readable means Redis closed it (a
// restart, `timeout` in redis.conf, CLIENT KILL) or sent something we never
// asked for. Either way it must not carry the next command, because a command
// sent into a dead socket fails only after it was sent, and then we could not
// know whether Redis ran it.
bool LooksHealthy(int fd) {
  pollfd p{};
  p.fd = fd;
  p.events = POLLIN;
  return ::poll(&p, 1, 0) == 0;
}

}  // namespace

bool IsTransientRedisError(std::string_view error_reply) {
  const std::string_view code = ErrorCode(error_reply);
  return std::find(kTransientErrors.begin(), kTransientErrors.end(), code) != kTransientErrors.end();
}

Status RedisReplyError(std::string_view error_reply, std::string_view what) {
  const std::string_view code = ErrorCode(error_reply);
  std::string message = std::string(what) + ": redis answered " + std::string(code);
  if (code == "LOADING") return Unavailable("redis_loading", message + " (it is loading its data after a restart)");
  if (code == "BUSY") return Unavailable("redis_busy", message + " (a script is running too long)");
  if (IsTransientRedisError(code)) return Unavailable("redis_unavailable", std::move(message));
  return Unavailable("redis_error", std::move(message));
}

redisReplyObjectFunctions* RedisReplyFunctions() { return &reply_functions; }

RedisScript::RedisScript(std::string source) : source_(std::move(source)) {
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(source_.data()), source_.size(), digest);
  static constexpr char kHex[] = "0123456789abcdef";
  sha1_.reserve(2 * SHA_DIGEST_LENGTH);
  for (unsigned char b : digest) {
    sha1_.push_back(kHex[b >> 4]);
    sha1_.push_back(kHex[b & 0xf]);
  }
}

void RedisClient::ContextDeleter::operator()(redisContext* c) const { redisFree(c); }

RedisClient::RedisClient(RedisOptions options) : options_(std::move(options)) {
  if (!options_.cluster_seeds.empty()) cluster_ = std::make_unique<RedisCluster>(options_);
}

RedisClient::~RedisClient() = default;

Status RedisClient::TransportError(const redisContext* c, std::string_view what) const {
  std::string detail;
  if (c == nullptr) {
    detail = "out of memory";
  } else if (std::string_view(c->errstr) == kTimeoutErrstr) {
    detail = "timed out after " + std::to_string(options_.timeout_ms) + " ms";
  } else if (c->errstr[0] != '\0') {
    detail = c->errstr;
  } else {
    detail = "error " + std::to_string(c->err);
  }
  std::string message = "redis ";
  message.append(Endpoint()).append(": ").append(what).append(": ").append(detail);
  return Unavailable("redis_unavailable", std::move(message));
}

std::string RedisClient::Endpoint() const {
  std::string endpoint = options_.host;
  if (endpoint.empty() || endpoint.front() != '/') endpoint += ":" + std::to_string(options_.port);
  return endpoint;
}

Status RedisClient::AuthError(std::string_view redis_error) const {
  std::string message = "redis ";
  message.append(Endpoint()).append(": credentials refused (").append(ErrorCode(redis_error));
  message.append("): check the username and the password file (CHATD_REDIS_USERNAME / CHATD_REDIS_PASSWORD_FILE, "
                 "or CHATD_RATE_REDIS_* for the counters)");
  return Unavailable("redis_auth_failed", std::move(message));
}

Status RedisClient::CheckAccess() {
  if (cluster_) return cluster_->CheckAccess();
  // Credentials are checked on a connection of its own, not one of the pool.
  Context checked;
  auto values = Retrying([&](bool& sent) -> Result<std::vector<RedisValue>> {
    auto c = Connect();
    if (!c.ok()) return c.status();
    sent = true;
    auto replies = RoundTrip(c->get(), {{"PING"}});
    if (replies.ok()) checked = std::move(*c);
    return replies;
  });
  if (!values.ok()) return values.status();
  const RedisValue& pong = values->front();
  if (pong.is_error()) {
    // NOAUTH: Redis wants a password we were not given.
    if (ErrorCode(pong.str) == "NOAUTH" || ErrorCode(pong.str) == "NOPERM") return AuthError(pong.str);
    return RedisReplyError(pong.str, "redis " + Endpoint() + ": PING");
  }
  Return(std::move(checked));
  return Status::Ok();
}

Result<RedisClient::Context> RedisClient::Connect() const {
  const timeval tv = ToTimeval(options_.timeout_ms);
  // hiredis sets TCP_NODELAY itself on TCP connections.
  redisContext* raw = !options_.host.empty() && options_.host.front() == '/'
                          ? redisConnectUnixWithTimeout(options_.host.c_str(), tv)
                          : redisConnectWithTimeout(options_.host.c_str(), options_.port, tv);
  Context c(raw);
  if (!c) return TransportError(nullptr, "connect");
  if (c->err) return TransportError(c.get(), "connect");
  c->reader->fn = RedisReplyFunctions();  // before the first reply: every reply is a RedisValue
  // The connect timeout does not cover commands: without this a hung Redis
  // would hold the request thread forever.
  if (redisSetTimeout(c.get(), tv) != REDIS_OK) return TransportError(c.get(), "set timeout");
  if (!options_.password.empty()) {
    // hiredis 0.14 has no AUTH of its own: send it as the connection's first
    // command. A refusal fails this connection (it is dropped, never pooled)
    // and says so; every later call dials and tries again, so fixing the
    // password file and restarting is all it takes.
    std::vector<std::string_view> auth = {"AUTH"};
    if (!options_.username.empty()) auth.push_back(options_.username);
    auth.push_back(options_.password);
    auto reply = RoundTrip(c.get(), {auth});
    if (!reply.ok()) return reply.status();
    if (reply->front().is_error()) return AuthError(reply->front().str);
  }
  return c;
}

Result<RedisClient::Context> RedisClient::Borrow() {
  for (;;) {
    Context c;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (idle_.empty()) break;
      c = std::move(idle_.back());  // the most recently used is the likeliest alive
      idle_.pop_back();
    }
    if (LooksHealthy(c->fd)) return c;
    // A stale one is freed here, outside the lock; try the next.
  }
  return Connect();
}

void RedisClient::Return(Context c) {
  if (!c || c->err) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.size() < options_.max_idle) idle_.push_back(std::move(c));
  // Otherwise c closes it; a parameter outlives the function's locals, so the
  // close happens after the unlock.
}

Result<std::vector<RedisValue>> RedisClient::RoundTrip(
    redisContext* c, const std::vector<std::vector<std::string_view>>& commands) const {
  if (options_.round_trips != nullptr) options_.round_trips->fetch_add(1, std::memory_order_relaxed);
  const std::string wire = EncodeCommands(commands);
  if (redisAppendFormattedCommand(c, wire.data(), wire.size()) != REDIS_OK) return TransportError(c, "send");
  std::vector<RedisValue> values;
  values.reserve(commands.size());
  for (size_t i = 0; i < commands.size(); ++i) {
    void* raw = nullptr;
    const int rc = redisGetReply(c, &raw);
    std::unique_ptr<RedisValue> reply(static_cast<RedisValue*>(raw));
    if (rc != REDIS_OK || !reply) return TransportError(c, "reply");
    values.push_back(std::move(*reply));
  }
  return values;
}

template <typename Attempt>
Result<std::vector<RedisValue>> RedisClient::Retrying(Attempt&& attempt) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.transient_wait_ms);
  std::chrono::milliseconds pause = kFirstTransientPause;
  for (;;) {
    bool sent = false;
    Result<std::vector<RedisValue>> r = attempt(sent);
    // Resend only what cannot have run: refused before it was sent, or
    // refused whole by a Redis that could not serve it.
    const bool nothing_ran = r.ok() ? AllTransient(*r) : !sent;
    if (!nothing_ran || options_.transient_wait_ms <= 0 || std::chrono::steady_clock::now() + pause > until) {
      return r;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, kMaxTransientPause);
  }
}

template <typename Exchange>
Result<std::vector<RedisValue>> RedisClient::OnConnection(bool& sent, Exchange&& exchange) {
  auto c = Borrow();
  if (!c.ok()) return c.status();
  sent = true;
  Result<std::vector<RedisValue>> values = exchange(c->get());
  if (values.ok()) Return(std::move(*c));  // else the connection is dropped with c
  return values;
}

Result<std::vector<RedisValue>> RedisClient::PipelineOnce(const std::vector<std::vector<std::string_view>>& commands,
                                                          bool& sent) {
  return OnConnection(sent, [&](redisContext* c) { return RoundTrip(c, commands); });
}

Result<std::vector<RedisValue>> RedisClient::Pipeline(const std::vector<std::vector<std::string_view>>& commands,
                                                      bool* may_have_run) {
  if (may_have_run != nullptr) *may_have_run = false;
  for (const auto& argv : commands) {
    if (argv.empty()) return Internal("redis_empty_command", "internal error: empty redis command");
  }
  if (commands.empty()) return std::vector<RedisValue>{};
  if (cluster_) return cluster_->Pipeline(commands, may_have_run);
  bool any_sent = false;
  auto values = Retrying([&](bool& sent) {
    auto r = PipelineOnce(commands, sent);
    any_sent = any_sent || sent;
    return r;
  });
  if (!values.ok() && may_have_run != nullptr) *may_have_run = any_sent;
  return values;
}

Result<RedisValue> RedisClient::Command(const std::vector<std::string_view>& argv) {
  auto values = Pipeline({argv});
  if (!values.ok()) return values.status();
  return std::move(values->front());
}

Result<RedisValue> RedisClient::Eval(const RedisScript& script, const std::vector<std::string_view>& keys,
                                     const std::vector<std::string_view>& args, bool* may_have_run) {
  if (may_have_run != nullptr) *may_have_run = false;
  if (cluster_) return cluster_->Eval(script, keys, args, may_have_run);
  const std::string num_keys = std::to_string(keys.size());
  std::vector<std::vector<std::string_view>> call = {EvalShaCommand(script, num_keys, keys, args)};
  bool any_sent = false;
  auto values = Retrying([&](bool& sent) {
    auto r = EvalThenOnce(script, call, sent);
    any_sent = any_sent || sent;
    return r;
  });
  if (!values.ok()) {
    // A transport failure after the script was sent: it may have run.
    if (may_have_run != nullptr) *may_have_run = any_sent;
    return values.status();
  }
  return std::move(values->front());
}

Result<std::vector<RedisValue>> RedisClient::EvalManyOnce(const RedisScript& script,
                                                         const std::vector<std::vector<std::string_view>>& commands,
                                                         bool& sent) {
  return OnConnection(sent, [&](redisContext* c) -> Result<std::vector<RedisValue>> {
    auto values = RoundTrip(c, commands);
    if (!values.ok()) return values;
    std::vector<size_t> missing;
    std::vector<std::vector<std::string_view>> retry;
    for (size_t i = 0; i < values->size(); ++i) {
      if (IsNoScript((*values)[i])) {
        missing.push_back(i);
        retry.push_back(commands[i]);
        retry.back()[0] = "EVAL";
        retry.back()[1] = script.source();
      }
    }
    if (retry.empty()) return values;
    auto again = RoundTrip(c, retry);
    if (!again.ok()) return again;
    for (size_t j = 0; j < missing.size(); ++j) (*values)[missing[j]] = std::move((*again)[j]);
    return values;
  });
}

Result<std::vector<RedisValue>> RedisClient::EvalThenOnce(const RedisScript& script,
                                                         std::vector<std::vector<std::string_view>>& commands,
                                                         bool& sent) {
  return OnConnection(sent, [&](redisContext* c) {
    auto values = RoundTrip(c, commands);
    if (!values.ok() || !IsNoScript(values->front())) return values;
    // EVAL also caches the script, so later calls are one round trip again.
    // The commands after it ran without it: they go again, after it.
    commands[0][0] = "EVAL";
    commands[0][1] = script.source();
    return RoundTrip(c, commands);
  });
}

Result<std::vector<RedisValue>> RedisClient::EvalThen(const RedisScript& script,
                                                     const std::vector<std::string_view>& keys,
                                                     const std::vector<std::string_view>& args,
                                                     const std::vector<std::vector<std::string_view>>& commands) {
  for (const auto& argv : commands) {
    if (argv.empty()) return Internal("redis_empty_command", "internal error: empty redis command");
  }
  if (cluster_) {
    // A slot's node may move between the two; each call follows it.
    auto first = cluster_->Eval(script, keys, args, nullptr);
    if (!first.ok()) return first.status();
    std::vector<RedisValue> values;
    values.reserve(1 + commands.size());
    values.push_back(std::move(*first));
    if (commands.empty()) return values;
    auto rest = cluster_->Pipeline(commands, nullptr);
    if (!rest.ok()) return rest.status();
    for (RedisValue& v : *rest) values.push_back(std::move(v));
    return values;
  }
  const std::string num_keys = std::to_string(keys.size());
  std::vector<std::vector<std::string_view>> all;
  all.reserve(1 + commands.size());
  all.push_back(EvalShaCommand(script, num_keys, keys, args));
  all.insert(all.end(), commands.begin(), commands.end());
  return Retrying([&](bool& sent) { return EvalThenOnce(script, all, sent); });
}

Result<std::vector<RedisValue>> RedisClient::EvalMany(const RedisScript& script,
                                                     const std::vector<ScriptCall>& calls) {
  if (calls.empty()) return std::vector<RedisValue>{};
  if (cluster_) return cluster_->EvalMany(script, calls);
  std::vector<std::string> num_keys;
  num_keys.reserve(calls.size());
  std::vector<std::vector<std::string_view>> commands;
  commands.reserve(calls.size());
  for (const ScriptCall& call : calls) {
    num_keys.push_back(std::to_string(call.keys.size()));  // reserved: the views stay valid
    commands.push_back(EvalShaCommand(script, num_keys.back(), call.keys, call.args));
  }
  return Retrying([&](bool& sent) { return EvalManyOnce(script, commands, sent); });
}

}  // namespace chatd
