"""pollers: many clients polling at an interval over 2 replicas; latency of each poll.

``pollers_clients`` clients (one client id each, ``pollers_per_channel`` to a channel)
each call PollAndReport with an idle report every ``pollers_interval`` seconds (after a
random initial offset, so the load is spread evenly), split over ``pollers_procs`` load
generator processes. Against the 2-replica deployment they use round-robin channels
(``ipv4:127.0.0.1:P1,127.0.0.1:P2``) as in the poll scenario. Once every client has
polled twice, all load generators measure the same ``pollers_window`` seconds: p50/p99
of the polls that start and end inside it and the achieved polls/s. Open loop in effect:
the offered rate is clients / interval whatever the latency, so p99 is the figure.
The baseline is the bare grpc.aio server under the same load.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from bench.suite import Bench, Deployment, row


async def measure(bench: Bench, dep: Deployment, tag: str) -> dict:
    cfg = bench.cfg
    n, k = cfg.pollers_clients, max(1, min(cfg.pollers_procs, cfg.pollers_clients))
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    procs = []
    try:
        for i, size in enumerate(sizes):
            spec = {
                "kind": "pollers",
                "target": dep.target,
                "round_robin": dep.round_robin,
                "clients": size,
                "interval": cfg.pollers_interval,
                "per_channel": cfg.pollers_per_channel,
                "client_prefix": f"pl-{tag}-{i}-",
            }
            procs.append(await bench.client(spec))
        t = time.monotonic()
        await asyncio.gather(*(p.event("polling", within=300) for p in procs))
        ramp = time.monotonic() - t
        t0 = time.time() + 0.2
        for p in procs:
            await p.send(cmd="measure", t0=t0, seconds=cfg.pollers_window)
        gens = [p.process.pid for p in procs]
        cpu = asyncio.create_task(bench._cpu(dep, t0, cfg.pollers_window, gens))
        parts = await asyncio.gather(
            *(p.event("measured", within=cfg.pollers_window + 120) for p in procs)
        )
        used = await cpu
        for p in procs:
            await p.send(cmd="stop")
        finals = await asyncio.gather(*(p.result(within=120) for p in procs))
    finally:
        for p in procs:
            await p.stop()
    lat = np.array([x for part in parts for x in part["latencies_us"]], dtype=np.float64) / 1e3
    polls = sum(part["polls"] for part in parts)
    errors = sum(part["errors"] for part in parts)
    codes: dict[str, int] = {}
    for part in parts:
        for code, c in part["error_codes"].items():
            codes[code] = codes.get(code, 0) + c
    return {
        "clients": n,
        "procs": k,
        "interval_s": cfg.pollers_interval,
        "ramp_s": ramp,
        "seconds": cfg.pollers_window,
        "polls": polls,
        "polls_per_s": polls / cfg.pollers_window,
        "offered_per_s": n / cfg.pollers_interval,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "max_ms": float(lat.max()) if lat.size else None,
        "latency_samples": int(lat.size),
        "errors": errors,
        "error_codes": codes,
        "cpu": used,
        "cpu_us_per_poll_servers": used["servers_s"] / max(polls, 1) * 1e6,
        "cpu_us_per_poll_loadgen": used["loadgen_s"] / max(polls, 1) * 1e6,
        "total_polls": sum(f["polls"] for f in finals),
        "total_errors": sum(f["errors"] for f in finals),
    }


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    bare, r2 = await bench.deploy(("pollers-bare", 0), ("pollers-r2", 2))
    runs = {
        "bare": await measure(bench, bare, "bare"),
        "R=2": await measure(bench, r2, "r2"),
    }
    for name in ("pollers-bare", "pollers-r2"):
        await bench.retire(name)
    await bench.clear(r2.prefix)
    s, b = runs["R=2"], runs["bare"]
    case = f"{s['clients']} pollers every {cfg.pollers_interval:g}s, R=2"
    cores = {k: v / cfg.pollers_window for k, v in s["cpu"].items()}
    bound = (
        f"the bare server's p99 under the same load: {b['p99_ms']:.0f} ms; cores busy: "
        f"replicas {cores['servers_s']:.2f}, Redis {cores.get('redis_s', 0):.2f}, "
        f"load generators {cores['loadgen_s']:.2f} of {os.cpu_count()}"
    )
    rows = [
        row(case, "p50", "ms", s["p50_ms"], "bare grpc.aio", b["p50_ms"], "lower"),
        row(case, "p99", "ms", s["p99_ms"], "bare grpc.aio", b["p99_ms"], "lower", key="R=2/p99",
            bound=bound),
        row(case, "polls/s", "1/s", s["polls_per_s"], "bare grpc.aio", b["polls_per_s"],
            offered_per_s=s["offered_per_s"], errors=s["errors"]),
    ]  # fmt: skip
    return {"rows": rows, "details": {"runs": runs}}
