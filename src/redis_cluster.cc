#include "redis_cluster.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <thread>
#include <utility>

namespace chatd {

namespace {

// Redirects one call follows before it gives up. A slot moves at most a few
// times while a reshard runs (MOVED to the new owner, ASK while keys move);
// more means the nodes disagree about the map, and looping would not help.
constexpr int kMaxRedirects = 8;
// Map reloads one call tries after connection failures when it may not wait
// (the request path: transient_wait_ms 0). Each is one CLUSTER SLOTS round
// trip; a failover takes seconds, so more would only delay the error.
constexpr int kMaxReloadsWithoutWait = 2;
// Pause between reloads when the caller waits through an outage (cleanup).
constexpr std::chrono::milliseconds kReloadPause{200};

constexpr std::string_view kMovedPrefix = "MOVED ";
constexpr std::string_view kAskPrefix = "ASK ";

// Commands whose first argument is a subcommand and whose key comes after it.
constexpr std::array<std::string_view, 4> kSubcommandFirst = {"XGROUP", "XINFO", "OBJECT", "MEMORY"};
// Commands without keys that callers send (routed to any primary).
constexpr std::array<std::string_view, 9> kKeyless = {"PING",  "INFO",    "TIME",   "SCRIPT", "CLUSTER",
                                                      "ECHO",  "ASKING",  "DBSIZE", "CONFIG"};

bool EqualsUpper(std::string_view arg, std::string_view upper) {
  return arg.size() == upper.size() && std::equal(arg.begin(), arg.end(), upper.begin(), [](char a, char b) {
           return (a >= 'a' && a <= 'z' ? static_cast<char>(a - 'a' + 'A') : a) == b;
         });
}

bool OneOf(std::string_view arg, const auto& words) {
  return std::any_of(words.begin(), words.end(), [&](std::string_view w) { return EqualsUpper(arg, w); });
}

std::optional<int64_t> ParseInt(std::string_view s) {
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

std::string Describe(const RedisAddress& a) { return a.host + ":" + std::to_string(a.port); }

}  // namespace

uint16_t RedisCrc16(std::string_view data) {
  uint16_t crc = 0;
  for (unsigned char byte : data) {
    crc ^= static_cast<uint16_t>(byte) << 8;
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021) : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

int RedisKeySlot(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    // "{}" hashes the whole key, as in Redis.
    if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  return RedisCrc16(key) % kClusterSlots;
}

std::optional<size_t> RedisFirstKeyIndex(const std::vector<std::string_view>& argv) {
  if (argv.size() < 2 || OneOf(argv[0], kKeyless)) return std::nullopt;
  if (EqualsUpper(argv[0], "EVAL") || EqualsUpper(argv[0], "EVALSHA") || EqualsUpper(argv[0], "EVAL_RO") ||
      EqualsUpper(argv[0], "EVALSHA_RO")) {
    if (argv.size() < 4) return std::nullopt;
    auto n = ParseInt(argv[2]);
    if (!n || *n < 1) return std::nullopt;
    return 3;
  }
  if (EqualsUpper(argv[0], "XREAD") || EqualsUpper(argv[0], "XREADGROUP")) {
    for (size_t i = 1; i + 1 < argv.size(); ++i) {
      if (EqualsUpper(argv[i], "STREAMS")) return i + 1;
    }
    return std::nullopt;
  }
  if (OneOf(argv[0], kSubcommandFirst)) {
    if (argv.size() < 3) return std::nullopt;
    return 2;
  }
  return 1;
}

std::optional<RedisRedirect> ParseRedisRedirect(const RedisValue& reply) {
  if (!reply.is_error()) return std::nullopt;
  std::string_view text = reply.str;
  RedisRedirect r;
  if (text.starts_with(kMovedPrefix)) {
    r.kind = RedisRedirect::Kind::kMoved;
    text.remove_prefix(kMovedPrefix.size());
  } else if (text.starts_with(kAskPrefix)) {
    r.kind = RedisRedirect::Kind::kAsk;
    text.remove_prefix(kAskPrefix.size());
  } else {
    return std::nullopt;
  }
  const size_t space = text.find(' ');
  if (space == std::string_view::npos) return std::nullopt;
  auto slot = ParseInt(text.substr(0, space));
  std::string_view endpoint = text.substr(space + 1);
  const size_t colon = endpoint.rfind(':');  // rfind: an IPv6 address has colons of its own
  if (!slot || *slot < 0 || *slot >= kClusterSlots || colon == std::string_view::npos) return std::nullopt;
  auto port = ParseInt(endpoint.substr(colon + 1));
  if (!port || *port < 1 || *port > 65535) return std::nullopt;
  r.slot = static_cast<int>(*slot);
  r.node.host = std::string(endpoint.substr(0, colon));
  r.node.port = static_cast<int>(*port);
  return r;
}

Result<std::vector<RedisSlotRange>> ParseClusterSlots(const RedisValue& reply, const std::string& asked_host) {
  auto bad = [] { return Unavailable("redis_error", "redis cluster: CLUSTER SLOTS answered something unexpected"); };
  if (reply.is_error()) return RedisReplyError(reply.str, "redis cluster: CLUSTER SLOTS");
  if (reply.type != RedisValue::Type::kArray) return bad();
  std::vector<RedisSlotRange> ranges;
  for (const RedisValue& range : reply.elements) {
    // [first, last, [host, port, id, ...], replicas...]
    if (range.type != RedisValue::Type::kArray || range.elements.size() < 3) return bad();
    const RedisValue& first = range.elements[0];
    const RedisValue& last = range.elements[1];
    const RedisValue& primary = range.elements[2];
    if (first.type != RedisValue::Type::kInteger || last.type != RedisValue::Type::kInteger ||
        primary.type != RedisValue::Type::kArray || primary.elements.size() < 2 ||
        primary.elements[0].type != RedisValue::Type::kString ||
        primary.elements[1].type != RedisValue::Type::kInteger) {
      return bad();
    }
    if (first.integer < 0 || last.integer >= kClusterSlots || first.integer > last.integer ||
        primary.elements[1].integer < 1 || primary.elements[1].integer > 65535) {
      return bad();
    }
    RedisSlotRange r;
    r.first = static_cast<int>(first.integer);
    r.last = static_cast<int>(last.integer);
    r.primary.host = primary.elements[0].str.empty() ? asked_host : primary.elements[0].str;
    r.primary.port = static_cast<int>(primary.elements[1].integer);
    ranges.push_back(std::move(r));
  }
  return ranges;
}

RedisCluster::RedisCluster(const RedisOptions& options) : node_options_(options), seeds_(options.cluster_seeds) {
  node_options_.cluster_seeds.clear();
  slot_node_.fill(-1);
}

RedisCluster::~RedisCluster() = default;

int RedisCluster::CommandSlot(const std::vector<std::string_view>& argv) {
  auto at = RedisFirstKeyIndex(argv);
  return at ? RedisKeySlot(argv[*at]) : -1;
}

RedisClient& RedisCluster::NodeAt(const RedisAddress& address) {
  {
    std::shared_lock lock(mu_);
    for (const auto& n : nodes_) {
      if (n->address == address) return *n->client;
    }
  }
  std::unique_lock lock(mu_);
  for (const auto& n : nodes_) {
    if (n->address == address) return *n->client;
  }
  RedisOptions o = node_options_;
  o.host = address.host;
  o.port = address.port;
  nodes_.push_back(std::make_unique<Node>(Node{address, std::make_unique<RedisClient>(std::move(o))}));
  return *nodes_.back()->client;
}

Status RedisCluster::Refresh() {
  const auto asked_at = std::chrono::steady_clock::now();
  std::lock_guard refresh_lock(refresh_mu_);
  // Threads that met the same failure queue here: one reload serves them all.
  if (last_refresh_ >= asked_at) return Status::Ok();
  // Ask the nodes we know (the current primaries first), then the seeds: after
  // a failover the old primary may be gone for good.
  std::vector<RedisAddress> candidates;
  {
    std::shared_lock lock(mu_);
    std::vector<bool> owns(nodes_.size(), false);
    for (int16_t i : slot_node_) {
      if (i >= 0) owns[static_cast<size_t>(i)] = true;
    }
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (owns[i]) candidates.push_back(nodes_[i]->address);
    }
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!owns[i]) candidates.push_back(nodes_[i]->address);
    }
  }
  for (const RedisAddress& seed : seeds_) {
    if (std::find(candidates.begin(), candidates.end(), seed) == candidates.end()) candidates.push_back(seed);
  }
  Status last = Unavailable("redis_unavailable", "redis cluster: no seed node");
  for (const RedisAddress& candidate : candidates) {
    auto reply = NodeAt(candidate).Command({"CLUSTER", "SLOTS"});
    if (!reply.ok()) {
      last = reply.status();
      continue;
    }
    auto ranges = ParseClusterSlots(*reply, candidate.host);
    if (!ranges.ok()) {
      last = ranges.status();
      continue;
    }
    // A node that lost contact with the cluster may answer with a partial or
    // empty map; a fuller one from another node is better.
    size_t covered = 0;
    for (const auto& r : *ranges) covered += static_cast<size_t>(r.last - r.first + 1);
    if (covered == 0) {
      last = Unavailable("redis_unavailable", "redis cluster " + Describe(candidate) + ": no slot is served");
      continue;
    }
    std::vector<int16_t> owner;
    owner.reserve(ranges->size());
    for (const auto& r : *ranges) {
      RedisClient& client = NodeAt(r.primary);
      std::shared_lock lock(mu_);
      for (size_t i = 0; i < nodes_.size(); ++i) {
        if (nodes_[i]->client.get() == &client) owner.push_back(static_cast<int16_t>(i));
      }
    }
    std::unique_lock lock(mu_);
    slot_node_.fill(-1);
    for (size_t i = 0; i < ranges->size(); ++i) {
      std::fill(slot_node_.begin() + (*ranges)[i].first, slot_node_.begin() + (*ranges)[i].last + 1, owner[i]);
    }
    loaded_ = true;
    last_refresh_ = std::chrono::steady_clock::now();
    return Status::Ok();
  }
  return last;
}

