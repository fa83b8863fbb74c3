"""End-to-end harness: the real scaleout==1.0.0 client (its own venv, its own process)
against replicas started with the real CLI (`combiner serve`, one or several), with
`combiner worker` processes driving training sessions, all driven through the CLI.

API mode (docs/protocol.md §15): replicas started with `api=ApiSide(...)` check tokens and
serve the HTTP side; start_tls_proxy() puts HAProxy with deploy/haproxy-tls.cfg in front of
them on port 443; start_api_client() runs the unmodified `scaleout client start --api-url
URL --token T --local-package` CLI (no driver) against it.

Every process is started and stopped by its PID; its output goes to a file under the
test's tmp_path, and conftest.py attaches it to the report when the test fails.
"""

from __future__ import annotations

import asyncio
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
SCALEOUT_CLI = CLIENT_VENV / "bin" / "scaleout"  # the published CLI's console script
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

    def __init__(
        self,
        name: str,
        args: list[str],
        cwd: Path,
        env: dict,
        log: Path,
        stdout: Path | None = None,
    ) -> None:
        """Output (stdout and stderr) goes to log; with stdout given, stdout goes there and
        only stderr to log (for commands whose stdout is a result, e.g. JSON)."""
        self.name = name
        self.args = args
        self.log_path = log
        self.stdout_path = stdout
        self.killed = False  # SIGKILLed on purpose by the test: not expected to be alive
        self.worker_id = ""  # for `combiner worker` processes
        self._terminated = False
        with contextlib.ExitStack() as files:
            err = files.enter_context(open(log, "wb"))
            out = files.enter_context(open(stdout, "wb")) if stdout else err
            self.popen = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err if stdout else subprocess.STDOUT,
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

    def kill(self) -> int:
        """SIGKILL by PID (a crash: no clean-up, no Disconnect); returns the exit code."""
        self.killed = True
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM by PID, once."""
        if self.popen.poll() is None and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL if it does not end in time; returns the exit code."""
        self.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)
        return self.popen.returncode


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """Stop several processes at once: SIGTERM to each, then wait for each."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop(timeout)


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

    def session_show(self, session_id: str) -> dict:
        return json.loads(self("session", "show", session_id, "--json"))

    def status(self) -> dict:
        return json.loads(self("status", "--json"))

    def token_create(self, client_id: str) -> str:
        """A new refresh token for client_id (`token create` prints it as its last line)."""
        return self("token", "create", "--client", client_id).strip().splitlines()[-1]

    def token_revoke(self, client_id: str) -> list[str]:
        """Revoke every token of client_id; returns the revoked token ids."""
        return self("token", "revoke", "--client", client_id).split()


def save_npz(path: Path, arrays: list[np.ndarray]) -> Path:
    """A model as the client's numpy helper writes it: arrays named "0".."n-1" (§9)."""
    np.savez_compressed(path, **{str(i): a for i, a in enumerate(arrays)})
    return path


def release(hold_dir: Path, call: int) -> None:
    """Let the clients started with hold_dir=hold_dir finish their training call `call`."""
    (hold_dir / f"release-{call}").touch()


def load_npz(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return [npz[str(i)] for i in range(len(npz.files))]


def client_env(
    *,
    delta: float,
    num_examples: int,
    train_seconds: float = 0.0,
    slow_calls: str = "",
    hold_dir: Path | None = None,
    hold_calls: str = "",
) -> dict[str, str]:
    """The real client's environment: quiet, fast polls, and client_package/'s settings."""
    return clean_env(
        python_vars=False,
        SCALEOUT_LOG_LEVEL="INFO",
        SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=str(POLL_INTERVAL),
        SCALEOUT_CLIENT_SEND_TELEMETRY="false",
        SCALEOUT_CHECK_COMPATIBILITY="true",
        E2E_DELTA=repr(delta),
        E2E_NUM_EXAMPLES=str(num_examples),
        E2E_TRAIN_SECONDS=repr(float(train_seconds)),
        E2E_SLOW_CALLS=slow_calls,
        E2E_HOLD_DIR=str(hold_dir or ""),
        E2E_HOLD_CALLS=hold_calls,
    )


def api_post(url: str, body: dict, ca: Path, token: str = "") -> tuple[int, dict]:
    """POST JSON over HTTPS verified against ca; (status, JSON body or {}), never raises for
    an HTTP error status."""
    import ssl
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}


