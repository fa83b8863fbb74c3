"""cluster: poll and ingest on a Redis Cluster of 1 primary vs 3 primaries.

Two clusters are started for this scenario only (nodes on loopback free ports, stopped by
PID at the end; tests/redis_cluster.py's nodes): one of a single primary owning all 16384
slots (``CLUSTER ADDSLOTSRANGE``: ``redis-cli --cluster create`` wants 3 primaries) and one
of 3 primaries (``redis-cli --cluster create``), no cluster replicas. ``cluster_replicas``
combiner replicas (``combiner serve --redis-url redis://127.0.0.1:PORT``, any node: the
broker detects the cluster itself and splits the per-client keys into its default 16
partitions) run against each, all at once, so runs can interleave: PollAndReport with an
idle report and SendModelMetric at saturation (the load generator as in poll / ingest,
round-robin over the replicas), 1 primary then 3 primaries, ``cluster_reps`` times; the
median run of each case counts. The baseline of every row is the 1-primary cluster.

* **server CPU/RPC**: user+system CPU of the replica processes (all of them) per RPC.
* **Redis CPU/RPC**: user+system CPU of every primary of the cluster, summed.
* **Redis round trips/RPC**: on a cluster a batch goes as a non-transactional pipeline per
  node (no MULTI/EXEC), so every read event is a round trip: Σ over the nodes of
  (Δ``total_reads_processed`` - 2), the 2 being the scenario's own INFO calls to that node
  inside the window (as in bench/scenarios/unary.py). A pipeline larger than one read
  (16 KiB) counts more than once: an upper bound. Redis commands per RPC (including those
  inside Lua) are in the row too.

The point on a 2-core machine is the cost per RPC (3 primaries + the replicas + the load
generator share the cores), not raw scaling.

**--durability replicated on a Cluster**: a third cluster, 3 primaries with one replica each,
carries two deployments of ``cluster_replicas`` replicas, ``--durability local`` and
``--durability replicated``; SendModelMetric at saturation on each, interleaved, the local
run as the baseline. Redis CPU there is every node's (replicas too: WAIT makes them
acknowledge); round trips are the primaries' read events less their replicas' REPLCONF
ACKs (bench/scenarios/durability.py says why).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from bench.client import redis_snapshot
from bench.procs import cpu_seconds
from bench.scenarios import durability
from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, Deployment, row
from tests.redis_cluster import ClusterNode, ClusterTopology

METHODS = ("PollAndReport", "SendModelMetric")
PRIMARIES = (1, 3)
OWN_READS = 2  # per node inside the window: the after snapshot's INFO stats, the before one's
# INFO commandstats (bench.client.redis_snapshot sends two INFOs)


class BenchCluster(ClusterTopology):
    """A ClusterTopology of `primaries` primaries with `replicas` replicas each, whose nodes
    live under the bench's workdir and are registered with the suite (its last-resort kill
    reaches them); 1 primary is made by hand, as redis-cli's create needs 3."""

    def __init__(self, bench: Bench, primaries: int, replicas: int = 0, name: str = "") -> None:
        self.replicas_per_primary = replicas
        self.registry = bench.registry
        settings = {
            "cluster-enabled": "yes",
            "cluster-node-timeout": "1000",
            "cluster-require-full-coverage": "yes",
            "repl-diskless-sync-delay": "0",
        }
        taken: set[int] = set()
        folder = bench.workdir / (name or f"cluster{primaries}")
        self.nodes = [
            ClusterNode(taken=taken, options=settings, data_dir=folder / f"node{i + 1}")
            for i in range(primaries * (1 + replicas))
        ]

    def start_nodes(self) -> BenchCluster:
        super().start_nodes()
        for node in self.nodes:
            self.registry.add(node.process)
        return self

    def create(self) -> None:
        if len(self.nodes) >= 3:
            super().create()
            return
        for node in self.nodes:  # one node, all slots
            node.call("CLUSTER", "ADDSLOTSRANGE", "0", "16383")

    def pids(self) -> list[int]:
        """Every node's: Redis CPU is the primaries' and (with replicas) their replicas'."""
        return [node.pid for node in self.live()]


