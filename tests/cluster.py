"""The deployment of compose.yaml as processes on loopback: Redis (AOF, fsync always),
R replicas (`combiner serve`), W workers (`combiner worker`) and HAProxy with the very
config in deploy/haproxy.cfg. Every process is ours, started and stopped by PID.
With redis_url=, the replicas and workers use that Redis (e.g. a tests/sentinel.py
topology's redis+sentinel:// URL) and the Cluster starts none of its own."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.embedded import free_port
from combiner.processes import Child
from tests.services import RedisServer, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
HAPROXY_TLS_CFG = ROOT / "deploy" / "haproxy-tls.cfg"
MAX_REPLICAS = 3  # server lines in deploy/haproxy.cfg and deploy/haproxy-tls.cfg


def start_haproxy(cfg: pathlib.Path, env: dict[str, str], log_path) -> subprocess.Popen:
    """HAProxy in the foreground on cfg with env (HAPROXY_BIND, REPLICA1, ...); stop it with
    stop_haproxy(). Raises RuntimeError if it is not installed."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
    log = open(log_path, "ab")
    return subprocess.Popen(
        [binary, "-db", "-f", str(cfg)],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def stop_haproxy(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tls_haproxy_env(bind: str, cert, grpc: list[str], http: list[str]) -> dict[str, str]:
    """The environment of deploy/haproxy-tls.cfg: bind address, combined PEM (cert + key,
    tests.certs ServerFiles.combined), and up to MAX_REPLICAS gRPC and HTTP addresses
    (unused server lines repeat the last address)."""
    grpc = [*grpc, *[grpc[-1]] * (MAX_REPLICAS - len(grpc))]
    http = [*http, *[http[-1]] * (MAX_REPLICAS - len(http))]
    env = {"HAPROXY_BIND": bind, "HAPROXY_CERT": str(cert)}
    for i in range(MAX_REPLICAS):
        env[f"REPLICA{i + 1}"] = grpc[i]
        env[f"REPLICA{i + 1}_HTTP"] = http[i]
    return env


def free_tls_host(port: int = 443, candidates=range(2, 10)) -> str | None:
    """The first of 127.0.0.2, 127.0.0.3, ... where port (443: the only port on which the
    1.0.0 client speaks TLS, docs/protocol.md §15) can be bound now, else None (not root,
    or all taken). Loopback only."""
    for last in candidates:
        host = f"127.0.0.{last}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return host
    return None


def health_status(target: str, timeout: float = 1.0) -> int | None:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return reply.status
    except grpc.RpcError:
        return None


class Cluster:
    def __init__(
        self,
        tmp: pathlib.Path,
        prefix: str,
        replicas: int = 3,
        workers: int = 1,
        replica_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        redis_url: str | None = None,
    ) -> None:
        """redis_url: a Redis someone else runs (and stops); else the Cluster's own."""
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"1..{MAX_REPLICAS} replicas")
        self.tmp = tmp
        self.prefix = prefix
        self.n_replicas = replicas
        self.n_workers = workers
        self.replica_args = replica_args
        self.worker_args = worker_args
        # None with redis_url= given: restart_redis() is for the Cluster's own Redis only
        self.redis = None if redis_url else RedisServer(appendonly=True, fsync="always")
        self._redis_url = redis_url
        self.replicas: list[Child] = []
        self.workers: list[Child] = []
        self.haproxy: subprocess.Popen | None = None
        self.port = 0

    @property
    def target(self) -> str:
        """Where clients connect: HAProxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        """The URL every replica and worker is given."""
        return self._redis_url or self.redis.url

    @property
    def common(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--prefix", self.prefix]

    def start(self) -> Cluster:
        if self.redis is not None:
            self.redis.start()
        for i in range(self.n_replicas):
            self.replicas.append(self._replica(i, free_port()).start(wait_listening=True))
        for i in range(self.n_workers):
            self.start_worker(i)
        self._start_haproxy()
        return self

    def _replica(self, i: int, port: int) -> Child:
        args = [
            "serve", "--port", str(port), "--replica-id", f"replica{i + 1}",
            "--drain-delay", "1.5", "--drain-timeout", "5", "--stream-keepalive", "5",
            "--insecure",  # for now: its clients send no tokens yet (issue 12)
            *self.common, *self.replica_args,
        ]  # fmt: skip
        return Child(args, str(self.tmp / f"replica{i + 1}.log"))

    def start_worker(self, i: int) -> Child:
        args = [
            "worker", "--worker-id", f"worker{i + 1}", "--lease-ttl", "3",
            "--offline-after", "6", "--poll-every", "0.2", *self.common, *self.worker_args,
        ]  # fmt: skip
        child = Child(args, str(self.tmp / f"worker{i + 1}.log")).start()
        if i < len(self.workers):
            self.workers[i] = child
        else:
            self.workers.append(child)
        return child

    def _start_haproxy(self) -> None:
        self.port = free_port()
        ports = [r.port for r in self.replicas]
        ports += [ports[-1]] * (MAX_REPLICAS - len(ports))  # unused lines: repeat the last
        env = {
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            **{f"REPLICA{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)},
        }
        self.haproxy = start_haproxy(HAPROXY_CFG, env, self.tmp / "haproxy.log")

        def up():
            if self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.logs()}")
            return health_status(self.target) == health_pb2.HealthCheckResponse.SERVING

        wait_for(
            up,
            15,
            0.05,
            "HAProxy to answer a health check",
        )

    def replica_serving(self, i: int) -> bool:
        return health_status(f"127.0.0.1:{self.replicas[i].port}") == 1

    def restart_replica(self, i: int) -> None:
        """Graceful: SIGTERM (drain), then start again on the same port."""
        old = self.replicas[i]
        old.stop()
        self.replicas[i] = self._replica(i, old.port).start(wait_listening=True)
        wait_for(lambda: self.replica_serving(i), 15, 0.05, f"replica{i + 1} to serve again")

    def kill_replica(self, i: int) -> None:
        self.replicas[i].kill()

    def start_replica(self, i: int) -> None:
        self.replicas[i] = self._replica(i, self.replicas[i].port).start(wait_listening=True)

    def restart_redis(self, kill: bool = True) -> None:
        """Crash (SIGKILL) or stop Redis, then start it again on the same port and data."""
        assert self.redis is not None, "not the Cluster's own Redis (redis_url= given)"
        if kill:
            self.redis.kill()
        else:
            self.redis.stop()
        self.redis.start()

    def logs(self) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-60:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        stop_haproxy(self.haproxy)
        for child in [*self.workers, *self.replicas]:
            child.stop(timeout=5)
        if self.redis is not None:
            self.redis.close()
