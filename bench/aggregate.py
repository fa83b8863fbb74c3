"""The round scenario's child processes (so their peak memory is their own):

``python -m bench.aggregate fedavg ...``: one FedAvg with the coordinator's code path,
workers.coordinator.Coordinator._aggregate, over a round the suite prepared in Redis.

``python -m bench.aggregate numpy ...``: the baseline, a numpy weighted mean of the same
models all in memory; then it checks the FedAvg result against it.

Each prints one JSON line. Peak memory is VmHWM from /proc/self/status, reset just before
the measured part (writing 5 to /proc/self/clear_refs), minus VmRSS at that moment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np

from bench import fedmodels
from bench.procs import rss_kb


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory() -> dict:
    pid = os.getpid()
    return {"rss_kb": rss_kb(pid), "hwm_kb": rss_kb(pid, "VmHWM")}


async def fedavg(args) -> dict:
    from broker import connect
    from broker.context import Settings
    from workers.coordinator import DEFAULTS, Coordinator

    broker = await connect(args.redis_url, settings=Settings(prefix=args.prefix))
    try:
        coordinator = Coordinator(broker, "bench-aggregator")
        reset = reset_peak()
        before = memory()
        t = time.perf_counter()
        await coordinator._aggregate(args.session, args.round, dict(DEFAULTS))
        seconds = time.perf_counter() - t
        after = memory()
        rnd = await broker.sessions.round(args.session, args.round)
    finally:
        await broker.close()
    base = before["rss_kb"] if reset else 0
    return {
        "seconds": seconds,
        "peak_reset": reset,
        "rss_before_kb": before["rss_kb"],
        "hwm_kb": after["hwm_kb"],
        "peak_above_kb": after["hwm_kb"] - base,
        "model_out": rnd.model_out,
        "updates": rnd.update_count,
        "rejected": json.loads(rnd.rejected or "{}"),
    }


async def baseline(args) -> dict:
    k, size = args.clients, args.model_bytes
    reset_peak()
    before = memory()
    n = size // 4
    stack = np.empty((k, n), dtype=np.float32)
    for i in range(k):
        stack[i] = np.concatenate(fedmodels.arrays(i, size))
    w = np.array([fedmodels.weight(i) for i in range(k)], dtype=np.float32)
    t = time.perf_counter()
    mean = (w @ stack) / w.sum()
    seconds = time.perf_counter() - t
    after = memory()
    out = {
        "seconds": seconds,
        "rss_before_kb": before["rss_kb"],
        "hwm_kb": after["hwm_kb"],
        "peak_above_kb": after["hwm_kb"] - before["rss_kb"],
    }
    del stack
    if args.compare:
        from broker import connect
        from broker.context import Settings
        from workers.fedavg import load_npz

        broker = await connect(args.redis_url, settings=Settings(prefix=args.prefix))
        try:
            got = np.concatenate(load_npz(await broker.models.get(args.compare)))
        finally:
            await broker.close()
        diff = np.abs(got.astype(np.float64) - mean)
        out["max_abs_diff"] = float(diff.max())
        out["max_rel_diff"] = float((diff / (np.abs(mean) + 1e-3)).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fedavg", "numpy"))
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--session", default="")
    parser.add_argument("--round", default="1")
    parser.add_argument("--clients", type=int, default=0)
    parser.add_argument("--model-bytes", type=int, default=0)
    parser.add_argument("--compare", default="", help="model id of the FedAvg result")
    args = parser.parse_args()
    run = fedavg if args.mode == "fedavg" else baseline
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
