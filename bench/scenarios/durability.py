"""durability: what ``--durability replicated`` costs (broker/durability.py).

SendModelMetric at saturation on one replica with ``--durability local`` and on one with
``--durability replicated``, against the suite's Redis with a replica of it started for this
scenario (a second redis-server on loopback, ``replicaof``; stopped at the end, so the other
scenarios run without it). Runs interleave (local, replicated, local, ...); the median of
each counts. The baseline of every row is the local run: throughput, p99, the replica
process's CPU per RPC, and the replica process's Redis round trips per RPC (the WAIT rides
in the pipeline's own packet, so it should add none).

Round trips here leave out the Redis replica's REPLCONF ACKs: each is a read event on the
master too (one per WAIT: the master asks for it), which the shared count in
bench/scenarios/unary.py would take for a direct command of the replica under test.
"""

from __future__ import annotations

import asyncio

from bench.procs import ReplicaRedisProc
from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, row

METHOD = "SendModelMetric"
MODES = ("local", "replicated")


BASE = "--durability local"


def cost_rows(case: str, repl: dict, local: dict, **server_extra) -> list[dict]:
    """Throughput, p99 and server CPU/RPC of a replicated run against a local one."""
    return [
        row(case, "msgs/s", "1/s", repl["rps"], BASE, local["rps"]),
        row(case, "p99", "ms", repl["p99_ms"], BASE, local["p99_ms"], "lower"),
        row(
            case,
            "server CPU/RPC",
            "µs",
            repl["cpu_us_per_rpc_servers"],
            BASE,
            local["cpu_us_per_rpc_servers"],
            "lower",
            **server_extra,
        ),
    ]


def client_round_trips(s: dict) -> float:
    """Round trips per RPC of the replica under test (see the module doc)."""
    r = s["redis"]
    acks = r["commands"].get("replconf", 0)
    direct = max(0, r["reads"] - r["exec"] - acks - 2)
    return (r["exec"] + direct) / max(s["rpcs"], 1)


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    replica = ReplicaRedisProc(bench.registry, bench.workdir, bench.redis)
    await asyncio.to_thread(replica.start)
    try:
        await asyncio.to_thread(replica.ready)
        specs = [(f"dur-{mode}", 1, "--durability", mode) for mode in MODES]
        deps = dict(zip(MODES, await bench.deploy(*specs), strict=True))
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(cfg.durability_reps):
            for mode in MODES:
                result = await bench.unary(deps[mode], METHOD, client_prefix="dur-")
                runs[mode].append(summary(result))
        for mode in MODES:
            await bench.retire(f"dur-{mode}")
            await bench.clear(f"bench-dur-{mode}")
    finally:
        await asyncio.to_thread(replica.close)
    local, repl = (pick_median(runs[mode]) for mode in MODES)
    trips = {mode: client_round_trips(s) for mode, s in (("local", local), ("replicated", repl))}
    case = f"{METHOD} --durability replicated"
    rows = [
        *cost_rows(
            case,
            repl,
            local,
            redis_cpu_us_per_rpc=repl["cpu_us_per_rpc_redis"],
            local_redis_cpu_us_per_rpc=local["cpu_us_per_rpc_redis"],
        ),
        row(
            case,
            "Redis round trips/RPC",
            "",
            trips["replicated"],
            BASE,
            trips["local"],
            "lower",
            waits_per_rpc=repl["redis"]["commands"].get("wait", 0) / max(repl["rpcs"], 1),
        ),
    ]
    errors = {mode: sum(r["errors"] for r in runs[mode]) for mode in MODES}
    return {"rows": rows, "details": {"runs": runs, "errors": errors}}
