"""chatd's Redis Cluster client against a real cluster (3 primaries, 3
replicas: harness/cluster.py): redirects (MOVED after a slot moved, ASK while
it moves), failovers (CLUSTER FAILOVER, kill -9 of a primary), exact rate
limits across two hosts, keys spread over every primary.

The client is driven through the rate limiter: its script touches only the
user's own keys (one slot), so these tests hold whatever the rest of the key
layout is. A chat the limiter admits may still fail later in the request
where the memory layout is not yet cluster-safe (503 memory_unavailable):
`admitted` counts on the limiter's answer, not on the chat's."""
from collections import Counter

import pytest

from harness import keys as rkeys
from harness.stack import UNCAPPED, Stack, concurrently, http_request, poll_until, post_chat
from harness.windows import in_one_fixed_window

WORKERS = 2
THREADS = 4
LIMIT = 30
WINDOW_S = 600
# The tests count a user's admissions over several steps: on the sliding log,
# whose count no window boundary resets half-way. Every pool here counts so,
# but the exact-limit test's, which names its algorithm.
DEFAULT_ALGORITHM = "sliding"
COUNTING_ENV = {"CHATD_RATE_ALGORITHM": DEFAULT_ALGORITHM, "CHATD_RATE_WINDOW_S": str(WINDOW_S)}
SETTLE_TIMEOUT_S = 60.0
# Answers of a chat the rate limiter let through: 200, or the memory layout's
# failure further on (see the module's docstring).
ADMITTED = {(200, None), (503, "memory_unavailable")}


@pytest.fixture(scope="module")
def cluster_stack(build_dir):
    # The limiter tests burst one user with concurrent chats: the per-user
    # in-flight cap would answer them 429 too_many_concurrent before the rate
    # limit is tested, so it is raised on purpose. Chroma is not needed: the
    # limiter and the client are under test.
    started = Stack.start(build_dir, {"CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED, **COUNTING_ENV},
                          workers=WORKERS, threads=THREADS, with_chroma=False, redis_cluster=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def cluster(cluster_stack):
    # A test that failed half-way through a failover leaves the next one a
    # cluster that is still settling: wait for it either way.
    cluster_stack.redis_cluster.wait_healthy()
    yield cluster_stack.redis_cluster
    for node in cluster_stack.redis_cluster.nodes:
        if not node.running():
            node.start()  # it rejoins as a replica
    cluster_stack.redis_cluster.wait_healthy()


def outcome(result):
    status, _, body = result
    return status, body.get("code") if isinstance(body, dict) else None


def chat(url, user):
    return outcome(post_chat(url, user, "hello"))


def rl_key(user, algorithm=DEFAULT_ALGORITHM):
    return rkeys.user_key(user, f"rl:{algorithm}")


def count_on(node, user, algorithm=DEFAULT_ALGORITHM):
    """The user's admissions as `node` holds them."""
    key = rl_key(user, algorithm)
    return int(node.command("HGET", key, "n") or 0) if algorithm == "fixed" else node.command("ZCARD", key)


def stored_count(cluster, user, algorithm=DEFAULT_ALGORITHM):
    return count_on(cluster.owner_of(rl_key(user, algorithm)), user, algorithm)


def redis_health(url):
    _, _, body = http_request(url, "GET", "/api/health")
    return body["dependencies"]["redis"]


def errorstat(node, error):
    # Redis 7 counts the error replies it sent, by their first word.
    stat = node.info("errorstats").get(f"errorstat_{error}", "count=0")
    return int(stat.split("=")[1].split(",")[0])


def move_slot(cluster, slot, source, target, finish=True):
    """Moves `slot` and its keys from `source` to `target` the way
    `redis-cli --cluster reshard` does. finish=False leaves the slot
    MIGRATING/IMPORTING with its keys already on the target: the state in
    which the source answers ASK."""
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id())
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id())
    keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        for node in (target, source):
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        for node in cluster.primaries():
            if node not in (source, target):
                node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        poll_until(lambda: cluster.owner_of_slot(slot) is target, SETTLE_TIMEOUT_S)