# --- the system under test -----------------------------------------------------------------


@dataclass
class Client:
    proc: Proc
    client_id: str
    name: str
    delta: float
    num_examples: int
    mode: str
    port: int


@dataclass(frozen=True)
class ApiSide:
    """A replica with tokens on and the HTTP side (`serve --http-port`), assigning clients
    to public_host:public_port (HAProxy's address; 443 makes the 1.0.0 client use TLS;
    0: the replica's own gRPC port, clients attach to the replica that assigned them).
    Replicas that share signing_key (created by the first) mint tokens every one accepts."""

    public_host: str
    public_port: int
    signing_key: Path


class Session:
    """`combiner session start ... --wait --json` running in the background: its stdout
    (the session record as JSON) and its stderr (progress, logs) go to separate files."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self._id = ""

    @property
    def session_id(self) -> str:
        """The id it prints on stderr ("session ID queued; ...") once the session exists."""
        if not self._id:

            def printed():
                found = re.search(r"session (\S+) queued", self.proc.read_log())
                if found:
                    return found.group(1)
                if not self.proc.alive():
                    raise AssertionError(f"session start ended early:\n{self.proc.describe()}")
                return None

            self._id = wait_for(printed, 30, 0.05, "`session start` to print the session id")
        return self._id

    def result(self, timeout: float, check=None) -> dict:
        """Wait for the command to end (calling check() meanwhile: it may raise) and return
        the session record it printed."""

        def ended():
            if check is not None:
                check()
            return self.proc.popen.poll() is not None

        wait_for(ended, timeout, 0.2, "`combiner session start --wait` to end")
        out = self.proc.stdout_path.read_text()
        try:
            return json.loads(out)
        except ValueError:
            raise AssertionError(
                f"`session start --wait --json` printed no JSON:\n{out}\n{self.proc.describe()}"
            ) from None


class E2E:
    """Replicas (`combiner serve`), workers (`combiner worker`), real clients and the CLI,
    for one test. start_server() may be called several times: one replica each."""

    def __init__(self, request, redis_url: str, prefix: str, tmp: Path, client_python: Path):
        self.request = request
        self.redis_url = redis_url
        self.prefix = prefix
        self.tmp = tmp
        self.client_python = client_python
        self.cli = Cli(redis_url, prefix, tmp)
        self.servers: list[Proc] = []
        self.ports: list[int] = []
        self.http_ports: list[int] = []  # of replicas started with api=, in that order
        self.workers: list[Proc] = []
        self.clients: list[Client] = []
        self.others: list[Proc] = []  # e.g. `session start --wait`

    @property
    def server(self) -> Proc | None:
        """The first replica."""
        return self.servers[0] if self.servers else None

    @property
    def port(self) -> int:
        """The first replica's port."""
        return self.ports[0] if self.ports else 0

    def _track(self, proc: Proc) -> Proc:
        self.request.node.stash.setdefault(PROCS, []).append(proc)
        return proc

    def start_server(self, timeout: float = 20.0, api: ApiSide | None = None) -> int:
        """One more replica on a free port; returns its port once it answers SERVING.
        Without api: --insecure (the direct-attach tests' clients send no tokens, §3.1).
        With api: tokens checked, and the HTTP side on a port of its choosing
        (self.http_ports)."""
        n = len(self.servers) + 1
        port = free_port()
        args = [
            *combiner_command(), "serve", "--host", HOST, "--port", str(port),
            "--redis-url", self.redis_url, "--prefix", self.prefix,
            "--replica-id", f"e2e-r{n}-{self.prefix}",
            "--drain-timeout", "2", "--drain-delay", "0", "--log-level", "info",
        ]  # fmt: skip
        if api is None:
            args.append("--insecure")
        else:
            args += [
                "--http-port", "0", "--public-host", api.public_host,
                "--signing-key", str(api.signing_key),
            ]  # fmt: skip
            if api.public_port:
                args += ["--public-port", str(api.public_port)]
        log = self.tmp / ("combiner.log" if n == 1 else f"combiner-{n}.log")
        server = self._track(Proc(f"combiner serve #{n}", args, self.tmp, clean_env(), log))
        self.servers.append(server)

        def listening():
            ensure_alive(server)
            found = re.search(rf"listening on {re.escape(HOST)}:(\d+)", server.read_log())
            return int(found.group(1)) if found else 0

        got = wait_for(listening, timeout, 0.05, f"`combiner serve` #{n} to print 'listening on'")
        assert got == port, f"asked for port {port}, it listens on {got}"
        self.ports.append(port)
        if api is not None:

            def http_listening():
                ensure_alive(server)
                found = re.search(rf"http on {re.escape(HOST)}:(\d+)", server.read_log())
                return int(found.group(1)) if found else 0

            self.http_ports.append(
                wait_for(http_listening, timeout, 0.05, f"replica #{n} to print 'http on'")
            )
        wait_for(
            lambda: self._serving(server, port),
            timeout,
            0.05,
            f"the gRPC health check of replica #{n} to answer SERVING",
        )
        return port

    def _serving(self, server: Proc, port: int) -> bool:
        ensure_alive(server)
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="scaleout.CombinerClient"), timeout=2
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def start_worker(
        self,
        *,
        lease_ttl: float = 3.0,
        offline_after: float = 5.0,
        poll_every: float = 0.2,
        timeout: float = 20.0,
        extra: tuple[str, ...] = (),
    ) -> Proc:
        """One `combiner worker` process (short lease and liveness times, so takeover and
        offline detection happen within a test; extra: more flags); returns once it has
        started."""
        n = len(self.workers) + 1
        worker_id = f"e2e-w{n}-{uuid.uuid4().hex[:6]}"
        args = [
            *combiner_command(), "worker", "--worker-id", worker_id,
            "--redis-url", self.redis_url, "--prefix", self.prefix,
            "--lease-ttl", str(lease_ttl), "--offline-after", str(offline_after),
            "--poll-every", str(poll_every), "--log-level", "info", *extra,
        ]  # fmt: skip
        log = self.tmp / f"worker-{n}.log"
        proc = self._track(Proc(f"combiner worker {worker_id}", args, self.tmp, clean_env(), log))
        proc.worker_id = worker_id
        self.workers.append(proc)
        self.wait_log(proc, f"worker {worker_id} started", timeout)
        return proc

    def start_tls_proxy(self, host: str, certs, timeout: float = 20.0) -> Proc:
        """HAProxy with deploy/haproxy-tls.cfg on host:443, terminating TLS with certs
        (tests/certs.py ServerFiles) in front of every replica started so far with api=:
        gRPC to their gRPC ports, /api to their HTTP sides. Returns once a gRPC health check
        and an HTTP request through it reach the replicas."""
        from tests.cluster import HAPROXY_TLS_CFG, MAX_REPLICAS, tls_haproxy_env

        assert 1 <= len(self.http_ports) <= MAX_REPLICAS, "start replicas with api= first"
        binary = shutil.which("haproxy")
        assert binary, "haproxy is not installed"
        grpc_addrs = [f"{HOST}:{p}" for p in self.ports[: len(self.http_ports)]]
        http_addrs = [f"{HOST}:{p}" for p in self.http_ports]
        env = {
            **clean_env(),
            **tls_haproxy_env(f"{host}:443", certs.combined, grpc_addrs, http_addrs),
        }
        args = [binary, "-db", "-f", str(HAPROXY_TLS_CFG)]
        proxy = self._track(Proc("haproxy (TLS)", args, self.tmp, env, self.tmp / "haproxy.log"))
        self.others.append(proxy)
        roots = certs.ca.read_bytes()

        def grpc_through():
            ensure_alive(proxy)
            credentials = grpc.ssl_channel_credentials(roots)
            with grpc.secure_channel(f"{host}:443", credentials) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="scaleout.CombinerClient"),
                        timeout=2,
                    )
                except grpc.RpcError:
                    return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        def http_through():
            ensure_alive(proxy)
            # an empty refresh: a replica answers 400 JSON, HAProxy alone only 503
            status, body = api_post(f"https://{host}:443/api/auth/refresh", {}, certs.ca)
            return status == 400 and "message" in body

        wait_for(grpc_through, timeout, 0.1, "a gRPC health check through HAProxy TLS")
        wait_for(http_through, timeout, 0.1, "the replicas' HTTP side through HAProxy TLS")
        return proxy

    def start_session(self, seed: Path, *options: str) -> Session:
        """`combiner session start --seed-model SEED OPTIONS --wait --json` in the background."""
        n = len(self.others) + 1
        args = [
            *combiner_command(), "session", "start", "--seed-model", str(seed), *options,
            "--wait", "--json", *self.cli.flags,
        ]  # fmt: skip
        log, out = self.tmp / f"session-{n}.log", self.tmp / f"session-{n}.json"
        proc = self._track(Proc(f"session start #{n}", args, self.tmp, clean_env(), log, out))
        self.others.append(proc)
        return Session(proc)

    def start_client(
        self,
        *,
        delta: float,
        num_examples: int = 10,
        mode: str = "poll",
        name: str = "",
        port: int = 0,
        host: str = HOST,
        train_seconds: float = 0.0,
        slow_calls: str = "",
        hold_dir: Path | None = None,
        hold_calls: str = "",
    ) -> Client:
        """The real client in its own process, run from a folder holding client/, attached
        to host:port (default: the first replica's port; give a port to attach it to
        something this E2E did not start, e.g. HAProxy in front of a tests/cluster.py
        Cluster, which must be listening already). train_seconds makes its train
        callback sleep that long, in the training calls listed in slow_calls ("2,3": its
        second and third; default: every call). With hold_dir, the training calls listed in
        hold_calls wait until the test creates hold_dir/release-<call> (see release())."""
        assert port or (self.servers and self.port), "start the server first (§3.2)"
        port = port or self.port
        client_id = f"e2e-{uuid.uuid4().hex[:12]}"
        name = name or f"{client_id}-name"
        home = self.tmp / client_id
        shutil.copytree(CLIENT_PACKAGE, home / "client")
        env = client_env(
            delta=delta,
            num_examples=num_examples,
            train_seconds=train_seconds,
            slow_calls=slow_calls,
            hold_dir=hold_dir,
            hold_calls=hold_calls,
        )
        args = [
            str(self.client_python), "-u", "-I", str(DRIVER),
            host, str(port), client_id, name, mode,
        ]  # fmt: skip
        proc = self._track(Proc(f"client {client_id}", args, home, env, home / "client.log"))
        client = Client(proc, client_id, name, delta, num_examples, mode, port)
        self.clients.append(client)
        return client

    def start_api_client(
        self,
        api_url: str,
        token: str,
        client_id: str,
        *,
        delta: float,
        num_examples: int = 10,
        env: dict[str, str] | None = None,
        hold_dir: Path | None = None,
        hold_calls: str = "",
        local_package: bool = True,
    ) -> Client:
        """The unmodified published CLI in API mode, no driver:
        `scaleout client start --api-url URL --token T --client-id ID --name N --local-package`
        run from a folder holding client/ (the compute package, client_package/), which is
        all --local-package needs (it loads ./client/scaleout.yaml's startup entry point).
        The token is exchanged at URL/api/auth/refresh and URL/api/v1/clients/add assigns
        the client to a replica address (§15). env adds to the environment (the TLS roots:
        REQUESTS_CA_BUNDLE for the HTTP side, SCALEOUT_GRPC_ROOT_CERT_PATH or
        GRPC_DEFAULT_SSL_ROOTS_FILE_PATH for gRPC). Its token cache and $HOME are its own
        folder, so nothing is read from or left in ~/.scaleout. Without local_package the
        CLI runs without --local-package from an empty folder: it downloads the active
        compute package (URL/api/v1/packages/download), checks its checksum and runs it."""
        name = f"{client_id}-name"
        home = self.tmp / client_id
        if local_package:
            shutil.copytree(CLIENT_PACKAGE, home / "client")
        else:
            home.mkdir(parents=True)
        extra = {"SCALEOUT_TOKEN_CACHE_DIR": str(home / "tokens"), "HOME": str(home)}
        full_env = client_env(
            delta=delta, num_examples=num_examples, hold_dir=hold_dir, hold_calls=hold_calls
        )
        for inherited in (
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        ):
            full_env.pop(inherited, None)  # only what the test gives
        full_env.update(extra, **(env or {}))
        args = [
            str(SCALEOUT_CLI), "client", "start", "--api-url", api_url, "--token", token,
            "--client-id", client_id, "--name", name,
        ]  # fmt: skip
        if local_package:
            args.append("--local-package")
        proc = self._track(
            Proc(f"client {client_id} (CLI)", args, home, full_env, home / "client.log")
        )
        client = Client(proc, client_id, name, delta, num_examples, "api", 0)
        self.clients.append(client)
        return client

    def ensure_alive(self) -> None:
        """Every process the test did not kill on purpose is still running."""
        procs = [c.proc for c in self.clients] + self.servers + self.workers
        ensure_alive(*(p for p in procs if not p.killed))

    def wait_log(self, proc: Proc, text: str, timeout: float = 20.0) -> None:
        def seen():
            if text in proc.read_log(tail=10_000):
                return True
            self.ensure_alive()
            return False

        wait_for(seen, timeout, 0.05, f"{text!r} in the log of {proc.name}")

    def wait_online(self, clients: list[Client], timeout: float = 30.0) -> None:
        """Until `combiner status --json` lists these clients online."""
        want = {c.client_id for c in clients}

        def online():
            self.ensure_alive()
            return want <= set(self.cli.status()["clients"]["online"])

        wait_for(online, timeout, 0.2, f"clients {sorted(want)} to be online")

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

    def wait_session(self, session_id: str, predicate, timeout: float = 60.0) -> dict:
        """Poll `combiner session show --json` until predicate(view) holds."""
        last: dict = {}

        def check():
            nonlocal last
            self.ensure_alive()
            last = self.cli.session_show(session_id)
            return last if predicate(last) else None

        try:
            return wait_for(check, timeout, 0.1, f"session {session_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last view:\n{json.dumps(last, indent=2)}") from None

    # Reads the CLI does not print, through the broker API (no Redis command in tests).

    def _broker_call(self, fn):
        from broker import connect
        from broker.context import Settings

        async def run():
            broker = await connect(self.redis_url, settings=Settings(prefix=self.prefix))
            try:
                return await fn(broker)
            finally:
                await broker.close()

        return asyncio.run(run())

    def drivers(self, session_id: str) -> list[str]:
        """The session's driver log: "worker-id time" each time a worker took its lease."""
        return self._broker_call(lambda b: b.sessions.drivers(session_id))

    def round_tasks(self, session_id: str, round_id: str, kind: str = "tasks") -> dict[str, str]:
        """The round's training tasks (kind="validations": its validation tasks):
        correlation id -> client id."""
        return self._broker_call(lambda b: b.sessions.round_tasks(session_id, round_id, kind))

    def task_records(self, tasks: dict[str, str]) -> dict[str, dict[str, str]]:
        """The stored records (state, attempts, via, ...) of tasks given as corr -> client."""
        return self._broker_call(lambda b: b.tasks.records(tasks))

    def last_seen(self) -> dict[str, float]:
        """Client id -> when a replica last heard from it (every poll updates it)."""
        return self._broker_call(lambda b: b.presence.clients())

    def stop(self) -> None:
        stop_all([c.proc for c in self.clients])  # first: a vanishing server kills them (§3.2)
        stop_all([*self.others, *self.workers])
        stop_all(self.servers)
