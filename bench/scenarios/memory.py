"""memory: resident memory per open TaskStream and per polling client on one replica.

A fresh replica (and a fresh bare server as the baseline) first gets a tenth of the
clients, then all of them; the marginal cost is ΔVmRSS / Δclients between the two, read
from /proc/PID/status once the clients are in and the process has settled. TaskStreams
share channels ``streams_per_channel`` to a connection (as behind an HTTP/2 load
balancer); polling clients poll every ``poll_interval`` seconds, ``pollers_per_channel``
to a connection.
"""

from __future__ import annotations

import asyncio

from bench.suite import Bench, Deployment, row


async def settled_rss(dep: Deployment, settle: float) -> int:
    """VmRSS in kB once it stops moving (or after a few more looks)."""
    server = dep.servers[0]
    await asyncio.sleep(settle)
    last = server.rss_kb()
    for _ in range(5):
        await asyncio.sleep(settle / 3)
        now = server.rss_kb()
        if abs(now - last) < 256:
            return now
        last = now
    return last


async def streams(bench: Bench, dep: Deployment, n: int) -> dict:
    cfg = bench.cfg
    first = max(1, n // 10)
    idle = await settled_rss(dep, cfg.settle)
    spec = {
        "kind": "streams",
        "mode": "hold",
        "target": dep.target,
        "clients": first,
        "per_channel": cfg.streams_per_channel,
        "open_rate": cfg.open_rate,
        "client_prefix": "mem-s-",
    }
    proc = await bench.client(spec)
    try:
        await proc.event("opened", within=120)
        await bench.wait_streams(dep, first, within=120)
        rss1 = await settled_rss(dep, cfg.settle)
        await proc.send(cmd="grow", to=n)
        await proc.event("opened", within=300)
        setup = await bench.wait_streams(dep, n, within=600)
        rss2 = await settled_rss(dep, cfg.settle)
        await proc.send(cmd="stop")
        await proc.result(within=120)
    finally:
        await proc.stop()
    return {
        "clients": n,
        "idle_kb": idle,
        "rss_first_kb": rss1,
        "rss_all_kb": rss2,
        "per_client_kb": (rss2 - rss1) / (n - first),
        "setup_s": setup,
    }


async def pollers(bench: Bench, dep: Deployment, n: int) -> dict:
    cfg = bench.cfg
    first = max(1, n // 10)
    idle = await settled_rss(dep, cfg.settle)
    spec = {
        "kind": "pollers",
        "target": dep.target,
        "clients": first,
        "interval": cfg.poll_interval,
        "per_channel": cfg.pollers_per_channel,
        "client_prefix": "mem-p-",
    }
    proc = await bench.client(spec)
    try:
        await proc.event("polling", within=120)
        rss1 = await settled_rss(dep, cfg.settle)
        await proc.send(cmd="grow", to=n)
        await proc.event("polling", within=300)
        rss2 = await settled_rss(dep, cfg.settle)
        await proc.send(cmd="stop")
        result = await proc.result(within=120)
    finally:
        await proc.stop()
    return {
        "clients": n,
        "idle_kb": idle,
        "rss_first_kb": rss1,
        "rss_all_kb": rss2,
        "per_client_kb": (rss2 - rss1) / (n - first),
        "polls": result["polls"],
        "errors": result["errors"],
    }


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    # Fresh processes: a process that served other loads reuses freed memory.
    deps = await bench.deploy(("mem-s", 1), ("mem-s-bare", 0), ("mem-p", 1), ("mem-p-bare", 0))
    mem_s, mem_s_bare, mem_p, mem_p_bare = deps
    runs = {
        "streams replica": await streams(bench, mem_s, cfg.memory_streams),
        "streams bare": await streams(bench, mem_s_bare, cfg.memory_streams),
        "pollers replica": await pollers(bench, mem_p, cfg.memory_pollers),
        "pollers bare": await pollers(bench, mem_p_bare, cfg.memory_pollers),
    }
    for name in ("mem-s", "mem-s-bare", "mem-p", "mem-p-bare"):
        await bench.retire(name)
    await bench.clear(mem_s.prefix)
    await bench.clear(mem_p.prefix)
    s, sb = runs["streams replica"], runs["streams bare"]
    p, pb = runs["pollers replica"], runs["pollers bare"]
    rows = [
        row(f"{s['clients']} TaskStreams, 1 replica", "RSS/stream", "KB", s["per_client_kb"],
            "bare grpc.aio", sb["per_client_kb"], "lower", key="streams"),
        row(f"{s['clients']} TaskStreams, 1 replica", "RSS total", "MB", s["rss_all_kb"] / 1024,
            "bare grpc.aio", sb["rss_all_kb"] / 1024, "lower"),
        row(f"{p['clients']} pollers every {cfg.poll_interval:g}s", "RSS/client", "KB",
            p["per_client_kb"], "bare grpc.aio", pb["per_client_kb"], "lower", key="pollers"),
        row(f"{p['clients']} pollers every {cfg.poll_interval:g}s", "RSS total", "MB",
            p["rss_all_kb"] / 1024, "bare grpc.aio", pb["rss_all_kb"] / 1024, "lower"),
    ]  # fmt: skip
    return {"rows": rows, "details": {"runs": runs}}
