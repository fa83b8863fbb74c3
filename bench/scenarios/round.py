"""round: one aggregation of K clients' float32 models through the coordinator's code path,
for each aggregator of workers/aggregators.py (fedavg, fedopt, fedmedian, fedtrimmedavg).

The suite stores K model updates (npz, as the client writes them) in Redis and makes a
round whose K training tasks each carry a kept result (broker.tasks.push, a poll that
hands the task out, the upload, then broker.inbound.add_result, as a replica does for
SendModelUpdate), and whose model_in is a stored seed model (the previous global model,
which fedopt's pseudo-gradient starts from). A child process per aggregator then runs
workers.coordinator.Coordinator._aggregate on it: fetch each update, decode it, fold it
in (streamed weighted mean; plus the server optimizer's step for fedopt; spooled to a temp
folder and reduced array by array for fedmedian / fedtrimmedavg), store the new global
model. Its peak memory is its own (VmHWM). Between children the round is put back as it
was before any aggregation (model_out, fedopt's opt_state and its stored state, the
progress fields). Baseline: a child computing numpy's weighted mean of the same K models
held in memory at once, which also checks every aggregator's result against numpy.
"""

from __future__ import annotations

import asyncio
import json

from bench import fedmodels
from bench.suite import Bench, row, run_child

SESSION = "bench-session"
SEED = "bench-seed"  # the round's model_in
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
ROUND = "1"
# aggregator -> aggregator_kwargs ({} = the defaults: fedopt's server optimizer is adam)
OTHERS = {"fedopt": {}, "fedmedian": {}, "fedtrimmedavg": {"beta": 0.1}}
# what an aggregation writes on the round record (the tasks' records it only reads)
WRITTEN = (
    "model_out", "opt_state", "updates", "rejected", "aggregated", "aggregated_at",
    "status", "reason", "finished_at",
)  # fmt: skip