def counted_user(url, unique, label):
    """A fresh user with one admitted chat: its limiter key exists."""
    user = unique(label)
    assert chat(url, user) in ADMITTED
    return user


def slot_source_target(cluster, user):
    """The slot of the user's keys, its owner, and another primary."""
    slot = cluster.slot_of(rl_key(user))
    source = cluster.owner_of_slot(slot)
    return slot, source, next(p for p in cluster.primaries() if p is not source)


def test_a_moved_slot_is_followed_and_its_new_owner_remembered(cluster_stack, cluster, unique):
    url = cluster_stack.url
    user = counted_user(url, unique, "moved")
    slot, source, target = slot_source_target(cluster, user)
    move_slot(cluster, slot, source, target)
    moved_before = errorstat(source, "MOVED")

    # Every worker's map still names the old owner: its first call there is
    # answered MOVED, followed, and remembered.
    results = [chat(url, user) for _ in range(3 * WORKERS)]
    assert set(results) <= ADMITTED, results
    assert count_on(target, user) == 1 + 3 * WORKERS
    moved = errorstat(source, "MOVED") - moved_before
    assert 1 <= moved <= WORKERS, moved


def test_ask_during_a_migration_runs_the_script_on_the_importing_node(cluster_stack, cluster, unique):
    # With the per-user cap on, the limiter's script also touches the lease
    # key, and Redis refuses a script over several keys while a migration has
    # split them (TRYAGAIN, transient: 503 at once on the request path). With
    # the cap off (0) the script has one key, which the ASK moves whole.
    front = cluster_stack.new_pool({"CHATD_MAX_CONCURRENT_PER_USER": "0", **COUNTING_ENV}, workers=1, threads=2)
    url = front.url
    user = counted_user(url, unique, "ask")
    slot, source, target = slot_source_target(cluster, user)
    ask_before = errorstat(source, "ASK")
    move_slot(cluster, slot, source, target, finish=False)
    try:
        # The keys left the source: it answers ASK, and the client runs the
        # script on the target after ASKING (the target never saw the script).
        assert chat(url, user) in ADMITTED
        assert errorstat(source, "ASK") > ask_before
        assert source.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    finally:
        for node in cluster.primaries():
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        poll_until(lambda: cluster.owner_of_slot(slot) is target, SETTLE_TIMEOUT_S)
        front.stop()
        cluster_stack.frontends.remove(front)
    assert count_on(target, user) == 2


def test_a_manual_failover_is_followed_without_losing_a_count(cluster_stack, cluster, unique):
    url = cluster_stack.url
    user = counted_user(url, unique, "failover")
    primary = cluster.owner_of(rl_key(user))
    replica = cluster.replica_of(primary)
    replica.command("CLUSTER", "FAILOVER")
    assert poll_until(lambda: replica.role() == "master" and primary.role() == "slave", SETTLE_TIMEOUT_S)
    cluster.wait_healthy()

    # The old primary answers MOVED now; the client reloads or follows.
    results = [chat(url, user) for _ in range(4)]
    assert set(results) <= ADMITTED, results
    # CLUSTER FAILOVER waits for the replica to catch up: nothing is lost.
    assert stored_count(cluster, user) == 5
    assert cluster.owner_of(rl_key(user)) is replica


