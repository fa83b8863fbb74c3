"""transfer: Upload and Download of a model through one replica, Redis and disk stores.

Uploads are sent in 1 MiB chunks (what the 1.0.0 client sends, docs/protocol.md §1) and in
32 KiB chunks (the unused constant in the client's grpc_handler: a client that did use
it). Downloads are served in 1 MiB chunks. Baseline: the bare grpc.aio server streaming
the same number of bytes from memory (and discarding uploads). The figure is the median
of ``transfer_reps`` transfers, in MiB/s.
"""

from __future__ import annotations

import shutil

from bench.config import MiB
from bench.procs import cpu_seconds
from bench.suite import Bench, Deployment, median, row

CHUNKS = {"1MiB": MiB, "32KiB": 32 * 1024}


async def transfer(bench: Bench, dep: Deployment, spec: dict) -> dict:
    """Run the transfers; also the CPU time the server (and Redis) spent meanwhile."""
    full = {"kind": "transfer", "target": dep.target, "reps": bench.cfg.transfer_reps}
    full.update(spec)
    pids = {"server": dep.servers[0].pid, "redis": bench.redis.process.pid}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    proc = await bench.client(full)
    try:
        result = await proc.result(within=600)
    finally:
        await proc.stop()
    moved = result["size"] * len(result["times"]) / 2**30
    for k, p in pids.items():
        result[f"{k}_cpu_s_per_gib"] = (cpu_seconds(p) - before[k]) / moved
    return result


def mib_s(result: dict) -> float:
    return result["size"] / MiB / median(result["times"])


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    models = bench.workdir / "models"
    disk = ("--model-store", "disk", "--model-dir", str(models))
    no_cache = ("--model-cache-mb", "0")
    bare, r1, r1_cold, d1, d1_cold = await bench.deploy(
        ("bare", 0),
        ("r1", 1),
        ("r1-nocache", 1, *no_cache),
        ("disk", 1, *disk),
        ("disk-nocache", 1, *disk, *no_cache),
    )
    runs: dict[str, dict] = {}
    rows = []
    for size in cfg.transfer_sizes:
        label = f"{size // MiB} MiB"
        # Downloads are quick and noisy: 20 x 10 MiB or 5 x 100 MiB per measurement, and
        # the median counts.
        downloads = max(5, cfg.transfer_reps, min(20, 200 * MiB // size))
        base = {}
        for chunk_name, chunk in CHUNKS.items():
            spec = {"op": "upload", "size": size, "chunk": chunk, "model_prefix": "bare"}
            base[f"upload {chunk_name}"] = await transfer(bench, bare, spec)
        spec = {"op": "download", "size": size, "model_id": f"bare-{size}", "reps": downloads}
        base["download"] = await transfer(bench, bare, spec)
        runs[f"{label} bare"] = base
        for store, dep, cold in (("redis", r1, r1_cold), ("disk", d1, d1_cold)):
            mine = {}
            for chunk_name, chunk in CHUNKS.items():
                spec = {
                    "op": "upload",
                    "size": size,
                    "chunk": chunk,
                    "model_prefix": f"xfer-{size}-{chunk_name}",
                }
                mine[f"upload {chunk_name}"] = await transfer(bench, dep, spec)
            model_id = mine["upload 1MiB"]["ids"][0]
            # With the model cache (the default) the untimed first Download reads the store
            # and the timed ones stream from memory. The cold path (every Download reads the
            # store) is measured on a replica of its own with the cache off.
            spec = {"op": "download", "size": size, "model_id": model_id, "reps": downloads}
            mine["download"] = await transfer(bench, dep, spec)
            up = {"op": "upload", "size": size, "reps": 1, "model_prefix": f"cold-{size}"}
            cold_id = (await transfer(bench, cold, up))["ids"][0]
            spec = {"op": "download", "size": size, "model_id": cold_id, "reps": downloads}
            mine["download uncached"] = await transfer(bench, cold, spec)
            runs[f"{label} {store}"] = mine
            case = f"{label} {store} store"
            for op, what in (
                ("upload 1MiB", "Upload 1MiB"),
                ("upload 32KiB", "Upload 32KiB"),
                ("download", "Download 1MiB"),
                ("download uncached", "Download 1MiB, cache off"),
            ):
                base_op = op.split()[0] if op.startswith("download") else op
                cpu = mine[op]["server_cpu_s_per_gib"], base[base_op]["server_cpu_s_per_gib"]
                rows.append(
                    row(
                        case,
                        what,
                        "MiB/s",
                        mib_s(mine[op]),
                        "bare from memory",
                        mib_s(base[base_op]),
                        key=f"{label}/{store}/{op}",
                        bound=f"replica CPU {cpu[0]:.2f} s/GiB vs bare {cpu[1]:.2f} (one core "
                        "reads the store and sends)",
                    )
                )
            for op, what in (("download", ""), ("download uncached", ", cache off")):
                rows.append(
                    row(
                        case,
                        f"Download server CPU{what}",
                        "s/GiB",
                        mine[op]["server_cpu_s_per_gib"],
                        "bare from memory",
                        base["download"]["server_cpu_s_per_gib"],
                        "lower",
                        redis_cpu_s_per_gib=mine[op]["redis_cpu_s_per_gib"],
                    )
                )
            for d in (dep, cold):
                await bench.clear(d.prefix)
    shutil.rmtree(models, ignore_errors=True)  # files, and a folder per model id
    return {
        "rows": rows,
        "details": {
            "runs": {
                k: {
                    op: {
                        "times": r["times"],
                        "server_cpu_s_per_gib": r["server_cpu_s_per_gib"],
                        "redis_cpu_s_per_gib": r["redis_cpu_s_per_gib"],
                    }
                    for op, r in v.items()
                }
                for k, v in runs.items()
            }
        },
    }
