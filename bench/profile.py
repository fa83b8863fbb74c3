"""Profile one replica under load: ``python -m bench.profile [--method M] [--clients N]``.

Starts what the suite starts (a private Redis, one ``--insecure`` replica), loads it with
bench/refload.py from the real client's venv for ``--seconds``, and samples the replica
meanwhile with py-spy (``pip install py-spy``; it reads the process's memory, so it needs
ptrace rights: root, or ``kernel.yama.ptrace_scope=0``). Prints where the samples were:
self time by function, and the time spent under each of our own functions (combiner/,
broker/), as shares of all samples; ``--out`` keeps the collapsed stacks (flamegraph input).
bench/README.md ("Profile") has a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pathlib
import re
import shutil
import sys
import tempfile

from bench.config import QUICK
from bench.suite import Bench
from bench.venvs import refload_command

FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:]*):?\d*\)$")
OURS = ("combiner/", "broker/")


def label(frame: str) -> str:
    """'fn (path/to/module.py:12)' -> 'module.py:fn'."""
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for root in ("site-packages/", "/work/", "lib/python3.11/"):
        path = path.rsplit(root, 1)[-1]
    return f"{path}:{m['fn']}"


def summarize(collapsed: str, top: int) -> str:
    self_time: collections.Counter = collections.Counter()
    under: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [label(f) for f in stack.split(";")]
        self_time[frames[-1]] += n
        for f in set(frames):
            if f.startswith(OURS):
                under[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self time (leaf frames):"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in self_time.most_common(top)]
    out += ["", "time under our functions (inclusive):"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in under.most_common(top)]
    return "\n".join(out)


async def profile(args: argparse.Namespace) -> str:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="combiner-profile-"))
    cfg = QUICK
    cfg.warmup, cfg.duration = 1.0, args.seconds
    async with Bench(cfg, workdir) as bench:
        (dep,) = await bench.deploy(("profile", 1, "--insecure"))
        raw = workdir / "stacks.txt"
        spy = await asyncio.create_subprocess_exec(
            args.py_spy, "record", "--pid", str(dep.servers[0].pid), "--duration",
            str(int(args.seconds)), "--rate", "250", "--nonblocking", "--format", "raw",
            "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        spec = {
            "kind": "refload",
            "target": dep.target,
            "method": args.method,
            "clients": args.clients,
            "channels": 4,
            "warmup": 1.0,
            "duration": args.seconds,
        }
        result = await bench.timed(spec, dep, refload_command())
        _, err = await spy.communicate()
        if spy.returncode:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')}")
    if args.out:
        shutil.copy(raw, args.out)
    rps = result["rpcs"] / result["seconds"]
    head = f"{args.method} x{args.clients}: {rps:,.0f} RPS while sampled\n"
    return head + summarize(raw.read_text(), args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="PollAndReport")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="keep the collapsed stacks here")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or
                        str(pathlib.Path(sys.executable).parent / "py-spy"))  # fmt: skip
    print(asyncio.run(profile(parser.parse_args())))


if __name__ == "__main__":
    main()