Result<RedisClient*> RedisCluster::NodeFor(int slot) {
  for (int pass = 0; pass < 2; ++pass) {
    {
      std::shared_lock lock(mu_);
      if (loaded_) {
        int16_t i = -1;
        if (slot >= 0) {
          i = slot_node_[static_cast<size_t>(slot)];
        } else {
          // Keyless: the owner of the first served slot, a primary.
          auto it = std::find_if(slot_node_.begin(), slot_node_.end(), [](int16_t n) { return n >= 0; });
          if (it != slot_node_.end()) i = *it;
        }
        if (i >= 0) return nodes_[static_cast<size_t>(i)]->client.get();
      }
    }
    if (pass == 0) {
      if (Status s = Refresh(); !s.ok()) return s;
    }
  }
  return Unavailable("redis_unavailable", "redis cluster: slot " + std::to_string(slot) + " is served by no node");
}

void RedisCluster::Redirected(const RedisRedirect& redirect) {
  if (redirect.kind != RedisRedirect::Kind::kMoved) return;  // ASK is for one command only
  RedisClient& client = NodeAt(redirect.node);
  std::unique_lock lock(mu_);
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i]->client.get() == &client) slot_node_[static_cast<size_t>(redirect.slot)] = static_cast<int16_t>(i);
  }
}

