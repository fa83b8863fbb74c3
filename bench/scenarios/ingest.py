"""ingest: SendModelMetric / SendTelemetryMessage / SendStatus at saturation.

Baselines in the same run: the bare grpc.aio server (empty handlers, same load generator),
and raw pipelined XADD from redis.asyncio (``xadd_batch`` entries per pipeline, 4
pipelines in flight) of a metric-sized entry against the same Redis: the most a Redis
stream takes from one Python process.
"""

from __future__ import annotations

from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, cost_rows, row

METHODS = ("SendModelMetric", "SendTelemetryMessage", "SendStatus")

# An inbound metrics entry as the replica writes it (broker.inbound.add).
ENTRY = {
    "client_id": "ingest-17",
    "received_at": "1764300000.123456",
    "metrics": "\x82\xadtraining_loss\xcb?\xda\xf7\xbb\xdd\x00\x00\x00",
    "step": "17",
    "model_id": "m-bench",
    "round_id": "1",
    "session_id": "s-bench",
    "timestamp": "2025-11-28T02:00:00.123456Z",
}


async def raw_xadd(bench: Bench) -> dict:
    cfg = bench.cfg
    spec = {
        "kind": "xadd",
        "redis_url": bench.redis.url,
        "stream": "bench-raw:in:metrics",
        "batch": cfg.xadd_batch,
        "concurrency": 4,
        "fields": ENTRY,
        "warmup": cfg.warmup,
        "duration": cfg.duration,
    }
    result = await bench.timed(spec)
    return {"msgs_per_s": result["messages"] / result["seconds"], **result}


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    specs = [("bare", 0)] + [(f"r{r}", r) for r in cfg.ingest_replicas]
    deps = await bench.deploy(*specs)
    runs: dict[str, list[dict]] = {}
    raw: list[dict] = []
    for _ in range(cfg.reps):
        raw.append(await raw_xadd(bench))
        for method in METHODS:
            for dep in deps:
                result = await bench.unary(dep, method, client_prefix="ingest-")
                runs.setdefault(f"{method} {dep.label()}", []).append(summary(result))
    xadd = pick_median(raw, "msgs_per_s")["msgs_per_s"]
    rows = []
    for method in METHODS:
        base = pick_median(runs[f"{method} bare"])
        for dep in deps[1:]:
            s = pick_median(runs[f"{method} {dep.label()}"])
            case = f"{method} {dep.label()}"
            rows += [
                row(case, "msgs/s", "1/s", s["rps"], "bare grpc.aio", base["rps"], key=case),
                row(case, "msgs/s", "1/s", s["rps"], f"raw XADD x{cfg.xadd_batch}", xadd),
                row(case, "p99", "ms", s["p99_ms"], "bare grpc.aio", base["p99_ms"], "lower"),
                *cost_rows(case, s, base, key=case),
            ]
    for dep in deps[1:]:
        await bench.clear(dep.prefix)
    await bench.clear("bench-raw")
    return {"rows": rows, "details": {"runs": runs, "raw_xadd": raw}}
