"""poll: PollAndReport at saturation on 1 and 2 replicas against a bare grpc.aio server.

Closed loop: ``clients`` coroutines (one client id each) on ``channels`` channels poll with
an idle report as fast as they can. Then the same with tasks: enough are queued
beforehand (broker.tasks.push) to last the run, and a client handed one reports it
RUNNING for 1/task_fraction - 1 polls, then COMPLETED (whose reply hands out the next),
so about ``task_fraction`` of the polls hand out a task and most others are progress
reports on a task, as with clients that are training.
"""

from __future__ import annotations

import asyncio
import math

from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, cost_rows, row


async def push_tasks(bench: Bench, prefix: str, clients: str, per_client: list[int]) -> int:
    broker = await bench.broker(prefix)
    jobs = [
        broker.tasks.push(f"{clients}{i}", "Custom_bench", data="{}")
        for i, k in enumerate(per_client)
        for _ in range(k)
    ]
    for start in range(0, len(jobs), 2000):
        await asyncio.gather(*jobs[start : start + 2000])
    return len(jobs)


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    bare, r1, r2 = await bench.deploy(("bare", 0), ("r1", 1), ("r2", 2))
    runs: dict[str, list[dict]] = {"bare": [], "R=1": [], "R=2": []}
    for _ in range(cfg.reps):  # interleaved, so slow phases of a noisy machine hit all
        for dep in (bare, r1, r2):
            result = await bench.unary(dep, "PollAndReport", client_prefix="poll-")
            runs[dep.label()].append(summary(result))
    # With tasks: queue enough to last the run (1.5x what the idle rate would use).
    cycle = max(1, round(1 / cfg.task_fraction))  # polls per task
    for dep in (r1, r2):
        idle = pick_median(runs[dep.label()])
        polls = idle["rps"] * (cfg.warmup + cfg.duration + 1) / cfg.clients
        per = [math.ceil(1.5 * polls / cycle) + 1] * cfg.clients
        pushed = await push_tasks(bench, dep.prefix, f"task{dep.name}-", per)
        result = await bench.unary(
            dep, "PollAndReport", client_prefix=f"task{dep.name}-", busy_polls=cycle - 1
        )
        s = summary(result)
        s["pushed"] = pushed
        runs[f"{dep.label()} tasks"] = [s]
    rows = []
    base = pick_median(runs["bare"])
    for case in ("R=1", "R=2", "R=1 tasks", "R=2 tasks"):
        s = pick_median(runs[case])
        label = f"{case} idle"
        if "tasks" in case:
            label = f"{case.split()[0]}, {s['task_share']:.0%} get a task"
        rows += [
            row(label, "RPS", "1/s", s["rps"], "bare grpc.aio", base["rps"], key=f"{case}/rps"),
            row(label, "p50", "ms", s["p50_ms"], "bare grpc.aio", base["p50_ms"], "lower"),
            row(label, "p99", "ms", s["p99_ms"], "bare grpc.aio", base["p99_ms"], "lower"),
            *cost_rows(label, s, base, key=case),
        ]
    r1s, r2s = pick_median(runs["R=1"]), pick_median(runs["R=2"])
    rows.append(
        row(
            "R=2 vs R=1 idle",
            "RPS",
            "1/s",
            r2s["rps"],
            "R=1 (same run)",
            r1s["rps"],
            key="scaling",
        )
    )
    for prefix in (r1.prefix, r2.prefix):
        await bench.clear(prefix)
    return {
        "rows": rows,
        "details": {
            "clients": cfg.clients,
            "channels": cfg.channels,
            "runs": runs,
            "round_trip_formula": (
                "round trips/RPC = (Δ cmdstat_exec.calls + Δ direct commands) / RPCs, where "
                "direct commands = Δ total_reads_processed - Δ exec - 2 (each pipeline is "
                "one read and one EXEC; any other read is a command sent on its own; 2 = "
                "the suite's own INFO calls); measured over the window on the private Redis"
            ),
        },
    }
