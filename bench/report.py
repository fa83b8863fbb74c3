"""Targets, the printed tables (rich) and the machine description for the JSON."""

from __future__ import annotations

import fnmatch
import os
import platform
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from bench.config import (
    TARGET_FANOUT,
    TARGET_POLL_INTERVAL,
    TARGET_POLLERS,
    TARGET_STREAMS,
    Config,
)
from bench.procs import ROOT

# (name, scenario, row key pattern, field of the row, comparison, limit)
TARGETS = [
    ("poll ≥ 0.6x bare RPS", "poll", "R=?/rps", "ratio", ">=", 0.6),
    ("poll ≤ 0.2 Redis round trips/RPC", "poll", "R=?/round_trips", "value", "<=", 0.2),
    ("poll with tokens ≥ 0.9x --insecure RPS", "auth", "auth/rps", "ratio", ">=", 0.9),
    ("calls/core: RPS ≥ 0.7x fastest bare", "percore", "*/rps", "ratio", ">=", 0.7),
    ("calls/core: CPU/RPC (+Redis) ≤ 1.5x bare", "percore", "*/cpu", "ratio", "<=", 1.5),
    ("calls/core: tokens ≥ 0.9x tokens off", "percore", "*/tokens", "ratio", ">=", 0.9),
    ("calls/core: ≤ 0.2 Redis round trips/RPC", "percore", "*/round_trips", "value", "<=", 0.2),
    ("ingest ≥ 0.6x bare RPS", "ingest", "Send* R=?", "ratio", ">=", 0.6),
    ("ingest ≤ 0.2 Redis round trips/RPC", "ingest", "Send* R=?/round_trips", "value", "<=", 0.2),
    ("Download ≥ 0.8x bare at 1 MiB", "transfer", "*/download", "ratio", ">=", 0.8),
    ("… with the model cache off", "transfer", "*/download uncached", "ratio", ">=", 0.8),
    ("FedAvg peak ≤ 3 models' worth", "round", "peak_models", "value", "<=", 3.0),
    ("≥ 5000 TaskStreams/replica at ≤ 50 KB each", "memory", "streams", "value", "<=", 50.0),
    ("fanout 5000 over 2 replicas: p99 ≤ 1 s", "fanout", "R=2/p99", "value", "<=", 1.0),
    (
        "10000 pollers every 5 s over 2 replicas: p99 ≤ 250 ms",
        "pollers",
        "R=2/p99",
        "value",
        "<=",
        250.0,
    ),
]


def evaluate(results: dict, cfg: Config) -> list[dict]:
    out = []
    for name, scenario, pattern, field, op, limit in TARGETS:
        found = results.get(scenario, {})
        if "rows" not in found:
            if scenario in results:
                out.append({"target": name, "case": "", "status": "error", "met": False})
            continue
        for r in found["rows"]:
            if not fnmatch.fnmatchcase(r.get("key", ""), pattern):
                continue
            value = r.get(field)
            if value is None:
                out.append({"target": name, "case": r["case"], "status": "no data", "met": False})
                continue
            met = value >= limit if op == ">=" else value <= limit
            gap = abs(value / limit - 1) * 100
            pct = f"{gap:.1f}%" if gap < 10 else f"{gap:.0f}%"
            if met:
                by = f"{pct} to spare"
            else:
                by = f"{pct} short" if op == ">=" else f"{pct} over"
            note = ""
            if scenario == "memory" and cfg.memory_streams < TARGET_STREAMS:
                note = f"at {cfg.memory_streams} streams; the target is for {TARGET_STREAMS}"
            if scenario == "fanout" and cfg.fanout_clients < TARGET_FANOUT:
                note = f"at {cfg.fanout_clients} clients; the target is for {TARGET_FANOUT}"
            if scenario == "pollers" and (
                cfg.pollers_clients < TARGET_POLLERS or cfg.pollers_interval != TARGET_POLL_INTERVAL
            ):
                note = (
                    f"at {cfg.pollers_clients} clients every {cfg.pollers_interval:g} s; the "
                    f"target is for {TARGET_POLLERS} every {TARGET_POLL_INTERVAL:g} s"
                )
            if not met and r.get("bound"):  # what the scenario measured that bounds it
                note = "; ".join(filter(None, (note, r["bound"])))
            out.append(
                {
                    "target": name,
                    "case": r["case"],
                    "field": field,
                    "value": value,
                    "op": op,
                    "limit": limit,
                    "met": met,
                    "status": "met" if met else "missed",
                    "by": by,
                    "note": note,
                }
            )
    return out


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value != value:
        return "nan"
    a = abs(value)
    if a >= 1000:
        text = f"{value:,.0f}"
    elif a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    elif a >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def results_table(results: dict) -> Table:
    table = Table(title="Benchmarks (ratio = value / same-run baseline)", show_lines=False)
    for col in ("scenario", "case", "metric", "value", "baseline", "baseline value", "ratio"):
        table.add_column(col, justify="right" if "value" in col or col == "ratio" else "left")
    for scenario, res in results.items():
        if "rows" not in res:
            table.add_row(scenario, "[red]error[/red]", res.get("error", "")[:60], "", "", "", "")
            continue
        for i, r in enumerate(res["rows"]):
            ratio = r["ratio"]
            text = "—" if ratio is None else f"{ratio:.2f}x"
            table.add_row(
                scenario if i == 0 else "",
                r["case"],
                r["metric"],
                fmt(r["value"], r["unit"]),
                r["baseline"],
                fmt(r["baseline_value"], r["unit"]),
                text,
            )
        table.add_section()
    return table


def targets_table(targets: list[dict]) -> Table:
    table = Table(title="Targets")
    for col in ("target", "case", "measured", "limit", "status", "by", "note"):
        table.add_column(col)
    for t in targets:
        if "value" not in t:
            table.add_row(t["target"], t["case"], "—", "—", f"[red]{t['status']}[/red]", "", "")
            continue
        shown = f"{t['value']:.2f}x" if t["field"] == "ratio" else fmt(t["value"])
        limit = f"{t['limit']:g}x" if t["field"] == "ratio" else f"{t['limit']:g}"
        colour = "green" if t["met"] else "red"
        table.add_row(
            t["target"],
            t["case"],
            shown,
            f"{t['op']} {limit}",
            f"[{colour}]{t['status']}[/{colour}]",
            t["by"],
            t["note"],
        )
    return table


def print_report(results: dict, targets: list[dict], machine: dict, console: Console) -> None:
    console.print(
        f"[bold]{machine['cpu']}[/bold], {machine['cpus']} CPUs, "
        f"{machine['memory_gb']} GB; load average at start {machine['loadavg_start']}"
    )
    console.print(results_table(results))
    console.print(targets_table(targets))


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(redis_version: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem = 0.0
    import grpc
    import numpy
    import redis

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "numpy": numpy.__version__,
        "redis_server": redis_version,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
