"""End-to-end fixtures: the real scaleout==1.0.0 client against `combiner serve` (harness.py)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tests.e2e.harness import CLIENT_VENV, E2E, PROCS, client_installed, create_client_venv


@pytest.fixture(scope="session")
def client_python() -> Path:
    """The python of a venv holding scaleout==1.0.0, created under .cache/ when missing."""
    python = CLIENT_VENV / "bin" / "python"
    CLIENT_VENV.parent.mkdir(parents=True, exist_ok=True)
    lock_path = CLIENT_VENV.parent / f".{CLIENT_VENV.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest processes: one installs
        if not client_installed(python):
            create_client_venv(CLIENT_VENV)
            if not client_installed(python):
                pytest.fail(
                    f"{python} still cannot import scaleout 1.0.0 after installing it",
                    pytrace=False,
                )
    return python


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the log of every process the test started."""
    report = yield
    if report.failed:
        for proc in item.stash.get(PROCS, []):
            report.sections.append((f"{proc.name} log ({proc.log_path})", proc.describe()))
    return report


@pytest.fixture
def e2e(request, redis_url, prefix, tmp_path, client_python):
    system = E2E(request, redis_url, prefix, tmp_path, client_python)
    try:
        yield system
    finally:
        system.stop()