async def prepare(bench: Bench, prefix: str, k: int, size: int) -> None:
    broker = await bench.broker(prefix)
    seed = await asyncio.to_thread(lambda: fedmodels.npz(fedmodels.arrays(999, size)))
    await broker.models.put(seed, model_id=SEED)
    del seed
    await broker.sessions.update_round(SESSION, ROUND, model_in=SEED)
    tasks = {f"bench-train-{i}": f"bench-client-{i}" for i in range(k)}
    await broker.sessions.add_round_tasks(SESSION, ROUND, "tasks", tasks)
    for i, (corr, client) in enumerate(tasks.items()):
        await broker.tasks.push(
            client,
            "Fedn_ModelUpdate",
            model_id=SEED,
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


async def reset_round(bench: Bench, prefix: str) -> None:
    """Undo what an aggregation wrote, so the next one starts from the same round: without
    it set_round_once keeps the first model_out (the next result would be deleted) and the
    first opt_state. The models an aggregation stored stay (the baseline checks them)."""
    broker = await bench.broker(prefix)
    rnd = await broker.sessions.round(SESSION, ROUND)
    if rnd is not None and rnd.opt_state:
        await broker.models.delete(rnd.opt_state)
    await broker._redis.hdel(broker._keys.round(SESSION, ROUND), *WRITTEN)


async def aggregate(bench: Bench, prefix: str, k: int, name: str, kwargs: dict, label: str,
                    env: dict | None = None) -> dict:  # fmt: skip
    """One coordinator child with this aggregator; the round is reset afterwards."""
    args = [
        "-m", "bench.aggregate", "coordinator", "--redis-url", bench.redis.url,
        "--prefix", prefix, "--session", SESSION,
        "--round", ROUND, "--aggregator", name, "--kwargs", json.dumps(kwargs),
    ]  # fmt: skip
    out = await run_child(bench, args, f"aggregate-{label}", within=1800, env=env)
    if out["updates"] != k:
        raise RuntimeError(f"{name} used {out['updates']} of {k} updates: {out['rejected']}")
    if not out["model_out"]:
        raise RuntimeError(f"{name} stored no model_out")
    if name == "fedopt" and not out["opt_state"]:
        raise RuntimeError("fedopt kept no optimizer state")
    await reset_round(bench, prefix)
    return out


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    k, size = cfg.round_clients, cfg.round_model_bytes
    prefix = "bench-round"
    await bench.clear(prefix)
    await prepare(bench, prefix, k, size)
    agg = await aggregate(bench, prefix, k, "fedavg", {}, "fedavg")
    # The same with glibc's mmap threshold pinned (no dynamic raise): freed model-sized
    # buffers go back to the OS instead of staying in the heap. See bench/README.md.
    pinned = await aggregate(
        bench, prefix, k, "fedavg", {}, "fedavg-mmap", env={MMAP_ENV: "131072"}
    )
    others = {}
    for name, kwargs in OTHERS.items():
        others[name] = await aggregate(bench, prefix, k, name, kwargs, name)
    compare = [f"fedavg={agg['model_out']}"]
    compare += [f"{name}={res['model_out']}" for name, res in others.items()]
    base = await run_child(
        bench,
        [
            "-m", "bench.aggregate", "numpy", "--redis-url", bench.redis.url, "--prefix", prefix,
            "--clients", str(k),
            "--model-bytes", str(size), "--seed-model", SEED, "--kwargs", json.dumps(OTHERS),
            *[arg for c in compare for arg in ("--compare", c)],
        ],
        "aggregate-numpy",
        within=1800,
    )  # fmt: skip
    await bench.clear(prefix)
    mb = size / (1024 * 1024)
    largest = max(fedmodels.layer_sizes(size)) * 4
    case = f"{k} x {mb:g} MiB float32"
    models = lambda r: r["peak_above_kb"] * 1024 / size  # noqa: E731
    pinned_case = f"{case}, {MMAP_ENV}=131072"
    base_name = "numpy mean in memory"
    rows = [
        row(case, "time", "s", agg["seconds"], base_name, base["seconds"], "lower"),
        row(case, "peak memory", "models", models(agg), base_name, models(base),
            "lower", key="peak_models"),
        row(pinned_case, "time", "s", pinned["seconds"], base_name, base["seconds"], "lower"),
        row(pinned_case, "peak memory", "models", models(pinned), base_name,
            models(base), "lower", key="peak_models_mmap"),
    ]  # fmt: skip
    for name, res in others.items():
        kw = ", ".join(f"{a}={b}" for a, b in OTHERS[name].items())
        label = f"{case}, {name}" + (f" ({kw})" if kw else "")
        if name != "fedopt":  # memory is K x the largest array: name it next to the figure
            label += f", largest array {largest / (1024 * 1024):g} MiB"
        rows += [
            row(label, "time", "s", res["seconds"], base_name, base["seconds"], "lower",
                key=f"time_{name}"),
            row(label, "peak memory", "models", models(res), base_name, models(base),
                "lower", key=f"peak_models_{name}"),
        ]  # fmt: skip
    return {
        "rows": rows,
        "details": {
            "clients": k,
            "model_bytes": size,
            "layer_bytes": [n * 4 for n in fedmodels.layer_sizes(size)],
            "largest_array_bytes": largest,
            # fedmedian / fedtrimmedavg hold about K x the largest array: their peak in those
            "peak_in_k_largest_arrays": {
                name: others[name]["peak_above_kb"] * 1024 / (k * largest)
                for name in ("fedmedian", "fedtrimmedavg")
            },
            "aggregator_kwargs": OTHERS,
            "fedavg": agg,
            "fedavg_mmap_threshold": pinned,
            **others,
            "numpy": base,
            "checks": base.get("checks", {}),
            "max_abs_diff": base.get("max_abs_diff"),
            "max_rel_diff": base.get("max_rel_diff"),
        },
    }
