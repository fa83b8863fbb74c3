"""The benchmark suite at a tiny size (`python -m bench --smoke`): every scenario reports
numbers with their same-run baselines, targets are evaluated, and every process the suite
started is gone afterwards. No speed is asserted: this machine's figures are bench/'s job."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from bench.scenarios import SCENARIOS

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="the suite starts its own redis-server"
)


def number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_smoke_run_reports_every_scenario_with_baselines(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())

    assert doc["meta"]["mode"] == "smoke"
    assert doc["meta"]["machine"]["cpus"] >= 1
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name, scenario in doc["scenarios"].items():
        assert "error" not in scenario, f"{name}: {scenario.get('error')}"
        assert scenario["rows"], name
        for row in scenario["rows"]:
            what = f"{name}: {row['case']} {row['metric']}"
            assert number(row["value"]), what
            assert row["baseline"], what
            assert number(row["baseline_value"]), what
            # CPU time comes in 10 ms ticks: at smoke sizes a baseline may read 0
            assert number(row["ratio"]) or row["baseline_value"] == 0, what

    # every target got a verdict, none is missing its data
    verdicts = {t["target"] for t in doc["targets"]}
    assert len(verdicts) >= 8
    assert all(t["status"] in ("met", "missed") for t in doc["targets"]), doc["targets"]

    # the poll figures come with Redis round trips per RPC, measured on the private Redis
    runs = doc["scenarios"]["poll"]["details"]["runs"]
    assert runs["R=1"][0]["redis"]["exec"] > 0
    # the FedAvg result matched the in-memory numpy mean
    round_ = doc["scenarios"]["round"]
    assert round_["details"]["max_rel_diff"] < 1e-3
    # ... and every other aggregator, through the same code path, matched numpy's
    # (fedopt: one adam step from the seed; fedmedian: np.median; fedtrimmedavg: trimmed mean)
    aggregators = ("fedavg", "fedopt", "fedmedian", "fedtrimmedavg")
    checks = round_["details"]["checks"]
    assert set(checks) == set(aggregators)
    assert all(c["max_rel_diff"] < 1e-3 for c in checks.values()), checks
    keys = {r.get("key") for r in round_["rows"]}
    assert {f"peak_models_{name}" for name in aggregators[1:]} <= keys
    k = doc["config"]["round_clients"]
    assert all(round_["details"][name]["updates"] == k for name in aggregators)

    # percore: bare servers on our grpcio and on another venv's, loaded by the real
    # client's grpcio; the replica's figures come with Redis CPU and round trips
    percore = doc["scenarios"]["percore"]
    tried = percore["details"]["grpcio"]
    assert len(tried) >= 2 and "1.74.0" in tried, tried
    assert all(v["grpcio"] == k for k, v in tried.items()), tried
    keys = {r.get("key") for r in percore["rows"]}
    assert {"poll/20/rps", "poll/20/cpu", "telemetry/20/tokens"} <= keys, keys
    cpu = next(r for r in percore["rows"] if r.get("key") == "poll/20/cpu")
    assert cpu["redis_us"] > 0 and cpu["value"] > cpu["replica_us"]

    # nothing the suite started is left running
    pids = doc["meta"]["pids"]
    assert len(pids) >= 8  # Redis, replicas, bare servers, load generators, aggregators
    assert not [p for p in pids if alive(p)]
    assert "results:" in proc.stdout


def test_profile_summary_counts_self_and_inclusive_time():
    from bench.profile import summarize

    stacks = (
        "main (combiner/__main__.py:3);guarded (combiner/errors.py:10);"
        "poll (broker/tasks.py:5);execute (redis/asyncio/client.py:9) 3\n"
        "main (combiner/__main__.py:3);select (selectors.py:1) 1\n"
    )
    text = summarize(stacks, top=10)
    assert text.startswith("4 samples")
    self_part, inclusive = text.split("inclusive")
    assert "75.0%  redis/asyncio/client.py:execute" in self_part
    assert "25.0%  selectors.py:select" in self_part
    assert "75.0%  broker/tasks.py:poll" in inclusive
    assert "100.0%  combiner/__main__.py:main" in inclusive
    assert "selectors" not in inclusive  # only our own functions there
