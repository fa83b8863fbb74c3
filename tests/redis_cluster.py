"""A real Redis Cluster on loopback: primaries, optional replicas, each a redis-server child
on a free port (broker/redis_process.py), stopped by PID, joined by `redis-cli --cluster`.
Nodes decide fast here (cluster-node-timeout 1000 ms), so a killed primary is replaced by
its replica in ~2-3 s. Sync API only: from async tests, call it via asyncio.to_thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import redis
from redis.crc import key_slot

from broker.redis_process import RedisProcess, RedisStartError, free_port

SLOTS = 16384
POLL = 0.05  # seconds between two looks at a condition


class ClusterNode(RedisProcess):
    """redis-server with cluster options; with config_file, started as `redis-server FILE
    --port ... ` so the file is the base and RedisProcess's loopback options override it."""

    def __init__(
        self, config_file: str | os.PathLike | None = None, *, taken: set[int] | None = None, **kw
    ) -> None:
        """taken: ports the other nodes of the topology chose (and not all bound yet)."""
        self._taken = taken if taken is not None else set()
        super().__init__(port=self._fresh_port(), **kw)
        self.config_file = config_file
        # The bus port defaults to port + 10000, impossible for a free port above 55535.
        self.bus_port = self._fresh_port()
        self._started = False

    def _fresh_port(self) -> int:
        port = free_port()
        while port in self._taken:
            port = free_port()
        self._taken.add(port)
        return port

    def start(self, timeout: float | None = None) -> ClusterNode:
        """As RedisProcess.start; a node never started yet that finds a port taken (free
        when chosen, two ports per node) retries on new ones."""
        for attempt in range(3):
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                super().start(timeout)
                self._started = True
                return self
            except RedisStartError:
                with open(self.log_path, "rb") as log:
                    log.seek(size)
                    in_use = b"Address already in use" in log.read()
                if self._started or not in_use or attempt == 2:
                    raise
                self.port, self.bus_port = self._fresh_port(), self._fresh_port()
        raise AssertionError("unreachable")

    def args(self, binary: str) -> list[str]:
        args = super().args(binary)
        # nodes.conf is the node's identity and view of the cluster: one per node, kept
        # across kill()/start() in the node's own folder.
        args += ["--cluster-config-file", str(self.dir / "nodes.conf")]
        args += ["--cluster-port", str(self.bus_port)]
        if self.config_file is not None:
            args.insert(1, str(self.config_file))  # the file first, options after it win
        return args

    def client(self, **kw) -> redis.Redis:
        kw = {"socket_timeout": 2, "socket_connect_timeout": 2, "decode_responses": True, **kw}
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def call(self, *args):
        """One command, its raw reply: split names ("CLUSTER", "INFO") pass no redis-py
        response callback, so CLUSTER INFO and CLUSTER NODES come back as text."""
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def log_tail(self, chars: int = 1500) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def redis_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """redis-cli with args; RuntimeError with its output if it fails."""
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("no redis-cli on PATH; install Redis 7 (apt-get install redis-tools)")
    done = subprocess.run(
        [binary, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"redis-cli {' '.join(args)} failed (rc {done.returncode}):\n"
            f"{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )
    return done


def myself(node: ClusterNode) -> dict:
    """The node's own line of CLUSTER NODES: {"id", "flags", "master", "slots": set}."""
    text = node.call("CLUSTER", "NODES")
    if isinstance(text, bytes):
        text = text.decode()
    for line in text.splitlines():
        fields = line.split()
        if "myself" in fields[2].split(","):
            slots: set[int] = set()
            for item in fields[8:]:
                if item.startswith("["):  # a slot being migrated or imported: not owned yet
                    continue
                low, _, high = item.partition("-")
                slots.update(range(int(low), int(high or low) + 1))
            return {"id": fields[0], "flags": fields[2], "master": fields[3], "slots": slots}
    raise RuntimeError(f"CLUSTER NODES of 127.0.0.1:{node.port} has no 'myself' line")


class ClusterTopology:
    """`primaries` primaries with `replicas` replicas *each* (redis-cli's --cluster-replicas),
    so ClusterTopology(3, 1) is 3 primaries + 3 replicas; `nodes` lists them all in creation
    order, and primaries() says which are primaries now. With config_file (e.g.
    deploy/redis-cluster.conf) the nodes start from that file and the cluster settings are
    the file's; options= adds more config to every node."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        *,
        config_file: str | os.PathLike | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.replicas_per_primary = replicas
        settings = {}
        if config_file is None:
            settings = {
                "cluster-enabled": "yes",
                "cluster-node-timeout": str(node_timeout_ms),
                "cluster-require-full-coverage": "yes",
                # a promoted replica's new replicas sync at once, not after the default 5 s
                "repl-diskless-sync-delay": "0",
            }
        settings.update(options or {})
        taken: set[int] = set()
        self.nodes: list[ClusterNode] = [
            ClusterNode(config_file, taken=taken, appendonly=appendonly, options=settings)
            for _ in range(primaries * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.running()]

    # --- making it ------------------------------------------------------------------------

    def start_nodes(self) -> ClusterTopology:
        """Start every node, not yet joined (start() also joins them)."""
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.close()
            raise
        return self

    def create(self) -> None:
        """`redis-cli --cluster create` over every node (the first ones become primaries)."""
        redis_cli(
            "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes",
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> ClusterTopology:
        """Start the nodes, join them in a cluster and wait until it is ok everywhere."""
        self.start_nodes()
        try:
            self.create()
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    # --- looking at it --------------------------------------------------------------------

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        return key_slot(key.encode() if isinstance(key, str) else key)

    def node_id(self, node: ClusterNode) -> str:
        return node.call("CLUSTER", "MYID")

    def primaries(self) -> list[ClusterNode]:
        """Live nodes whose ROLE is master and that own slots, in creation order."""
        found = []
        for node in self.live():
            try:
                role = node.call("ROLE")[0]
                if role == "master" and myself(node)["slots"]:
                    found.append(node)
            except (redis.RedisError, OSError):
                continue  # dying or restarting: not a primary we can use
        return found

    def primary_for_slot(self, slot: int) -> ClusterNode:
        """The live primary that itself says it owns slot (a node's own word is
        authoritative; the others learn it by gossip)."""
        for node in self.primaries():
            if slot in myself(node)["slots"]:
                return node
        raise RuntimeError(f"no live primary owns slot {slot}")

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live nodes that replicate this primary."""
        me = myself(primary)["id"]
        return [n for n in self.live() if n is not primary and myself(n)["master"] == me]

    def node_at(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def _problem(self, replicas_up: bool = True) -> tuple[str, ClusterNode | None]:
        """("", None) when every live node says cluster_state:ok with all slots assigned,
        all agree on who owns which slot, and (replicas_up) every replica is in sync;
        else what is wrong and on which node."""
        views = {}
        for node in self.live():
            client = node.client()
            try:
                info = client.execute_command("CLUSTER", "INFO")
                if isinstance(info, bytes):
                    info = info.decode()
                fields = dict(ln.split(":", 1) for ln in info.split() if ":" in ln)
                if fields.get("cluster_state") != "ok":
                    return f"cluster_state:{fields.get('cluster_state')}", node
                if int(fields.get("cluster_slots_assigned", 0)) != SLOTS:
                    return f"slots assigned {fields.get('cluster_slots_assigned')}", node
                views[node.port] = sorted(
                    (r[0], r[1], r[2][1]) for r in client.execute_command("CLUSTER", "SLOTS")
                )
                if replicas_up and client.execute_command("ROLE")[0] == "slave":
                    link = client.info("replication").get("master_link_status")
                    if link != "up":
                        return f"replica master_link_status:{link}", node
            except (redis.RedisError, OSError) as e:
                return f"{type(e).__name__}: {e}", node
            finally:
                client.close()
        if not views:
            return "no live node", None
        first_port, first = next(iter(views.items()))
        for port, view in views.items():
            if view != first:
                return f"slot owners differ from 127.0.0.1:{first_port}", self.node_at(port)
        return "", None

    def wait_ok(self, timeout: float) -> None:
        """Until every live node says the cluster is ok and they agree on the slots, and
        every replica's link to its primary is up; RuntimeError after timeout."""
        self._wait(self._problem, timeout, "the cluster to be ok")

    def _wait(self, problem, timeout: float, what: str) -> None:
        """Poll problem() -> (why, node) until why is ""; RuntimeError with the last why and
        the node's log tail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            why, node = problem()
            if not why:
                return
            if time.monotonic() > deadline:
                where = f" on 127.0.0.1:{node.port}" if node is not None else ""
                tail = f"\nlog {node.log_path}:\n{node.log_tail()}" if node is not None else ""
                raise RuntimeError(
                    f"timed out after {timeout}s waiting for {what}: {why}{where}{tail}"
                )
            time.sleep(POLL)

    # --- breaking and changing it ---------------------------------------------------------

    def kill_primary(self, node: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """kill -9 a primary, wait until one of its replicas owns all its slots and the
        remaining nodes say the cluster is ok; return that new primary."""
        slots = myself(node)["slots"]
        if not slots:
            raise ValueError(f"127.0.0.1:{node.port} owns no slots")
        # the log to show if none takes over: one of its replicas says why (or nothing)
        replicas = self.replicas_of(node)
        witness = replicas[0] if replicas else None
        node.kill()
        probe = min(slots)

        def problem():
            try:
                new = self.primary_for_slot(probe)
                missing = slots - myself(new)["slots"]
            except (RuntimeError, redis.RedisError, OSError) as e:
                return f"slot {probe}: {e}", witness
            if missing:
                return f"127.0.0.1:{new.port} lacks {len(missing)} of the slots", new
            return self._problem()

        self._wait(problem, timeout, f"a replica to take over from 127.0.0.1:{node.port}")
        return self.primary_for_slot(probe)

    def reshard(
        self, source: ClusterNode, target: ClusterNode, slots: int, timeout: float = 60.0
    ) -> None:
        """Move `slots` slots (and their keys) from source to target with redis-cli, then
        wait until the cluster is ok, agrees on the new owners and has no open slots."""
        self.wait_ok(timeout)  # redis-cli refuses to reshard while the nodes disagree
        redis_cli(
            "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "100",
            timeout=timeout,
        )  # fmt: skip
        self._wait(self._check_problem, timeout, "the cluster to settle after the reshard")

    def move_slots(
        self, source: ClusterNode, target: ClusterNode, slots: list[int], timeout: float = 60.0
    ) -> None:
        """Move these slots (and their keys) from source to target, as redis-cli's reshard
        does slot by slot (IMPORTING / MIGRATING, MIGRATE of the keys, SETSLOT NODE on every
        primary, the target first), then wait as reshard() does. reshard() lets redis-cli
        pick the slots; this moves the ones a test needs moved."""
        self.wait_ok(timeout)
        source_id, target_id = self.node_id(source), self.node_id(target)
        others = [p for p in self.primaries() if p is not source and p is not target]
        # the target first, so it owns the slot before the source hands it over
        clients = [n.client(decode_responses=False, socket_timeout=10) for n in (target, source)]
        clients += [n.client() for n in others]
        dst, src = clients[0], clients[1]
        try:
            for slot in slots:
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                    src.execute_command(
                        "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                    )
                for client in clients:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        finally:
            for client in clients:
                client.close()
        self._wait(self._check_problem, timeout, "the cluster to settle after moving slots")

    def _check_problem(self) -> tuple[str, ClusterNode | None]:
        why, node = self._problem()
        if why:
            return why, node
        at = self.primaries()[0]
        done = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "check",
             f"127.0.0.1:{at.port}"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        # check exits 0 on an ok cluster, but also says [WARNING] for open slots
        if done.returncode != 0 or "[WARNING]" in done.stdout or "[ERR]" in done.stdout:
            return f"redis-cli --cluster check:\n{done.stdout[-2000:]}", at
        return "", None

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> ClusterTopology:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