def cluster_round_trips(before: list[dict], after: list[dict], rpcs: int) -> dict:
    """Round trips (read events) and commands per RPC, summed over the nodes."""
    n = max(rpcs, 1)
    per_node = []
    for b, a in zip(before, after, strict=True):
        reads = a["total_reads_processed"] - b["total_reads_processed"]
        cmds = {
            k: a["commandstats"].get(k, 0) - b["commandstats"].get(k, 0) for k in a["commandstats"]
        }
        commands = a["total_commands_processed"] - b["total_commands_processed"]
        acks = cmds.get("replconf", 0)  # a replica's REPLCONF ACK: a read, not an RPC's
        per_node.append(
            {
                "reads": reads,
                "round_trips": max(0, reads - OWN_READS - acks),
                "exec": cmds.get("exec", 0),
                "commands": commands - cmds.get("info", 0),
                "commandstats": {k: v for k, v in sorted(cmds.items()) if v and k != "info"},
            }
        )
    trips = sum(p["round_trips"] for p in per_node)
    commands = sum(p["commands"] for p in per_node)
    return {
        "round_trips": trips,
        "round_trips_per_rpc": trips / n,
        "rpcs_per_round_trip": rpcs / trips if trips else None,
        "redis_commands_per_rpc": commands / n,  # including those inside Lua scripts
        "exec": sum(p["exec"] for p in per_node),  # 0: cluster batches are plain pipelines
        "nodes": per_node,
    }


async def measured(bench: Bench, dep: Deployment, cluster: BenchCluster, method: str) -> dict:
    """One closed-loop run (as Bench.timed) with the replicas' CPU, the CPU of every
    primary and every node's INFO at the window's edges."""
    cfg = bench.cfg
    # the load generator snapshots one Redis; we snapshot every node
    spec = bench.unary_spec(dep, method, redis_url="", client_prefix="cl-")
    servers = [s.pid for s in dep.servers]
    redis_pids = cluster.pids()
    # round trips are the primaries' (a replica reads its primary's stream, not RPCs)
    clients = [aioredis.Redis(host="127.0.0.1", port=n.port) for n in cluster.primaries()]

    def cpu() -> dict:
        return {
            "servers": sum(cpu_seconds(p) for p in servers),
            "redis": sum(cpu_seconds(p) for p in redis_pids),
        }

    async def window(start: float) -> tuple[dict, list[dict], list[dict]]:
        await asyncio.sleep(max(0.0, start - time.time()))
        c0 = cpu()
        snaps0 = await asyncio.gather(*(redis_snapshot(c) for c in clients))
        await asyncio.sleep(max(0.0, start + cfg.duration - time.time()))
        c1 = cpu()
        snaps1 = await asyncio.gather(*(redis_snapshot(c) for c in clients))
        return {f"{k}_s": c1[k] - c0[k] for k in c0}, list(snaps0), list(snaps1)

    proc = await bench.client(spec)
    task = None
    try:
        await proc.event("ready", within=60)
        t0 = time.time() + 0.05
        await proc.send(cmd="go", t0=t0)
        task = asyncio.create_task(window(t0 + cfg.warmup))
        result = await proc.result(within=cfg.warmup + cfg.duration + 120)
        result["cpu"], before, after = await task
    finally:
        if task is not None and not task.done():
            task.cancel()
        await proc.stop()
        for c in clients:
            await c.aclose()
    result.pop("redis", None)
    s = summary(result)
    s["redis"] = cluster_round_trips(before, after, result["rpcs"])
    return s


DURABILITY = ("local", "replicated")


async def durability_runs(bench: Bench) -> dict[str, list[dict]]:
    """SendModelMetric under --durability local and replicated, interleaved, on a cluster
    of 3 primaries with a replica each (see the module doc)."""
    cfg = bench.cfg
    cluster = BenchCluster(bench, 3, replicas=1, name="cluster3r")
    runs: dict[str, list[dict]] = {}
    names = [f"cluster3r-{mode}" for mode in DURABILITY]
    try:
        await asyncio.to_thread(cluster.start)
        specs = [
            (name, cfg.cluster_replicas, "--durability", mode)
            for name, mode in zip(names, DURABILITY, strict=True)
        ]
        deps = await bench.deploy(*specs, redis_url=cluster.url)
        for _ in range(cfg.cluster_reps):
            for mode, dep in zip(DURABILITY, deps, strict=True):
                s = await measured(bench, dep, cluster, "SendModelMetric")
                runs.setdefault(f"durability {mode}", []).append(s)
    finally:
        for name in names:
            await bench.retire(name)
        await asyncio.to_thread(cluster.close)
    return runs


