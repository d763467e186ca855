-- wrk script of `make bench`: POST /api/chat (or any path) with a JSON body
-- {"userId","message"}, the user drawn at random from USERS ids.
--
--   wrk -t2 -c64 -d15s --latency -s bench/chat.lua URL -- USERS PREFIX [PATH]
--
-- USERS (default 1000) users named PREFIX1 .. PREFIXn (PREFIX default
-- "bench-u"); PATH defaults to /api/chat. Every request of a thread is built
-- once in init() and then picked at random, so wrk spends its CPU on the
-- network, not in Lua: on a 2-core machine the load generator competes with
-- what it measures. done() prints one line "WRK_JSON {...}" for
-- bench/run_bench.py: latency percentiles in microseconds, requests, and the
-- error counts (wrk counts every HTTP status >= 400 in errors.status).

local threads = {}
local next_id = 0

-- Distinct words per message, so that embeddings and recall differ per request.
local topics = {
  "the weather in Lisbon", "a recipe for lentil soup", "how tides work", "learning the cello",
  "the history of paper", "training for a marathon", "repairing a bicycle chain", "planting tomatoes",
  "the rules of cricket", "why the sky is blue", "saving money on groceries", "the moons of Jupiter",
  "writing a short story", "caring for a cat", "baking sourdough bread", "the French revolution",
}
local requests_per_thread = 4096

function setup(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
  table.insert(threads, thread)
end

function init(args)
  local users = tonumber(args[1]) or 1000
  local prefix = args[2] or "bench-u"
  local path = args[3] or "/api/chat"
  math.randomseed(id * 104729 + os.time())
  local headers = { ["Content-Type"] = "application/json" }
  local n = math.max(requests_per_thread, 1)
  prepared = {}
  for i = 1, n do
    local user = math.random(users)
    local topic = topics[math.random(#topics)]
    local body = string.format('{"userId":"%s%d","message":"Tell me about %s, question %d."}',
                               prefix, user, topic, math.random(1000000))
    prepared[i] = wrk.format("POST", path, headers, body)
  end
  count = n
end

function request()
  return prepared[math.random(count)]
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"duration_us":%d', summary.duration),
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors_connect":%d', e.connect),
    string.format('"errors_read":%d', e.read),
    string.format('"errors_write":%d', e.write),
    string.format('"errors_status":%d', e.status),
    string.format('"errors_timeout":%d', e.timeout),
    string.format('"latency_mean_us":%.1f', latency.mean),
    string.format('"latency_max_us":%d', latency.max),
    string.format('"latency_p50_us":%d', latency:percentile(50)),
    string.format('"latency_p90_us":%d', latency:percentile(90)),
    string.format('"latency_p99_us":%d', latency:percentile(99)),
    string.format('"latency_p999_us":%d', latency:percentile(99.9)),
  }
  io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
