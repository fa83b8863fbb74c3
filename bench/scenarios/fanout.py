"""fanout: one task to each of N clients holding a TaskStream, over R replicas.

The load generator opens N TaskStreams (``streams_per_channel`` on each channel, round
robin over the replicas, ``open_rate`` a second). Once every stream is open (the
replicas' stream leases in Redis), the suite pushes one task per client with
broker.tasks.push, all at once, and the load generator notes when each task arrives.
Delay = arrival - push start. Baseline: the bare server holding N streams in memory,
where one unary call releases one message to every stream (delay = arrival - call start).

Then a burst: N streams opened all at once on one replica (clients reconnecting after a
restart); how many the server accepts, against the bare server.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.suite import Bench, Deployment, row


async def one(bench: Bench, dep: Deployment, n: int, tag: str) -> dict:
    cfg = bench.cfg
    prefix = f"fan{tag}-"
    before = await bench.count_streams(dep)
    spec = {
        "kind": "streams",
        "mode": "fanout",
        "target": dep.target,
        "round_robin": dep.round_robin,
        "clients": n,
        "per_channel": cfg.streams_per_channel,
        "open_rate": cfg.open_rate,
        "client_prefix": prefix,
        "timeout": 120,
    }
    proc = await bench.client(spec)
    try:
        await proc.event("opened", within=300)
        setup = await bench.wait_streams(dep, before + n, within=300)
        await asyncio.sleep(0.5)  # let stream set-up traffic settle
        t0 = time.time()
        if dep.bare:
            released = await bench.release(dep)
            acked = time.time()
        else:
            broker = await bench.broker(dep.prefix)
            # As the coordinator starts a round: one push_many, 1000 tasks per pipeline.
            clients = [f"{prefix}{i}" for i in range(n)]
            await broker.tasks.push_many(clients, "Custom_bench", data="{}")
            released = n
            acked = time.time()
        result = await proc.result(within=180)
    finally:
        await proc.stop()
    receipts = result["receipts"]
    delays = np.array(sorted(t - t0 for t in receipts.values()))
    missing = n - len(receipts)
    return {
        "clients": n,
        "received": len(receipts),
        "missing": missing,
        "released": released,
        "setup_s": setup,
        "push_ack_s": acked - t0,
        "last_s": float(delays[-1]) if delays.size else None,
        "p50_s": float(np.percentile(delays, 50)) if delays.size else None,
        "p99_s": float(np.percentile(delays, 99)) if delays.size else None,
        "stream_errors": result["errors"],
    }


async def burst(bench: Bench, dep: Deployment, n: int, tag: str) -> dict:
    """Open n streams at once; count those open once the count stops growing."""
    before = await bench.count_streams(dep)
    spec = {
        "kind": "streams",
        "mode": "hold",
        "target": dep.target,
        "clients": n,
        "per_channel": bench.cfg.streams_per_channel,
        "client_prefix": f"burst{tag}-",
    }
    proc = await bench.client(spec)
    t = time.monotonic()
    try:
        await proc.event("opened", within=300)
        last, still = -1, 0.0
        while time.monotonic() - t < 60:
            got = await bench.count_streams(dep) - before
            if got >= n:
                break
            still = still + 0.25 if got == last else 0.0
            if still >= 3.0:
                break
            last = got
            await asyncio.sleep(0.25)
        seconds = time.monotonic() - t
        await proc.send(cmd="stop")
        result = await proc.result(within=120)
    finally:
        await proc.stop()
    return {"clients": n, "accepted": got, "seconds": seconds, "stream_errors": result["errors"]}


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    n = cfg.fanout_clients
    specs = [("bare", 0)] + [(f"r{r}", r) for r in cfg.fanout_replicas]
    deps = await bench.deploy(*specs)
    runs: dict[str, dict] = {}
    for i, dep in enumerate(deps):
        runs[dep.label()] = await one(bench, dep, n, str(i))
    base = runs["bare"]
    rows = []
    for dep in deps[1:]:
        s = runs[dep.label()]
        case = f"{n} streams {dep.label()}"
        if s["missing"]:
            case += f" ({s['missing']} missing)"
        rows += [
            row(case, "push→last", "s", s["last_s"], "bare in-memory", base["last_s"], "lower",
                key=f"{dep.label()}/last"),
            row(case, "p99 delay", "s", s["p99_s"], "bare in-memory", base["p99_s"], "lower",
                key=f"{dep.label()}/p99"),
            row(case, "p50 delay", "s", s["p50_s"], "bare in-memory", base["p50_s"], "lower"),
        ]  # fmt: skip
    bare, r1 = await bench.deploy(("bare", 0), ("r1", 1))
    bursts = {"bare": await burst(bench, bare, n, "b"), "R=1": await burst(bench, r1, n, "r")}
    runs["burst"] = bursts
    rows.append(
        row(
            f"{n} streams opened at once, R=1",
            "streams accepted",
            "",
            bursts["R=1"]["accepted"],
            "bare grpc.aio",
            bursts["bare"]["accepted"],
            key="burst",
        )
    )
    for dep in (*deps[1:], r1):
        await bench.clear(dep.prefix)
    return {"rows": rows, "details": {"clients": n, "runs": runs}}