def durability_rows(runs: dict[str, list[dict]], r: int) -> list[dict]:
    local, repl = (pick_median(runs[f"durability {mode}"]) for mode in DURABILITY)
    case = f"SendModelMetric R={r}, 3 primaries + replicas, --durability replicated"
    base = durability.BASE
    return [
        *durability.cost_rows(case, repl, local),
        row(
            case,
            "Redis CPU/RPC",
            "µs",
            repl["cpu_us_per_rpc_redis"],
            base,
            local["cpu_us_per_rpc_redis"],
            "lower",
        ),
        row(
            case,
            "Redis round trips/RPC",
            "",
            repl["redis"]["round_trips_per_rpc"],
            base,
            local["redis"]["round_trips_per_rpc"],
            "lower",
            waits_per_rpc=sum(n["commandstats"].get("wait", 0) for n in repl["redis"]["nodes"])
            / max(repl["rpcs"], 1),
        ),
    ]


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    clusters: dict[int, BenchCluster] = {}
    runs: dict[str, list[dict]] = {}
    try:
        for n in PRIMARIES:
            clusters[n] = BenchCluster(bench, n)
        await asyncio.gather(*(asyncio.to_thread(c.start) for c in clusters.values()))
        deps = {
            n: (await bench.deploy((f"cluster{n}", cfg.cluster_replicas), redis_url=c.url))[0]
            for n, c in clusters.items()
        }
        for _ in range(cfg.cluster_reps):  # interleaved: 1, 3, 1, 3 primaries ...
            for method in METHODS:
                for n in PRIMARIES:
                    s = await measured(bench, deps[n], clusters[n], method)
                    runs.setdefault(f"{method} {n}", []).append(s)
    finally:
        for n in PRIMARIES:
            await bench.retire(f"cluster{n}")
        await asyncio.gather(*(asyncio.to_thread(c.close) for c in clusters.values()))
    runs.update(await durability_runs(bench))
    errors = {k: sum(r["errors"] for r in v) for k, v in runs.items()}
    codes: dict[str, dict] = {}
    for k, v in runs.items():
        for r in v:
            for code, count in r["error_codes"].items():
                codes.setdefault(k, {}).setdefault(code, 0)
                codes[k][code] += count
    for k, v in runs.items():
        if not any(r["rpcs"] for r in v):
            raise RuntimeError(f"{k}: no RPC succeeded on the cluster ({codes.get(k)})")
    rows = []
    r = cfg.cluster_replicas
    for method in METHODS:
        one, three = (pick_median(runs[f"{method} {n}"]) for n in PRIMARIES)
        base = "1 primary"
        case = f"{method} R={r}, 3 primaries"
        unit = "msgs/s" if method.startswith("Send") else "RPS"
        key = "poll" if method == "PollAndReport" else "ingest"
        rows += [
            row(case, unit, "1/s", three["rps"], base, one["rps"], key=f"{key}/rps"),
            row(case, "p99", "ms", three["p99_ms"], base, one["p99_ms"], "lower"),
            row(
                case,
                "server CPU/RPC",
                "µs",
                three["cpu_us_per_rpc_servers"],
                base,
                one["cpu_us_per_rpc_servers"],
                "lower",
            ),
            row(
                case,
                "Redis CPU/RPC",
                "µs",
                three["cpu_us_per_rpc_redis"],
                base,
                one["cpu_us_per_rpc_redis"],
                "lower",
                key=f"{key}/redis_cpu",
            ),
            row(
                case,
                "Redis round trips/RPC",
                "",
                three["redis"]["round_trips_per_rpc"],
                base,
                one["redis"]["round_trips_per_rpc"],
                "lower",
                key=f"{key}/round_trips",
                redis_commands_per_rpc=three["redis"]["redis_commands_per_rpc"],
                base_redis_commands_per_rpc=one["redis"]["redis_commands_per_rpc"],
            ),
            row(
                f"{method} R={r}, 1 primary",
                "Redis round trips/RPC",
                "",
                one["redis"]["round_trips_per_rpc"],
                "unbatched (1/RPC)",
                1.0,
                "lower",
            ),
        ]
    rows += durability_rows(runs, r)
    return {
        "rows": rows,
        "details": {
            "replicas": r,
            "clients": cfg.clients,
            "channels": cfg.channels,
            "runs": runs,
            "errors": errors,
            "error_codes": codes,
            "round_trip_formula": (
                "round trips/RPC = Σ over the cluster's nodes of (Δ total_reads_processed - "
                f"{OWN_READS}) / RPCs (cluster batches are plain pipelines, one read each; "
                f"{OWN_READS} = the scenario's own INFO calls to each node in the window)"
            ),
        },
    }