def test_a_killed_primary_is_replaced_and_the_client_recovers(cluster_stack, cluster, unique):
    url = cluster_stack.url
    user = counted_user(url, unique, "kill9")
    primary = cluster.owner_of(rl_key(user))
    replica = cluster.replica_of(primary)
    # Replication is asynchronous: make sure the first count reached the
    # replica, so that what is tested is the client, not Redis's durability.
    assert primary.command("WAIT", 1, 5000) == 1
    primary.kill()
    # The health check pings every primary: one gone is Redis down.
    assert poll_until(lambda: redis_health(url) == "down", SETTLE_TIMEOUT_S)

    outcomes = []

    def recovered():
        outcomes.append(chat(url, user))
        return outcomes[-1] in ADMITTED

    assert poll_until(recovered, SETTLE_TIMEOUT_S), Counter(outcomes)
    # Until the replica took over, the limiter failed closed, clearly.
    assert set(outcomes[:-1]) <= {(503, "rate_limiter_unavailable")}, Counter(outcomes)
    assert replica.role() == "master"
    assert poll_until(lambda: redis_health(url) == "ok", SETTLE_TIMEOUT_S)
    results = [chat(url, user) for _ in range(3)]
    assert set(results) <= ADMITTED, results
    assert stored_count(cluster, user) == 5


@pytest.mark.parametrize("algorithm", ("fixed", "sliding"))
def test_rate_limit_is_exact_across_two_hosts(cluster_stack, cluster, unique, algorithm):
    # Two pools behind two nginx, as two hosts on one cluster. 31 chats of one
    # user at once: the per-user in-flight cap is raised on purpose so that
    # only the rate limit decides.
    env = {"CHATD_RATE_LIMIT": str(LIMIT), "CHATD_RATE_WINDOW_S": str(WINDOW_S), "CHATD_RATE_ALGORITHM": algorithm,
           "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED}
    hosts = [cluster_stack.new_pool(env, workers=WORKERS, threads=THREADS) for _ in range(2)]
    try:
        def burst():
            user = unique(f"exact-{algorithm}")
            calls = [(hosts[i % 2].url, user) for i in range(LIMIT + 1)]
            return concurrently(chat, calls, max_workers=len(calls)), stored_count(cluster, user, algorithm)

        # A burst that straddled two fixed windows proves nothing: one in a
        # single window (every node shares this machine's clock).
        clock = cluster.running_nodes()[0]
        results, stored = in_one_fixed_window(clock, WINDOW_S, burst) if algorithm == "fixed" else burst()
        counts = Counter(results)
        assert counts[(429, "rate_limited")] == 1, counts
        assert sum(n for o, n in counts.items() if o in ADMITTED) == LIMIT, counts
        assert stored == LIMIT
    finally:
        for host in hosts:
            host.stop()
        cluster_stack.frontends = [f for f in cluster_stack.frontends if f not in hosts]


def test_users_spread_over_every_primary(cluster_stack, cluster, unique):
    run = unique("spread")
    users = [f"{run}-{i}" for i in range(60)]
    results = concurrently(lambda u: chat(cluster_stack.url, u), users, max_workers=8)
    assert set(results) <= ADMITTED, Counter(results)
    # A user's keys carry their shard's hash tag: 16 slots, spread over the primaries.
    per_primary = cluster.count_keys(f"chatd:{{s*}}:u:{run}-*:rl:{DEFAULT_ALGORITHM}")
    assert len(per_primary) == 3
    assert sum(per_primary.values()) == len(users)
    assert all(n > 0 for n in per_primary.values()), per_primary


def test_a_replica_as_the_only_seed_is_enough(cluster_stack, cluster, unique):
    # A pool whose only seed is a replica: the client must learn the map from
    # it and send nothing but CLUSTER SLOTS there (a replica answers MOVED).
    replica = next(n for n in cluster.running_nodes() if n.role() == "slave")
    front = cluster_stack.new_pool({"CHATD_REDIS_CLUSTER": replica.address, **COUNTING_ENV}, workers=1, threads=2)
    try:
        users = [unique("seeded") for _ in range(12)]
        results = [chat(front.url, u) for u in users]
        assert set(results) <= ADMITTED, Counter(results)
        assert all(stored_count(cluster, u) == 1 for u in users)
    finally:
        front.stop()
        cluster_stack.frontends.remove(front)