Result<RedisCluster::Groups> RedisCluster::GroupByNode(const std::vector<int>& slots,
                                                      const std::vector<bool>& skip) {
  Groups groups;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (skip[i]) continue;
    auto node = NodeFor(slots[i]);
    if (!node.ok()) return node.status();
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& p) { return p.first == *node; });
    if (g == groups.end()) {
      groups.push_back({*node, {i}});
    } else {
      g->second.push_back(i);
    }
  }
  return groups;
}

Result<RedisValue> RedisCluster::Dispatch(int slot, const Attempt& attempt, bool* may_have_run) {
  if (may_have_run != nullptr) *may_have_run = false;
  const auto wait_until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(node_options_.transient_wait_ms);
  std::optional<RedisAddress> ask;  // set for the one command after an ASK
  int redirects = 0;
  int reloads = 0;
  for (;;) {
    RedisClient* node = nullptr;
    if (ask) {
      node = &NodeAt(*ask);
    } else {
      auto found = NodeFor(slot);
      if (!found.ok()) {
        // No map at all (every node refused): waiting callers try again.
        if (++reloads <= kMaxReloadsWithoutWait) continue;
        if (std::chrono::steady_clock::now() + kReloadPause > wait_until) return found.status();
        std::this_thread::sleep_for(kReloadPause);
        continue;
      }
      node = *found;
    }
    const bool asking = ask.has_value();
    ask.reset();
    bool sent = false;
    Result<RedisValue> r = attempt(*node, asking, sent);
    if (!r.ok()) {
      // A failed connection is how a dead primary shows: reload the map so
      // this call (when nothing was sent) and the next ones find its
      // successor. A command that may have run is never resent.
      const Status reloaded = Refresh();
      if (sent) {
        if (may_have_run != nullptr) *may_have_run = true;
        return r;
      }
      if (!reloaded.ok() || ++reloads > kMaxReloadsWithoutWait) {
        if (std::chrono::steady_clock::now() + kReloadPause > wait_until) return r;
        std::this_thread::sleep_for(kReloadPause);
      }
      continue;
    }
    auto redirect = ParseRedisRedirect(*r);
    if (!redirect) return r;
    if (++redirects > kMaxRedirects) {
      return Unavailable("redis_unavailable", "redis cluster: slot " + std::to_string(redirect->slot) +
                                                  " still redirected after " + std::to_string(kMaxRedirects) +
                                                  " hops (the map is changing)");
    }
    if (redirect->node.host.empty()) redirect->node.host = node->options().host;
    if (redirect->kind == RedisRedirect::Kind::kAsk) {
      ask = redirect->node;
    } else {
      Redirected(*redirect);
    }
  }
}

