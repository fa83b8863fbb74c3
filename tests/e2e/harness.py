"""End-to-end harness: the real scaleout==1.0.0 client (its own venv, its own process)
against one replica started with the real CLI (`combiner serve`), driven through the CLI.

Every process is started and stopped by its PID; its output goes to a file under the
test's tmp_path, and conftest.py attaches it to the report when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.embedded import free_port
from tests.services import wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLIENT_REQUIREMENT = "scaleout==1.0.0"
CLIENT_VENV = Path(os.environ.get("SCALEOUT_E2E_VENV", ROOT / ".cache" / "scaleout-venv"))
DRIVER = HERE / "client_driver.py"
CLIENT_PACKAGE = HERE / "client_package" / "client"
HOST = "127.0.0.1"
POLL_INTERVAL = 1  # SCALEOUT_CLIENT_TASK_POLLING_INTERVAL (whole seconds)

PROCS = pytest.StashKey[list]()


def combiner_command() -> list[str]:
    """The installed console script next to this interpreter (else `python -m combiner`)."""
    script = Path(sys.executable).parent / "combiner"
    return [str(script)] if script.exists() else [sys.executable, "-m", "combiner"]


def clean_env(*, python_vars: bool = True, **extra: str) -> dict[str, str]:
    """This environment without settings that would change the processes under test
    (PYTHON* kept for the combiner unless python_vars=False; the client runs with -I)."""
    drop = ("SCALEOUT_", "COMBINER_", "FEDN_") + (() if python_vars else ("PYTHON",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "VIRTUAL_ENV"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --- the client venv ---------------------------------------------------------------------

CHECK_CLIENT = (
    "import importlib.metadata as m, sys\n"
    "import scaleout.client.importer_client, scaleoututil.helpers.plugins.numpyhelper\n"
    "sys.exit(0 if m.version('scaleout') == '1.0.0' else 3)\n"
)


def client_installed(python: Path) -> bool:
    if not python.exists():
        return False
    try:
        check = subprocess.run(
            [str(python), "-I", "-c", CHECK_CLIENT],
            capture_output=True,
            timeout=120,
            env=clean_env(python_vars=False),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def run_step(args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=clean_env(python_vars=False)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{what} failed: {' '.join(args)}: {exc}", pytrace=False)


def create_client_venv(venv: Path) -> None:
    """`python3.11 -m venv` (else this interpreter's python), then pip install the client."""
    candidates = [p for p in (shutil.which("python3.11"), sys.executable) if p]
    errors = []
    for base in candidates:
        made = run_step([base, "-m", "venv", "--clear", str(venv)], "creating a venv", 300)
        if made.returncode == 0 and (venv / "bin" / "python").exists():
            break
        errors.append(f"{base} -m venv: rc {made.returncode}\n{made.stdout}{made.stderr}")
    else:
        pytest.fail(
            f"cannot create the scaleout client venv at {venv}:\n" + "\n".join(errors),
            pytrace=False,
        )
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    installed = run_step([*pip, CLIENT_REQUIREMENT], f"pip install {CLIENT_REQUIREMENT}", 900)
    if installed.returncode != 0:
        pytest.fail(
            f"`pip install {CLIENT_REQUIREMENT}` into {venv} failed (rc {installed.returncode}); "
            f"the end-to-end tests need the real client:\n{installed.stdout}\n{installed.stderr}",
            pytrace=False,
        )


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A child process started by us, stopped by its PID; output in a file."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict, log: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on pytest does not reach it
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def read_log(self, tail: int = 400) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        cut = (
            f"... ({len(lines) - tail} earlier lines in {self.log_path})\n"
            if len(lines) > tail
            else ""
        )
        return cut + "\n".join(lines[-tail:])

    def describe(self, tail: int = 400) -> str:
        rc = self.popen.poll()
        state = "running" if rc is None else f"exited with rc {rc}"
        return f"{self.name} (pid {self.pid}, {state}); log:\n{self.read_log(tail)}"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL if it does not end in time; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode


def ensure_alive(*procs: Proc) -> None:
    for proc in procs:
        if not proc.alive():
            raise AssertionError(f"{proc.name} died:\n{proc.describe(tail=30)}")


# --- the combiner CLI --------------------------------------------------------------------


class Cli:
    """`combiner ...` subprocesses sharing the test's --redis-url and --prefix."""

    def __init__(self, redis_url: str, prefix: str, cwd: Path) -> None:
        self.flags = ["--redis-url", redis_url, "--prefix", prefix]
        self.cwd = cwd

    def __call__(self, *args: str, timeout: float = 30.0) -> str:
        command = [*combiner_command(), *args, *self.flags]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cwd,
            env=clean_env(),
        )
        if done.returncode != 0:
            raise AssertionError(
                f"`combiner {' '.join(args)}` failed (rc {done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def model_put(self, path: Path) -> str:
        return self("model", "put", str(path)).strip()

    def model_get(self, model_id: str, path: Path) -> list[np.ndarray]:
        self("model", "get", model_id, "-o", str(path))
        return load_npz(path)

    def task_push(self, client_id: str, task_type: str, **opts: str) -> str:
        args = ["task", "push", "--client", client_id, "--type", task_type]
        for name, value in opts.items():  # model=, data=, session=, round=
            args += [f"--{name}", value]
        return self(*args).strip()

    def task_show(self, correlation_id: str) -> dict:
        return json.loads(self("task", "show", correlation_id, "--json"))


def save_npz(path: Path, arrays: list[np.ndarray]) -> Path:
    """A model as the client's numpy helper writes it: arrays named "0".."n-1" (§9)."""
    np.savez_compressed(path, **{str(i): a for i, a in enumerate(arrays)})
    return path


def load_npz(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return [npz[str(i)] for i in range(len(npz.files))]


# --- the system under test -----------------------------------------------------------------


@dataclass
class Client:
    proc: Proc
    client_id: str
    name: str
    delta: float
    num_examples: int
    mode: str


class E2E:
    """One replica (`combiner serve`), real clients, and the CLI, for one test."""

    def __init__(self, request, redis_url: str, prefix: str, tmp: Path, client_python: Path):
        self.request = request
        self.redis_url = redis_url
        self.prefix = prefix
        self.tmp = tmp
        self.client_python = client_python
        self.cli = Cli(redis_url, prefix, tmp)
        self.server: Proc | None = None
        self.port = 0
        self.clients: list[Client] = []

    def _track(self, proc: Proc) -> Proc:
        self.request.node.stash.setdefault(PROCS, []).append(proc)
        return proc

    def start_server(self, timeout: float = 20.0) -> int:
        port = free_port()
        args = [
            *combiner_command(), "serve", "--host", HOST, "--port", str(port),
            "--redis-url", self.redis_url, "--prefix", self.prefix,
            "--drain-timeout", "2", "--log-level", "info",
        ]  # fmt: skip
        self.server = self._track(
            Proc("combiner serve", args, self.tmp, clean_env(), self.tmp / "combiner.log")
        )

        def listening():
            ensure_alive(self.server)
            found = re.search(rf"listening on {re.escape(HOST)}:(\d+)", self.server.read_log())
            return int(found.group(1)) if found else 0

        self.port = wait_for(listening, timeout, 0.05, "`combiner serve` to print 'listening on'")
        assert self.port == port, f"asked for port {port}, it listens on {self.port}"
        wait_for(self._serving, timeout, 0.05, "the gRPC health check to answer SERVING")
        return self.port

    def _serving(self) -> bool:
        ensure_alive(self.server)
        with grpc.insecure_channel(f"{HOST}:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="scaleout.CombinerClient"), timeout=2
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def start_client(
        self, *, delta: float, num_examples: int = 10, mode: str = "poll", name: str = ""
    ) -> Client:
        """The real client in its own process, run from a folder holding client/."""
        assert self.server is not None and self.port, "start the server first (§3.2)"
        client_id = f"e2e-{uuid.uuid4().hex[:12]}"
        name = name or f"{client_id}-name"
        home = self.tmp / client_id
        shutil.copytree(CLIENT_PACKAGE, home / "client")
        env = clean_env(
            python_vars=False,
            SCALEOUT_LOG_LEVEL="INFO",
            SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=str(POLL_INTERVAL),
            SCALEOUT_CLIENT_SEND_TELEMETRY="false",
            SCALEOUT_CHECK_COMPATIBILITY="true",
            E2E_DELTA=repr(delta),
            E2E_NUM_EXAMPLES=str(num_examples),
        )
        args = [
            str(self.client_python), "-u", "-I", str(DRIVER),
            HOST, str(self.port), client_id, name, mode,
        ]  # fmt: skip
        proc = self._track(Proc(f"client {client_id}", args, home, env, home / "client.log"))
        client = Client(proc, client_id, name, delta, num_examples, mode)
        self.clients.append(client)
        return client

    def ensure_alive(self) -> None:
        ensure_alive(*(c.proc for c in self.clients), *([self.server] if self.server else []))

    def wait_log(self, proc: Proc, text: str, timeout: float = 20.0) -> None:
        def seen():
            if text in proc.read_log(tail=10_000):
                return True
            self.ensure_alive()
            return False

        wait_for(seen, timeout, 0.05, f"{text!r} in the log of {proc.name}")

    def wait_task(self, correlation_id: str, predicate, timeout: float = 30.0) -> dict:
        """Poll `combiner task show --json` until predicate(view) holds; the clients and the
        server must stay up meanwhile."""
        last: dict = {}

        def check():
            nonlocal last
            self.ensure_alive()
            last = self.cli.task_show(correlation_id)
            return last if predicate(last) else None

        try:
            return wait_for(check, timeout, 0.2, f"task {correlation_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last view:\n{json.dumps(last, indent=2)}") from None

    def stop(self) -> None:
        for client in self.clients:  # clients first: a vanishing server kills them (§3.2)
            client.proc.stop(timeout=15)
        if self.server is not None:
            self.server.stop(timeout=15)
