"""A ``redis-server`` child process on 127.0.0.1: started, awaited until it answers, stopped
by its PID. The embedded mode (broker/embedded.py), the tests and the bench all start their
Redis through this one class.

It is ready when PING succeeds *and* INFO reports our own process id, so a port already taken
by another server is an error (with the tail of the log), never a silent reuse or a hang.

With ``tls`` it listens on TLS only (``--port 0 --tls-port N``, no client certificates), and
``url`` is a ``rediss://`` URL trusting the given CA; with ``username``/``password`` (an ACL
user, e.g. from an ``aclfile`` option) the readiness check and ``url`` log in as that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Does a Redis answer PING at url?"""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@dataclass(frozen=True)
class RedisTLS:
    """Server certificate and key for --tls-port, and the CA clients should trust."""

    cert_file: str
    key_file: str
    ca_file: str


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer before the deadline."""


class RedisProcess:
    """One redis-server child. start() may be called again after stop() or kill(): same port,
    same data folder (so an AOF is replayed). Without data_dir, a temporary folder is used
    and removed by close()."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        options: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        tls: RedisTLS | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        """options: more config, e.g. {"cluster-enabled": "yes"}, passed as --name value."""
        self._owns_dir = data_dir is None
        self.dir = pathlib.Path(data_dir or tempfile.mkdtemp(prefix="redis-")).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.options = dict(options or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.tls = tls
        self.username, self.password = username, password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.username, self.password)

    def url_for(self, username: str = "", password: str = "") -> str:
        """The URL of this server for an ACL user (rediss:// with the CA when on TLS)."""
        login = ""
        if username or password:
            login = f"{quote(username, safe='')}:{quote(password, safe='')}@"
        if self.tls is None:
            return f"redis://{login}127.0.0.1:{self.port}/0"
        ca = quote(str(pathlib.Path(self.tls.ca_file).resolve()), safe="/")
        return f"rediss://{login}127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"

    @property
    def log_path(self) -> pathlib.Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def args(self, binary: str) -> list[str]:
        args = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.tls is not None:
            args[args.index("--port") + 1] = "0"  # no plaintext port
            args += [
                "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert_file,
                "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        for name, value in self.options.items():
            args += [f"--{name}", value]
        return args

    def start(self, timeout: float | None = None) -> RedisProcess:
        """Start the server and wait until it answers, or raise RedisStartError."""
        if self.running():
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisStartError(
                "no redis-server on PATH; install Redis 7 (apt-get install redis-server)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        # Errors printed before the log file is open (a bad option) land in the same file.
        with open(self.log_path, "ab") as early:
            self.process = subprocess.Popen(
                self.args(binary),
                stdin=subprocess.DEVNULL,
                stdout=early,
                stderr=early,
                start_new_session=True,  # Ctrl-C reaches our process only; we stop it
            )
        deadline = time.monotonic() + (timeout or self.start_timeout)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            while not self._is_ours(client):
                if self.process.poll() is not None:
                    self._failed(f"exited with rc {self.process.returncode}")
                if time.monotonic() > deadline:
                    self._failed(f"did not answer within {timeout or self.start_timeout}s")
                time.sleep(0.02)
        finally:
            client.close()
        return self

    def _is_ours(self, client: redis.Redis) -> bool:
        try:
            client.ping()  # refused while the AOF is still loading
            return client.info("server").get("process_id") == self.process.pid
        except (redis.RedisError, OSError):
            return False

    def _failed(self, why: str):
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RedisStartError(
            f"redis-server on 127.0.0.1:{self.port} {why}; log {self.log_path}:\n{tail}"
        )

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (redis-server writes its AOF and exits), SIGKILL after the deadline."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout or self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """Stop, and remove the data folder if it was a temporary one."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> RedisProcess:
        return await in_thread_or_undo(self.start, self.close)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)


async def in_thread_or_undo(do, undo):
    """Run do() in a thread, off the event loop. If we are cancelled meanwhile, the thread
    still runs to its end; then undo() what it did, so no process is left behind."""
    doing = asyncio.ensure_future(asyncio.to_thread(do))
    try:
        return await asyncio.shield(doing)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait([doing])
        undo()
        raise
