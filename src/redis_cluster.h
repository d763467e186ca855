// Redis Cluster behind RedisClient: hiredis 0.14 has no cluster support and
// Debian 12 packages no library that adds it, so this is a small one.
//
// The client keeps the slot map (CLUSTER SLOTS) and one RedisClient per node,
// so every node has the single-node client's connection pool, its per-thread
// borrowing, its EVALSHA -> EVAL fallback on NOSCRIPT (a node that never saw a
// script caches it from that EVAL) and its transient-error waits. On top of
// that it routes each command by its first key, follows MOVED (and records the
// slot's new owner) and ASK (ASKING on the same connection, once), and reloads
// the map after a connection failure, which is how a failover shows.
//
// Every key of one command, one script call or one user's pipeline must hash
// to one slot: the key layout guarantees it with `{user}` hash tags.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/redis.h"
#include "chatd/status.h"

namespace chatd {

inline constexpr int kClusterSlots = 16384;

// CRC16-XMODEM, the checksum Redis Cluster hashes keys with.
uint16_t RedisCrc16(std::string_view data);
// The slot of a key, honouring a non-empty `{...}` hash tag as Redis does
// (CLUSTER KEYSLOT).
int RedisKeySlot(std::string_view key);
// Where the first key of a command is, or nullopt for a command without keys
// (PING, INFO, TIME, SCRIPT..., EVAL with no keys).
std::optional<size_t> RedisFirstKeyIndex(const std::vector<std::string_view>& argv);

// A -MOVED or -ASK error reply: the slot and the node to ask instead. The
// host is empty when Redis did not name one (it means "the node you asked").
struct RedisRedirect {
  enum class Kind { kMoved, kAsk };
  Kind kind = Kind::kMoved;
  int slot = 0;
  RedisAddress node;
};
std::optional<RedisRedirect> ParseRedisRedirect(const RedisValue& reply);

// One range of the slot map and its primary.
struct RedisSlotRange {
  int first = 0;
  int last = 0;
  RedisAddress primary;
};
// The CLUSTER SLOTS reply of the node at `asked_host`; a primary listed with
// an empty host is on that host.
Result<std::vector<RedisSlotRange>> ParseClusterSlots(const RedisValue& reply, const std::string& asked_host);

class RedisCluster {
 public:
  // `options.cluster_seeds` must not be empty; nothing is dialled here.
  explicit RedisCluster(const RedisOptions& options);
  ~RedisCluster();
  RedisCluster(const RedisCluster&) = delete;
  RedisCluster& operator=(const RedisCluster&) = delete;

  // RedisClient's calls, with the same contracts.
  Result<std::vector<RedisValue>> Pipeline(const std::vector<std::vector<std::string_view>>& commands,
                                           bool* may_have_run);
  Result<RedisValue> Eval(const RedisScript& script, const std::vector<std::string_view>& keys,
                          const std::vector<std::string_view>& args, bool* may_have_run);
  Result<std::vector<RedisValue>> EvalMany(const RedisScript& script,
                                           const std::vector<RedisClient::ScriptCall>& calls);
  // Loads the slot map and checks access on every primary. A lone PING
  // (the health check) is sent to every primary too.
  Status CheckAccess();

 private:
  struct Node {
    RedisAddress address;
    std::unique_ptr<RedisClient> client;
  };
  // What one attempt at a single command or script does on a node; `asking`
  // asks it to send ASKING first on the same connection.
  using Attempt = std::function<Result<RedisValue>(RedisClient& node, bool asking, bool& sent)>;

  // Runs `attempt` on the owner of `slot` (any primary for -1), following
  // redirects and reloading the map after a connection failure.
  Result<RedisValue> Dispatch(int slot, const Attempt& attempt, bool* may_have_run);
  // Indexes (into `slots`, but not those `skip` marks) by the node serving
  // their slot, in order: one round trip per node.
  using Groups = std::vector<std::pair<RedisClient*, std::vector<size_t>>>;
  Result<Groups> GroupByNode(const std::vector<int>& slots, const std::vector<bool>& skip);
  // The node serving `slot` (-1: any primary); loads the map first if needed.
  Result<RedisClient*> NodeFor(int slot);
  RedisClient& NodeAt(const RedisAddress& address);
  // The nodes that serve slots in the current map.
  std::vector<RedisClient*> Primaries();
  // PING on every primary: the first failure or error reply, else PONG.
  Result<std::vector<RedisValue>> PingAll();
  // Reloads the slot map from the first node that answers CLUSTER SLOTS.
  Status Refresh();
  // Records the new owner of a slot after MOVED.
  void Redirected(const RedisRedirect& redirect);
  // The slot of a command's first key, or -1 for a command without keys.
  static int CommandSlot(const std::vector<std::string_view>& argv);

  RedisOptions node_options_;  // a node's options: the cluster's, without the seeds
  std::vector<RedisAddress> seeds_;

  std::mutex refresh_mu_;  // one map reload at a time
  std::chrono::steady_clock::time_point last_refresh_;  // guarded by refresh_mu_
  mutable std::shared_mutex mu_;
  std::vector<std::unique_ptr<Node>> nodes_;  // guarded by mu_; only grows, so a RedisClient& stays valid
  std::array<int16_t, kClusterSlots> slot_node_;  // guarded by mu_; index into nodes_, -1 unknown
  bool loaded_ = false;                          // guarded by mu_
};

}  // namespace chatd
