"""round: one FedAvg of K clients' float32 models through the coordinator's code path.

The suite stores K model updates (npz, as the client writes them) in Redis and makes a
round whose K training tasks each carry a kept result (broker.tasks.push, a poll that
hands the task out, the upload, then broker.inbound.add_result, as a replica does for
SendModelUpdate). A child process then
runs workers.coordinator.Coordinator._aggregate on it: fetch each update, decode it,
fold it into the streamed weighted mean, store the new global model. Its peak memory is
its own (VmHWM). Baseline: a child computing numpy's weighted mean of the same K models
held in memory at once, which also checks the FedAvg result against it.
"""

from __future__ import annotations

import asyncio
import json

from bench import fedmodels
from bench.suite import Bench, row, run_child

SESSION = "bench-session"
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
ROUND = "1"


async def prepare(bench: Bench, prefix: str, k: int, size: int) -> None:
    broker = await bench.broker(prefix)
    tasks = {f"bench-train-{i}": f"bench-client-{i}" for i in range(k)}
    await broker.sessions.add_round_tasks(SESSION, ROUND, "tasks", tasks)
    for i, (corr, client) in enumerate(tasks.items()):
        await broker.tasks.push(
            client,
            "Fedn_ModelUpdate",
            model_id="bench-seed",
            session_id=SESSION,
            round_id=ROUND,
            correlation_id=corr,
        )
        await broker.tasks.poll(client)  # handed out before the update is uploaded
        blob = await asyncio.to_thread(lambda i=i: fedmodels.npz(fedmodels.arrays(i, size)))
        update_id = f"bench-update-{i}"
        await broker.models.put(blob, model_id=update_id)
        del blob
        meta = json.dumps({"training_metadata": {"num_examples": fedmodels.weight(i)}})
        kept = await broker.inbound.add_result(
            "updates",
            client,
            corr,
            {"model_update_id": update_id, "result_meta": meta},
            {"correlation_id": corr, "model_update_id": update_id, "meta": meta},
            require_model=update_id,
        )
        if not kept:
            raise RuntimeError(f"update {update_id} was not kept on its task")


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    k, size = cfg.round_clients, cfg.round_model_bytes
    prefix = "bench-round"
    await bench.clear(prefix)
    await prepare(bench, prefix, k, size)
    common = ["--redis-url", bench.redis.url, "--prefix", prefix]
    fedavg = ["-m", "bench.aggregate", "fedavg", *common, "--session", SESSION, "--round", ROUND]
    agg = await run_child(bench, fedavg, "aggregate-fedavg", within=1800)
    if agg["updates"] != k:
        raise RuntimeError(f"FedAvg used {agg['updates']} of {k} updates: {agg['rejected']}")
    # The same with glibc's mmap threshold pinned (no dynamic raise): freed model-sized
    # buffers go back to the OS instead of staying in the heap. See bench/README.md.
    broker = await bench.broker(prefix)
    await broker._redis.hdel(broker._keys.round(SESSION, ROUND), "model_out")
    pinned = await run_child(
        bench, fedavg, "aggregate-fedavg-mmap", within=1800, env={MMAP_ENV: "131072"}
    )
    base = await run_child(
        bench,
        [
            "-m", "bench.aggregate", "numpy", *common, "--clients", str(k),
            "--model-bytes", str(size), "--compare", agg["model_out"],
        ],
        "aggregate-numpy",
        within=1800,
    )  # fmt: skip
    await bench.clear(prefix)
    mb = size / (1024 * 1024)
    case = f"{k} x {mb:g} MiB float32"
    models = lambda r: r["peak_above_kb"] * 1024 / size  # noqa: E731
    pinned_case = f"{case}, {MMAP_ENV}=131072"
    rows = [
        row(case, "time", "s", agg["seconds"], "numpy mean in memory", base["seconds"], "lower"),
        row(case, "peak memory", "models", models(agg), "numpy mean in memory", models(base),
            "lower", key="peak_models"),
        row(pinned_case, "time", "s", pinned["seconds"], "numpy mean in memory",
            base["seconds"], "lower"),
        row(pinned_case, "peak memory", "models", models(pinned), "numpy mean in memory",
            models(base), "lower", key="peak_models_mmap"),
    ]  # fmt: skip
    return {
        "rows": rows,
        "details": {
            "clients": k,
            "model_bytes": size,
            "fedavg": agg,
            "fedavg_mmap_threshold": pinned,
            "numpy": base,
            "max_abs_diff": base.get("max_abs_diff"),
            "max_rel_diff": base.get("max_rel_diff"),
        },
    }