Result<std::vector<RedisValue>> RedisCluster::Pipeline(const std::vector<std::vector<std::string_view>>& commands,
                                                       bool* may_have_run) {
  if (may_have_run != nullptr) *may_have_run = false;
  if (commands.size() == 1 && commands[0].size() == 1 && EqualsUpper(commands[0][0], "PING")) return PingAll();
  // Commands without a key go with the pipeline's first keyed command (the
  // callers' pipelines are one user's reads); alone they go to any primary.
  int default_slot = -1;
  std::vector<int> slots(commands.size());
  for (size_t i = 0; i < commands.size(); ++i) {
    slots[i] = CommandSlot(commands[i]);
    if (default_slot < 0) default_slot = slots[i];
  }
  for (int& s : slots) {
    if (s < 0) s = default_slot;
  }

  // One round trip per node, commands in their order within it.
  std::vector<RedisValue> values(commands.size());
  std::vector<RedisClient*> answered(commands.size(), nullptr);
  std::vector<bool> done(commands.size(), false);
  bool any_sent = false;
  for (int reload = 0;; ++reload) {
    auto grouped = GroupByNode(slots, done);
    if (!grouped.ok()) return grouped.status();
    const Groups& groups = *grouped;
    bool failed_unsent = false;
    for (const auto& [node, members] : groups) {
      std::vector<std::vector<std::string_view>> batch;
      for (size_t i : members) batch.push_back(commands[i]);
      bool sent = false;
      auto r = node->Pipeline(batch, &sent);
      if (!r.ok()) {
        const Status reloaded = Refresh();
        if (sent || any_sent || reload >= kMaxReloadsWithoutWait || !reloaded.ok()) {
          if (may_have_run != nullptr) *may_have_run = sent || any_sent;
          return r.status();
        }
        failed_unsent = true;
        break;
      }
      any_sent = true;
      for (size_t j = 0; j < members.size(); ++j) {
        values[members[j]] = std::move((*r)[j]);
        answered[members[j]] = node;
        done[members[j]] = true;
      }
    }
    if (!failed_unsent) break;
  }

  // A redirected command did not run: send it alone to where Redis points.
  for (size_t i = 0; i < commands.size(); ++i) {
    auto redirect = ParseRedisRedirect(values[i]);
    if (!redirect) continue;
    if (redirect->node.host.empty()) redirect->node.host = answered[i]->options().host;
    const std::vector<std::string_view>& argv = commands[i];
    Attempt one = [&argv](RedisClient& node, bool asking, bool& sent) -> Result<RedisValue> {
      std::vector<std::vector<std::string_view>> batch;
      if (asking) batch.push_back({"ASKING"});
      batch.push_back(argv);
      auto r = node.Pipeline(batch, &sent);
      if (!r.ok()) return r.status();
      return std::move(r->back());
    };
    // Start from the redirect itself: MOVED updates the map, ASK asks there.
    Result<RedisValue> r = RedisValue{};
    if (redirect->kind == RedisRedirect::Kind::kMoved) {
      Redirected(*redirect);
      r = Dispatch(slots[i], one, nullptr);
    } else {
      bool sent = false;
      r = one(NodeAt(redirect->node), true, sent);
    }
    if (!r.ok()) {
      // The commands that were not redirected have run.
      if (may_have_run != nullptr) *may_have_run = true;
      return r.status();
    }
    values[i] = std::move(*r);
  }
  return values;
}

