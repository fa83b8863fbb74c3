"""What every scenario shares: the private Redis, deployments of replicas and bare
servers (started once, reused, stopped at the end), load generators, and result rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass

import grpc

from bench.client import redis_snapshot
from bench.config import Config
from bench.procs import (
    LOADGEN,
    ROOT,
    ClientProc,
    RedisProc,
    Registry,
    ServerProc,
    bare_args,
    cpu_seconds,
    replica_args,
)
from broker import connect
from broker.context import Settings


@dataclass
class Deployment:
    name: str
    servers: list[ServerProc]
    prefix: str = ""  # '' for a bare server

    @property
    def bare(self) -> bool:
        return not self.prefix

    @property
    def target(self) -> str:
        if len(self.servers) == 1:
            return self.servers[0].address
        return "ipv4:" + ",".join(s.address for s in self.servers)

    @property
    def round_robin(self) -> bool:
        return len(self.servers) > 1

    def label(self) -> str:
        if self.bare:
            return "bare"
        return f"R={len(self.servers)}"


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def row(
    case: str,
    metric: str,
    unit: str,
    value: float | None,
    baseline: str,
    baseline_value: float | None,
    better: str = "higher",
    **extra,
) -> dict:
    """One reported figure with its same-run baseline."""
    return {
        "case": case,
        "metric": metric,
        "unit": unit,
        "value": value,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio(value, baseline_value),
        "better": better,
        **extra,
    }


def cost_rows(case: str, s: dict, base: dict, key: str) -> list[dict]:
    """Server CPU per RPC against the bare server, and Redis round trips per RPC, of one
    unary load run (poll, ingest)."""
    return [
        row(
            case,
            "server CPU/RPC",
            "µs",
            s["cpu_us_per_rpc_servers"],
            "bare grpc.aio",
            base["cpu_us_per_rpc_servers"],
            "lower",
            redis_cpu_us_per_rpc=s["cpu_us_per_rpc_redis"],
        ),
        row(
            case,
            "Redis round trips/RPC",
            "",
            s["redis"]["round_trips_per_rpc"],
            "unbatched (1/RPC)",
            1.0,
            "lower",
            key=f"{key}/round_trips",
        ),
    ]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Bench:
    def __init__(self, cfg: Config, workdir: pathlib.Path, persistence: str = "none") -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.registry = Registry()
        self.redis = RedisProc(self.registry, workdir, persistence)
        self.deployments: dict[str, Deployment] = {}
        self._brokers: dict[str, object] = {}
        self._clients = 0

    async def __aenter__(self) -> Bench:
        await asyncio.to_thread(self.redis.start)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for broker in self._brokers.values():
            with contextlib.suppress(Exception):
                await broker.close()
        self._brokers.clear()
        servers = [s for d in self.deployments.values() for s in d.servers]
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
        self.deployments.clear()
        await asyncio.to_thread(self.redis.stop)
        self.registry.kill_all()

    # --- deployments -------------------------------------------------------------------

    async def deploy(self, *specs: tuple, redis_url: str = "") -> list[Deployment]:
        """Start (or reuse) deployments, all at once: (name, replicas, extra args...);
        replicas=0 means a bare server. redis_url: the replicas use that Redis (a Redis
        Cluster the scenario started, say) instead of the suite's own."""
        new: list[Deployment] = []
        for name, replicas, *extra in specs:
            if name in self.deployments:
                continue
            if replicas == 0:
                servers = [self._server(name, bare_args())]
                dep = Deployment(name, servers)
            else:
                prefix = f"bench-{name}"
                servers = [
                    self._server(
                        f"{name}-{i + 1}",
                        replica_args(
                            redis_url or self.redis.url,
                            prefix,
                            f"{name}-{i + 1}",
                            self.workdir / "state",
                            *extra,
                        ),
                    )
                    for i in range(replicas)
                ]
                dep = Deployment(name, servers, prefix)
            self.deployments[name] = dep
            new.append(dep)
        waits = [asyncio.to_thread(s.wait_listening) for d in new for s in d.servers]
        await asyncio.gather(*waits)
        return [self.deployments[spec[0]] for spec in specs]

    def _server(self, name: str, args: list[str], python: str = sys.executable) -> ServerProc:
        log = self.workdir / f"{name}.log"
        return ServerProc(self.registry, name, args, log, python).start()

    async def deploy_bare(self, name: str, python: str, args: list[str]) -> Deployment:
        """Start (or reuse) a bare server run by another interpreter (another grpcio)."""
        if name not in self.deployments:
            dep = self.deployments[name] = Deployment(name, [self._server(name, args, python)])
            await asyncio.to_thread(dep.servers[0].wait_listening)
        return self.deployments[name]

    async def retire(self, name: str) -> None:
        """Stop a deployment nobody needs any more (frees memory and CPU)."""
        dep = self.deployments.pop(name, None)
        if dep is not None:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in dep.servers))

    # --- Redis -------------------------------------------------------------------------

    async def broker(self, prefix: str):
        if prefix not in self._brokers:
            self._brokers[prefix] = await connect(
                self.redis.url, settings=Settings(prefix=prefix), replica_id="bench"
            )
        return self._brokers[prefix]

    async def clear(self, prefix: str) -> int:
        """Delete every key under a prefix (between scenarios)."""
        broker = await self.broker("bench")
        client = broker._redis
        n = 0
        batch = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += await client.unlink(*batch)
                batch = []
        if batch:
            n += await client.unlink(*batch)
        return n

    # --- load generators ---------------------------------------------------------------

    async def client(self, spec: dict, command=LOADGEN) -> ClientProc:
        self._clients += 1
        log = self.workdir / f"client-{self._clients:03d}-{spec['kind']}.log"
        return await ClientProc(self.registry, spec, log, command).start()

    async def unary(self, dep: Deployment, method: str, **extra) -> dict:
        """One closed-loop run of a unary RPC; returns the raw result."""
        return await self.timed(self.unary_spec(dep, method, **extra), dep)

    def unary_spec(self, dep: Deployment, method: str, **extra) -> dict:
        """The load generator's spec for a closed-loop run of a unary RPC."""
        cfg = self.cfg
        return {
            "kind": "unary",
            "target": dep.target,
            "round_robin": dep.round_robin,
            "method": method,
            "clients": cfg.clients,
            "channels": cfg.channels,
            "warmup": cfg.warmup,
            "duration": cfg.duration,
            "redis_url": "" if dep.bare else self.redis.url,
            **extra,
        }

    async def timed(self, spec: dict, dep: Deployment | None = None, command=LOADGEN) -> dict:
        """Start a load generator, wait until it is connected, start its clock. With a
        deployment, also measure the CPU time its servers and Redis use in the window, and
        (for a load generator that cannot: no ``redis_url`` in its spec) Redis INFO at the
        window's edges."""
        cfg = self.cfg
        proc = await self.client(spec, command)
        cpu = None
        warmup, duration = spec.get("warmup", cfg.warmup), spec.get("duration", cfg.duration)
        try:
            await proc.event("ready", within=60)
            t0 = time.time() + 0.05
            await proc.send(cmd="go", t0=t0)
            if dep is not None:
                snap = not dep.bare and not spec.get("redis_url")
                cpu = asyncio.create_task(self._cpu(dep, t0 + warmup, duration, redis_info=snap))
            result = await proc.result(within=warmup + duration + 120)
            if cpu is not None:
                if snap:
                    result["cpu"], result["redis"] = await cpu
                else:
                    result["cpu"] = await cpu
            return result
        finally:
            if cpu is not None and not cpu.done():
                cpu.cancel()
            await proc.stop()

    async def _cpu(
        self,
        dep: Deployment,
        start: float,
        duration: float,
        loadgen: list[int] = (),
        redis_info: bool = False,
    ) -> dict | tuple[dict, dict]:
        """CPU seconds of the servers (and Redis, and loadgen PIDs) over the window. With
        redis_info, (cpu, Redis INFO snapshots at the window's edges), which
        bench.scenarios.unary.round_trips reads."""
        pids = {"servers": [s.pid for s in dep.servers], "redis": [self.redis.process.pid]}
        if dep.bare:
            pids.pop("redis")
        if loadgen:
            pids["loadgen"] = list(loadgen)
        client = (await self.broker("bench"))._redis if redis_info else None

        def read() -> dict:
            return {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}

        await asyncio.sleep(max(0.0, start - time.time()))
        before = read()
        snaps = {"before": await redis_snapshot(client)} if client else {}
        await asyncio.sleep(max(0.0, start + duration - time.time()))
        after = read()
        if client:
            snaps["after"] = await redis_snapshot(client)
        cpu = {f"{k}_s": after[k] - before[k] for k in before}
        return (cpu, snaps) if redis_info else cpu

    async def count_streams(self, dep: Deployment) -> int:
        """Open TaskStreams on a deployment: the bare server's count, or the replicas'
        stream leases in Redis."""
        if dep.bare:
            async with grpc.aio.insecure_channel(dep.target) as chan:
                call = chan.unary_unary("/bench.Control/Count")
                return int(await call(b"", timeout=5))
        broker = await self.broker(dep.prefix)
        return sum(
            [
                await broker._redis.zcard(broker._keys.streams(p))
                for p in broker._keys.all_partitions
            ]
        )

    async def release(self, dep: Deployment) -> int:
        async with grpc.aio.insecure_channel(dep.target) as chan:
            call = chan.unary_unary("/bench.Control/Release")
            return int(await call(b"", timeout=10))

    async def wait_streams(self, dep: Deployment, n: int, within: float = 120.0) -> float:
        """Wait until n TaskStreams are open; returns how long it took."""
        t = time.monotonic()
        while (got := await self.count_streams(dep)) < n:
            if time.monotonic() - t > within:
                raise TimeoutError(f"only {got} of {n} TaskStreams open on {dep.name}")
            await asyncio.sleep(0.05)
        return time.monotonic() - t


async def run_child(
    bench: Bench, args: list[str], name: str, within: float, env: dict | None = None
) -> dict:
    """Run ``python ARGS`` (registered, stopped on errors); returns its last JSON line."""
    log = open(bench.workdir / f"{name}.log", "ab")  # noqa: ASYNC230 (a local log file)
    proc = bench.registry.add(
        await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    )
    log.close()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = (bench.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{tail}")
    return json.loads(out.decode().strip().splitlines()[-1])
