"""The round scenario's child processes (so their peak memory is their own):

``python -m bench.aggregate coordinator [--aggregator NAME] [--kwargs JSON] ...``: one
aggregation with the coordinator's code path, workers.coordinator.Coordinator._aggregate,
over a round the suite prepared in Redis; the session config is the coordinator's DEFAULTS
with ``aggregator`` (default fedavg) and ``aggregator_kwargs`` (default {}) set.

``python -m bench.aggregate numpy ...``: the baseline, a numpy weighted mean of the same
models all in memory; then it checks the coordinator's results against numpy
(``--compare NAME=MODEL_ID``, repeatable: fedavg against the weighted mean, fedopt against
one server-optimizer step from ``--seed-model`` by the formulas of workers/aggregators.py,
fedmedian against np.median and fedtrimmedavg against a sorted, trimmed np.mean of the
stacked models).

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


async def coordinator(args) -> dict:
    from broker import connect
    from broker.context import Settings
    from workers.coordinator import DEFAULTS, Coordinator

    kwargs = json.loads(args.kwargs)
    cfg = dict(DEFAULTS)
    cfg.update(aggregator=args.aggregator, aggregator_kwargs=kwargs)
    broker = await connect(args.redis_url, settings=Settings(prefix=args.prefix))
    try:
        coord = Coordinator(broker, "bench-aggregator")
        reset = reset_peak()
        before = memory()
        t = time.perf_counter()
        await coord._aggregate(args.session, args.round, cfg)
        seconds = time.perf_counter() - t
        after = memory()
        rnd = await broker.sessions.round(args.session, args.round)
    finally:
        await broker.close()
    base = before["rss_kb"] if reset else 0
    return {
        "aggregator": args.aggregator,
        "aggregator_kwargs": kwargs,
        "seconds": seconds,
        "peak_reset": reset,
        "rss_before_kb": before["rss_kb"],
        "hwm_kb": after["hwm_kb"],
        "peak_above_kb": after["hwm_kb"] - base,
        "model_in": rnd.model_in,
        "model_out": rnd.model_out,
        "opt_state": rnd.opt_state,
        "updates": rnd.update_count,
        "rejected": json.loads(rnd.rejected or "{}"),
    }


def fedopt_step(mean: np.ndarray, seed: np.ndarray, kwargs: dict) -> np.ndarray:
    """One first-round server-optimizer step (m0 = 0, v0 = tau^2), in float64."""
    from workers.aggregators import check_config

    s = check_config("fedopt", kwargs)
    d = mean.astype(np.float64) - seed
    m = (1.0 - s["beta1"]) * d
    v0, d2 = s["tau"] ** 2, d * d
    if s["serveropt"] == "adam":
        v = s["beta2"] * v0 + (1.0 - s["beta2"]) * d2
    elif s["serveropt"] == "yogi":
        v = v0 - (1.0 - s["beta2"]) * np.sign(v0 - d2) * d2
    else:  # adagrad
        v = v0 + d2
    return seed + s["learning_rate"] * m / (np.sqrt(v) + s["tau"])


def differences(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - want)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / (np.abs(want) + 1e-3)).max()),
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
    compare = dict(item.split("=", 1) for item in args.compare)
    kwargs = json.loads(args.kwargs)
    if compare:  # after the measured part: these checks' memory is not in the figure
        from broker import connect
        from broker.context import Settings
        from workers.fedavg import load_npz

        broker = await connect(args.redis_url, settings=Settings(prefix=args.prefix))

        async def model(model_id: str) -> np.ndarray:
            return np.concatenate(load_npz(await broker.models.get(model_id)))

        try:
            checks = {}
            if "fedavg" in compare:
                checks["fedavg"] = differences(await model(compare["fedavg"]), mean)
            if "fedopt" in compare:
                want = fedopt_step(mean, await model(args.seed_model), kwargs.get("fedopt", {}))
                checks["fedopt"] = differences(await model(compare["fedopt"]), want)
                del want
            if "fedmedian" in compare:
                t = time.perf_counter()
                median = np.median(stack, axis=0, overwrite_input=True)  # partitions in place
                checks["fedmedian"] = differences(await model(compare["fedmedian"]), median)
                checks["fedmedian"]["numpy_seconds"] = time.perf_counter() - t
                del median
            if "fedtrimmedavg" in compare:
                beta = float(kwargs.get("fedtrimmedavg", {}).get("beta", 0.1))
                cut = int(beta * k)
                t = time.perf_counter()
                stack.sort(axis=0)  # in place (the median's partition does not matter)
                trimmed = stack[cut : k - cut].mean(axis=0)
                got = await model(compare["fedtrimmedavg"])
                checks["fedtrimmedavg"] = differences(got, trimmed)
                checks["fedtrimmedavg"]["numpy_seconds"] = time.perf_counter() - t
                del trimmed, got
        finally:
            await broker.close()
        out["checks"] = checks
        if "fedavg" in checks:  # where the suite and tests/test_bench.py read it
            out.update(checks["fedavg"])
    del stack
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("coordinator", "numpy"))
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--session", default="")
    parser.add_argument("--round", default="1")
    parser.add_argument(
        "--aggregator", default="fedavg", help="coordinator: session_config.aggregator"
    )
    parser.add_argument(
        "--kwargs",
        default="{}",
        help="coordinator: aggregator_kwargs (JSON object); numpy: JSON object of "
        "aggregator name -> its aggregator_kwargs, for the checks",
    )
    parser.add_argument("--clients", type=int, default=0)
    parser.add_argument("--model-bytes", type=int, default=0)
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=MODEL_ID",
        help="numpy: check this aggregator's result (fedavg, fedopt, fedmedian, fedtrimmedavg)",
    )
    parser.add_argument("--seed-model", default="", help="numpy: fedopt's input model id")
    args = parser.parse_args()
    run = coordinator if args.mode == "coordinator" else baseline
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