Result<RedisValue> RedisCluster::Eval(const RedisScript& script, const std::vector<std::string_view>& keys,
                                      const std::vector<std::string_view>& args, bool* may_have_run) {
  const int slot = keys.empty() ? -1 : RedisKeySlot(keys.front());
  Attempt run = [&](RedisClient& node, bool asking, bool& sent) -> Result<RedisValue> {
    if (!asking) return node.Eval(script, keys, args, &sent);
    // ASKING holds for the next command only, so the NOSCRIPT fallback could
    // not follow it: send the script's text straight away (EVAL caches it).
    const std::string num_keys = std::to_string(keys.size());
    std::vector<std::string_view> argv = {"EVAL", script.source(), num_keys};
    argv.insert(argv.end(), keys.begin(), keys.end());
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = node.Pipeline({{"ASKING"}, argv}, &sent);
    if (!r.ok()) return r.status();
    return std::move(r->back());
  };
  return Dispatch(slot, run, may_have_run);
}

Result<std::vector<RedisValue>> RedisCluster::EvalMany(const RedisScript& script,
                                                       const std::vector<RedisClient::ScriptCall>& calls) {
  // One round trip per node; a call that comes back redirected runs alone.
  std::vector<int> slots;
  slots.reserve(calls.size());
  for (const auto& call : calls) slots.push_back(call.keys.empty() ? -1 : RedisKeySlot(call.keys.front()));
  auto groups = GroupByNode(slots, std::vector<bool>(calls.size(), false));
  if (!groups.ok()) return groups.status();
  std::vector<RedisValue> values(calls.size());
  for (const auto& [node, members] : *groups) {
    std::vector<RedisClient::ScriptCall> batch;
    for (size_t i : members) batch.push_back(calls[i]);
    auto r = node->EvalMany(script, batch);
    if (!r.ok()) {
      (void)Refresh();  // for the next call: this one may have run
      return r.status();
    }
    for (size_t j = 0; j < members.size(); ++j) values[members[j]] = std::move((*r)[j]);
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    if (!ParseRedisRedirect(values[i])) continue;
    auto r = Eval(script, calls[i].keys, calls[i].args, nullptr);
    if (!r.ok()) return r.status();
    values[i] = std::move(*r);
  }
  return values;
}

std::vector<RedisClient*> RedisCluster::Primaries() {
  std::vector<RedisClient*> primaries;
  std::shared_lock lock(mu_);
  for (int16_t i : slot_node_) {
    RedisClient* c = i >= 0 ? nodes_[static_cast<size_t>(i)]->client.get() : nullptr;
    if (c != nullptr && std::find(primaries.begin(), primaries.end(), c) == primaries.end()) primaries.push_back(c);
  }
  return primaries;
}

Result<std::vector<RedisValue>> RedisCluster::PingAll() {
  // A PING is a health check: the cluster serves every user only when every
  // primary answers, so one that does not is the answer.
  if (auto any = NodeFor(-1); !any.ok()) return any.status();
  Result<std::vector<RedisValue>> answer = std::vector<RedisValue>{};
  for (RedisClient* c : Primaries()) {
    auto r = c->Pipeline({{"PING"}});
    if (!r.ok()) {
      (void)Refresh();  // a failover may be under way: the next check sees its outcome
      return r;
    }
    if (r->front().is_error()) return r;
    if (answer->empty()) answer = std::move(r);
  }
  return answer;
}

Status RedisCluster::CheckAccess() {
  if (Status s = Refresh(); !s.ok()) return s;
  for (RedisClient* c : Primaries()) {
    if (Status s = c->CheckAccess(); !s.ok()) return s;
  }
  return Status::Ok();
}

}  // namespace chatd
