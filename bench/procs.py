"""Every process the suite starts: a private redis-server, replicas (`combiner serve`),
bare baseline servers, load generators and the aggregation child. All are registered
here and stopped by PID when the suite ends, also on Ctrl-C, SIGTERM or an error."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import redis

from broker.redis_process import RedisProcess

_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory field in kB (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Registry:
    """Processes to stop, newest first. An atexit hook is the last resort."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen | asyncio.subprocess.Process] = []
        self.pids: list[int] = []  # every process ever started, for the record
        atexit.register(self.kill_all)

    def add(self, proc):
        self.procs.append(proc)
        self.pids.append(proc.pid)
        return proc

    def kill_all(self) -> None:
        """SIGKILL whatever is still running (stopping in order is the callers' job)."""
        for proc in reversed(self.procs):
            running = (
                proc.poll() is None
                if isinstance(proc, subprocess.Popen)
                else (proc.returncode is None)
            )
            if running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                if isinstance(proc, subprocess.Popen):
                    with contextlib.suppress(Exception):
                        proc.wait(5)
        self.procs.clear()


class RedisProc(RedisProcess):
    """A private redis-server on a free loopback port (never the one on 6379), registered
    so that the suite's last-resort kill reaches it too."""

    def __init__(self, registry: Registry, workdir: pathlib.Path, persistence: str) -> None:
        aof = persistence != "none"
        super().__init__(
            workdir / "redis", appendonly=aof, appendfsync=persistence if aof else "everysec"
        )
        self.registry = registry
        self.persistence = persistence

    def start(self, timeout: float | None = None) -> RedisProc:
        super().start(timeout)
        self.registry.add(self.process)
        return self

    def version(self) -> str:
        client = redis.Redis.from_url(self.url)
        try:
            return client.info("server")["redis_version"]
        finally:
            client.close()


class ReplicaRedisProc(RedisProcess):
    """A redis-server replicating the suite's Redis (``replicaof``), registered like it; the
    durability scenario's replica. ready() returns once the master counts it and a WAIT
    there is answered (right after a full sync the first ACK may take the replica's 1 s
    tick)."""

    def __init__(self, registry: Registry, workdir: pathlib.Path, master: RedisProcess) -> None:
        super().__init__(
            workdir / "redis-replica", options={"replicaof": f"127.0.0.1 {master.port}"}
        )
        self.registry = registry
        self.master = master

    def start(self, timeout: float | None = None) -> ReplicaRedisProc:
        master = redis.Redis.from_url(self.master.url, socket_timeout=5)
        try:
            # a full sync starts at once rather than after the default 5 s wait for others
            master.config_set("repl-diskless-sync-delay", 0)
        finally:
            master.close()
        super().start(timeout)
        self.registry.add(self.process)
        return self

    def ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        mine = redis.Redis.from_url(self.url, socket_timeout=2)
        master = redis.Redis.from_url(self.master.url, socket_timeout=timeout)
        try:
            while mine.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {self.port} never synced")
                time.sleep(0.02)
            master.set("bench-replica-ready", "1")
            left = max(1, int((deadline - time.monotonic()) * 1000))
            if master.wait(1, left) < 1:
                raise TimeoutError(f"replica {self.port} never acknowledged a write")
            master.delete("bench-replica-ready")
        finally:
            mine.close()
            master.close()


def stop_popen(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProc:
    """A gRPC server child (a replica or the bare baseline) that prints its port; python
    is the interpreter that runs args (a bare server on another grpcio has its own)."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        args: list[str],
        log: pathlib.Path,
        python: str = sys.executable,
    ):
        self.registry = registry
        self.name = name
        self.args = args
        self.python = python
        self.log_path = log
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProc:
        log = open(self.log_path, "ab")
        self.process = self.registry.add(
            subprocess.Popen(
                [self.python, *self.args],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # Ctrl-C reaches the suite only; it stops us
            )
        )
        self._log = log
        return self

    def wait_listening(self, timeout: float = 60.0) -> ServerProc:
        deadline = time.monotonic() + timeout
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            self._log.write(raw)
            match = _LISTENING.search(raw.decode(errors="replace"))
            if match:
                self.port = int(match.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not start:\n{tail}")

    def _drain(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            for raw in self.process.stdout:
                self._log.write(raw)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def stop(self) -> None:
        stop_popen(self.process, 10)


def replica_args(redis_url: str, prefix: str, name: str, state: pathlib.Path, *extra: str):
    return [
        "-m", "combiner", "serve", "--host", "127.0.0.1", "--port", "0",
        "--redis-url", redis_url, "--prefix", prefix, "--replica-id", name,
        "--state-dir", str(state), "--drain-delay", "0", "--drain-timeout", "1",
        "--log-level", "warning",
        "--insecure",  # for now: the bench clients send no tokens (issue 12)
        *extra,
    ]  # fmt: skip


def bare_args() -> list[str]:
    return ["-m", "bench.bare", "--host", "127.0.0.1", "--port", "0"]


LOADGEN = (sys.executable, "-m", "bench.client")


class ClientProc:
    """A load generator child (bench.client, or another argv speaking its protocol, such
    as bench/refload.py in the real client's venv): JSON events out, commands in."""

    def __init__(self, registry: Registry, spec: dict, log: pathlib.Path, command=LOADGEN) -> None:
        self.registry = registry
        self.command = command
        self.spec = spec
        self.log_path = log
        self.process: asyncio.subprocess.Process | None = None
        self.events: list[dict] = []

    async def start(self) -> ClientProc:
        log = open(self.log_path, "ab")  # noqa: ASYNC230 (a local log file)
        self.process = self.registry.add(
            await asyncio.create_subprocess_exec(
                *self.command,
                json.dumps(self.spec),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                limit=64 * 1024 * 1024,  # the fanout result is one long line
            )
        )
        log.close()
        return self

    async def event(self, name: str, within: float = 120.0) -> dict:
        """The next event called name (earlier other events are kept)."""
        assert self.process is not None and self.process.stdout is not None

        async def read():
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    await self.process.wait()
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"load generator exited early:\n{tail}")
                msg = json.loads(line)
                self.events.append(msg)
                if msg["event"] == name:
                    return msg

        return await asyncio.wait_for(read(), within)

    async def send(self, **cmd) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.process.stdin.drain()

    async def result(self, within: float = 300.0) -> dict:
        msg = await self.event("result", within)
        await self.process.wait()
        return msg

    async def stop(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
