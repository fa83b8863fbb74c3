"""transfer: Upload and Download of a model through one replica, Redis and disk stores.

Uploads are sent in 1 MiB chunks (what the 1.0.0 client sends, protocol.md §1) and in
32 KiB chunks (the unused constant in the client's grpc_handler: a client that did use
it). Downloads are served in 1 MiB chunks. Baseline: the bare grpc.aio server streaming
the same number of bytes from memory (and discarding uploads). The figure is the median
of ``transfer_reps`` transfers, in MiB/s.
"""

from __future__ import annotations

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
    bare, r1, disk = await bench.deploy(
        ("bare", 0), ("r1", 1), ("disk", 1, "--model-store", "disk", "--model-dir", str(models))
    )
    runs: dict[str, dict] = {}
    rows = []
    for size in cfg.transfer_sizes:
        label = f"{size // MiB} MiB"
        base = {}
        for chunk_name, chunk in CHUNKS.items():
            spec = {"op": "upload", "size": size, "chunk": chunk, "model_prefix": "bare"}
            base[f"upload {chunk_name}"] = await transfer(bench, bare, spec)
        spec = {"op": "download", "size": size, "model_id": f"bare-{size}"}
        await transfer(bench, bare, {**spec, "reps": 1})  # the bare server makes the bytes
        base["download"] = await transfer(bench, bare, spec)
        runs[f"{label} bare"] = base
        for store, dep in (("redis", r1), ("disk", disk)):
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
            spec = {"op": "download", "size": size, "model_id": model_id}
            mine["download"] = await transfer(bench, dep, spec)
            runs[f"{label} {store}"] = mine
            for op in ("upload 1MiB", "upload 32KiB", "download"):
                case = f"{label} {store} store"
                what = "Download 1MiB" if op == "download" else f"Upload {op.split()[1]}"
                rows.append(
                    row(
                        case,
                        what,
                        "MiB/s",
                        mib_s(mine[op]),
                        "bare from memory",
                        mib_s(base[op]),
                        key=f"{label}/{store}/{op}",
                    )
                )
            rows.append(
                row(
                    f"{label} {store} store",
                    "Download server CPU",
                    "s/GiB",
                    mine["download"]["server_cpu_s_per_gib"],
                    "bare from memory",
                    base["download"]["server_cpu_s_per_gib"],
                    "lower",
                    redis_cpu_s_per_gib=mine["download"]["redis_cpu_s_per_gib"],
                )
            )
            await bench.clear(dep.prefix)
    for f in models.glob("*"):
        f.unlink(missing_ok=True)
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
