"""python -m bench [--quick | --smoke] [--out FILE] [--only a,b]: run the benchmark suite.

Prints a table of every figure with its same-run baseline and the ratio, then the targets
(met / missed and by how much), and writes everything as JSON (default
bench/results/<timestamp>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import traceback

from rich.console import Console

from bench import config, report
from bench.scenarios import SCENARIOS
from bench.suite import Bench, loadavg

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite runs")
    parser.add_argument("--out", help="JSON output (default bench/results/<timestamp>.json)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated scenarios: {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--redis-persistence",
        default="none",
        choices=("none", "everysec", "always"),
        help="AOF of the private Redis (default: none, to measure the combiner itself)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and data")
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


async def run_suite(args, cfg: config.Config, console: Console, workdir: pathlib.Path) -> dict:
    names = args.only or list(SCENARIOS)
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, dict] = {}
    async with Bench(cfg, workdir, args.redis_persistence) as bench:
        machine = report.machine(bench.redis.version())
        machine["redis_persistence"] = args.redis_persistence
        for name in names:
            console.print(f"[bold]{name}[/bold] …", end=" ")
            t, before = time.monotonic(), loadavg()
            try:
                res = await SCENARIOS[name](bench)
            except Exception as exc:  # one scenario failing does not lose the others
                res = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
                console.print(f"[red]failed[/red]: {res['error'][:2000]}")
            else:
                console.print(f"{time.monotonic() - t:.0f} s")
            res["seconds"] = time.monotonic() - t
            res["loadavg_before"], res["loadavg_after"] = before, loadavg()
            results[name] = res
        pids = list(bench.registry.pids)
    machine["loadavg_end"] = loadavg()
    targets = report.evaluate(results, cfg)
    return {
        "meta": {
            "mode": cfg.mode,
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "pids": pids,  # every process the suite started (all stopped by now)
        },
        "config": cfg.asdict(),
        "scenarios": results,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = config.SMOKE if args.smoke else config.QUICK if args.quick else config.FULL
    console = Console(width=None if sys.stdout.isatty() else 150)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="combiner-bench-"))
    console.print(f"bench: {cfg.mode} run; logs in {workdir}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{stamp}-{cfg.mode}.json"
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(run_suite(args, cfg, console, workdir))
    # Ctrl-C and SIGTERM cancel the suite; every started process is stopped on the way out
    # (and killed by PID at exit should that cleanup itself be interrupted)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        doc = loop.run_until_complete(main_task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        main_task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(main_task)
        console.print("[yellow]interrupted; every started process was stopped[/yellow]")
        return 130
    finally:
        loop.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    report.print_report(doc["scenarios"], doc["targets"], doc["meta"]["machine"], console)
    console.print(f"results: {out}")
    ok = all("rows" in r for r in doc["scenarios"].values())
    if ok and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        console.print(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
