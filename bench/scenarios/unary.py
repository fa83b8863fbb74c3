"""Shared by poll and ingest: summarise a closed-loop run, and Redis round trips."""

from __future__ import annotations

import numpy as np


def summary(result: dict) -> dict:
    lat = np.array(result["latencies_us"], dtype=np.float64) / 1000.0
    out = {
        "rpcs": result["rpcs"],
        "seconds": result["seconds"],
        "rps": result["rpcs"] / result["seconds"] if result["seconds"] else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "errors": result["errors"],
        "error_codes": result["error_codes"],
    }
    if result.get("cpu"):
        n = max(result["rpcs"], 1)
        for k, v in result["cpu"].items():
            out[f"cpu_us_per_rpc_{k.removesuffix('_s')}"] = v / n * 1e6
    if result.get("redis"):
        out["redis"] = round_trips(result["redis"], result["rpcs"])
    if "tasks" in result:
        out["tasks"] = result["tasks"]
        out["task_share"] = result["tasks"] / result["rpcs"] if result["rpcs"] else 0.0
    return out


def round_trips(snaps: dict, rpcs: int) -> dict:
    """Redis round trips per RPC over the measured window.

    Every request a client sends is one read event on the Redis side
    (INFO stats ``total_reads_processed``); a MULTI/EXEC pipeline arrives as one write and
    shows up as one EXEC call (``cmdstat_exec``). So

        round trips = EXEC calls (one per batched pipeline)
                    + direct commands (read events that were not a pipeline)
                    = Δexec + max(0, Δreads - Δexec - 2)

    (the 2: the suite's own INFO requests inside the window). A pipeline too large for one
    read counts more than once, so this is an upper bound; Δexec alone is the lower one.
    """
    before, after = snaps["before"], snaps["after"]
    cmds = {
        k: after["commandstats"].get(k, 0) - before["commandstats"].get(k, 0)
        for k in after["commandstats"]
    }
    execs = cmds.get("exec", 0)
    reads = after["total_reads_processed"] - before["total_reads_processed"]
    direct = max(0, reads - execs - 2)
    commands = after["total_commands_processed"] - before["total_commands_processed"]
    commands -= cmds.get("info", 0) + cmds.get("multi", 0) + execs
    n = max(rpcs, 1)
    return {
        "exec": execs,
        "reads": reads,
        "direct": direct,
        "round_trips": execs + direct,
        "round_trips_per_rpc": (execs + direct) / n,
        "pipelines_per_rpc": execs / n,
        "rpcs_per_pipeline": rpcs / execs if execs else None,
        "redis_commands_per_rpc": commands / n,  # including those run inside Lua scripts
        "commands": {k: v for k, v in sorted(cmds.items()) if v},
    }


def pick_median(runs: list[dict], key: str = "rps") -> dict:
    """The run with the median figure (so its latencies and round trips go with it)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]
