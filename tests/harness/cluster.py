"""A local Redis Cluster for the integration tests: 3 primaries and 3 replicas
of Debian's redis-server on free loopback ports, in a folder of their own.

    with RedisCluster(tmpdir).start() as cluster:
        env = {"CHATD_REDIS_CLUSTER": cluster.seeds}

Each node is a `stack.Redis` (AOF, noeviction, as deployed) with cluster mode
on. `start` builds the cluster with `redis-cli --cluster create` and returns
once every node says `cluster_state:ok` and every replica is in sync; `stop`
(also on an exception inside `with`) stops every node."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional

from .stack import LOOPBACK, Redis, RedisError, StackError, free_port, poll_until

PRIMARIES = 3
REPLICAS_PER_PRIMARY = 1
# How long a node may be unreachable before the others call it failed and a
# replica takes over. Redis's default is 15 s; 2 s keeps failover tests short
# while staying well above a loaded machine's scheduling hiccups.
NODE_TIMEOUT_MS = 2000
CREATE_TIMEOUT_S = 60.0
# A failover takes about the node timeout plus an election.
SETTLE_TIMEOUT_S = 60.0


class ClusterNode(Redis):
    name = "redis-cluster-node"

    def __init__(self, tmpdir: Path) -> None:
        super().__init__(tmpdir)
        # The cluster bus defaults to port + 10000, which may be taken or past
        # 65535: pin it to a free port of its own.
        self.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(free_port())]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def info(self, section: str) -> "dict[str, str]":
        text = self.command("INFO", section) if section != "cluster" else self.command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        pairs = {}
        for line in str(text).splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                pairs[k] = v.strip()
        return pairs

    def role(self) -> str:
        return self.info("replication").get("role", "")

    def node_id(self) -> str:
        return _text(self.command("CLUSTER", "MYID"))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisCluster:
    def __init__(self, tmpdir: Path | str) -> None:
        self.dir = Path(tmpdir) / "redis-cluster"
        self.nodes = [ClusterNode(self.dir / f"node-{i}") for i in range(PRIMARIES * (1 + REPLICAS_PER_PRIMARY))]

    @property
    def seeds(self) -> str:
        """CHATD_REDIS_CLUSTER: every node (a client needs only one that answers)."""
        return ",".join(n.address for n in self.nodes)

    def start(self) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *[n.address for n in self.nodes],
                 "--cluster-replicas", str(REPLICAS_PER_PRIMARY), "--cluster-yes"],
                capture_output=True, text=True, timeout=CREATE_TIMEOUT_S)
            if create.returncode != 0:
                raise StackError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # stop the rest anyway
                errors.append(exc)
        if errors:
            raise StackError(f"errors while stopping the cluster: {errors}")

    def __enter__(self) -> "RedisCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def running_nodes(self) -> "list[ClusterNode]":
        return [n for n in self.nodes if n.running()]

    def _healthy(self) -> bool:
        try:
            nodes = self.running_nodes()
            if any(n.info("cluster").get("cluster_state") != "ok" for n in nodes):
                return False
            slots = self.slot_map()
            primaries = {owner for owner in slots.values()}
            # Every running node agrees on the map, and every primary that has
            # a replica has it in sync (a failover test needs one to promote).
            for n in nodes:
                if self.slot_map(n) != slots:
                    return False
                if n.role() == "slave" and n.info("replication").get("master_link_status") != "up":
                    return False
            return len(primaries) == PRIMARIES
        except (RedisError, OSError):
            return False

    def wait_healthy(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        if not poll_until(self._healthy, timeout):
            raise StackError("the redis cluster did not settle (cluster_state:ok, one map, replicas in sync)")

    def slot_map(self, node: Optional[ClusterNode] = None) -> "dict[tuple[int, int], str]":
        """(first, last) -> the primary's host:port, as `node` (default: the
        first running node) sees it."""
        node = node or self.running_nodes()[0]
        ranges = {}
        for r in node.command("CLUSTER", "SLOTS"):
            host = _text(r[2][0]) or LOOPBACK
            ranges[(int(r[0]), int(r[1]))] = f"{host}:{int(r[2][1])}"
        return ranges

    def node_at(self, address: str) -> ClusterNode:
        return next(n for n in self.nodes if n.address == address)

    def primaries(self) -> "list[ClusterNode]":
        return [n for n in self.running_nodes() if n.role() == "master"]

    def slot_of(self, key: str) -> int:
        return int(self.running_nodes()[0].command("CLUSTER", "KEYSLOT", key))

    def owner_of_slot(self, slot: int) -> ClusterNode:
        """The running primary of `slot`. After a failover the other nodes learn
        of the promoted replica by gossip: until the node asked has, its map
        still names the dead primary, so this waits for a map that names a
        running one."""
        found: "list[ClusterNode]" = []

        def running_owner() -> bool:
            for (first, last), address in self.slot_map().items():
                if first <= slot <= last:
                    found[:] = [self.node_at(address)]
                    return found[0].running()
            raise StackError(f"slot {slot} has no owner")

        if not poll_until(running_owner, SETTLE_TIMEOUT_S):
            raise StackError(f"slot {slot} is still mapped to {found[0].address}, which is not running")
        return found[0]

    def owner_of(self, key: str) -> ClusterNode:
        return self.owner_of_slot(self.slot_of(key))

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        pid = primary.node_id()
        for n in self.running_nodes():
            if n is primary or n.role() != "slave":
                continue
            for line in _text(n.command("CLUSTER", "NODES")).splitlines():
                fields = line.split()  # id addr flags master-id ...
                if "myself" in fields[2].split(",") and fields[3] == pid:
                    return n
        raise StackError(f"primary {primary.address} has no replica")

    def count_keys(self, pattern: str) -> "dict[str, int]":
        """host:port of each primary -> how many of its keys match `pattern`."""
        counts = {}
        for n in self.primaries():
            cursor, total = "0", 0
            while True:
                cursor, keys = n.command("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
                cursor = _text(cursor)
                total += len(keys)
                if cursor == "0":
                    break
            counts[n.address] = total
        return counts
