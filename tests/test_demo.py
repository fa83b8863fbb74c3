"""`combiner demo` at a small size: it runs, its summary is right, and the final model is
the FedAvg the test recomputes from the same clients' data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from combiner.demo import FEATURES, make_learner
from workers.fedavg import load_npz


def expected_model(clients: int, rounds: int) -> list[np.ndarray]:
    model = [np.zeros(FEATURES, dtype=np.float32), np.zeros(1, dtype=np.float32)]
    learners = [make_learner(i)[0] for i in range(clients)]
    for _ in range(rounds):
        results = [train([a.copy() for a in model], {}) for train in learners]
        total = sum(n for _, n in results)
        model = [
            sum(arrays[k].astype(np.float64) * n for arrays, n in results) / total for k in range(2)
        ]
    return model


def test_demo_small(tmp_path, redis_url):
    done = subprocess.run(
        [sys.executable, "-m", "combiner", "demo", "--clients", "3", "--replicas", "2",
         "--rounds", "3", "--json", "--state-dir", str(tmp_path), "--redis-url", redis_url],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    session = summary["session"]
    assert session["status"] == "completed"
    assert [r["status"] for r in session["rounds"]] == ["done"] * 3
    for r in session["rounds"]:
        assert r["clients"] == ["client-1", "client-2", "client-3"]
        assert (r["updates"], r["validations"]) == (3, 3)
    assert summary["replica_restarted"] is True and summary["client_failures"] == 0
    # every client joined with its own token through a replica's HTTP side, and no token
    # (refresh "sct_...", access "eyJ...") reached a log
    assert summary["tokens"] is True
    logs = "".join(p.read_text() for p in (tmp_path / "demo-logs").glob("replica-*.log"))
    for i in (1, 2, 3):
        assert f"client 'client-{i}' assigned" in logs
    assert "sct_" not in logs and "eyJ" not in logs
    final = load_npz((tmp_path / "demo-final-model.npz").read_bytes())
    for got, want in zip(final, expected_model(3, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the validation metric falls as the model learns
    mse = [np.mean([v["data"]["mse"] for v in r["validation_results"]]) for r in session["rounds"]]
    assert mse[-1] < mse[0]


def test_demo_stops_everything_on_interrupt(tmp_path, redis_url):
    """Ctrl-C: the demo stops its replicas and worker and leaves no process behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "combiner", "demo", "--clients", "2", "--rounds", "50",
         "--state-dir", str(tmp_path), "--redis-url", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "session" in line and "rounds of FedAvg" in line:
            break
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 3, "".join(lines)  # two replicas and a worker
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + out
    for pid in children:
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0
