"""Real services for tests: a private redis-server process, and the Redis-for-tests choice
(REDIS_URL, else testcontainers when a Docker engine answers, else a private server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import redis
from redis.cluster import RedisCluster

from broker.redis_process import RedisProcess, answers

# SCAN MATCH walks the whole keyspace of the session's shared Redis, ten keys per round trip
# unless told otherwise: at 50,000 keys that was ~1 s per scan, and ~20 ms at this count.
SCAN_COUNT = 10_000


def forget_prefix(url: str, cluster: bool, prefix: str) -> None:
    """Unlink a test's keys when it ends (tests/conftest.py, `prefix`), so that what tests
    leave in the session's Redis does not slow every later scan. Best effort: a test that
    broke its Redis has nothing to clean."""
    client = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=SCAN_COUNT))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
        pipe.execute()
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


async def data_keys(broker, prefix: str = "") -> set[bytes]:
    """Keys under the prefix (the broker's by default) but the schema version and partition
    count that every connect writes (broker/schema.py). SCAN covers every primary of a
    Cluster (redis-py's cluster scan_iter)."""
    prefix = prefix or broker._keys.prefix
    marks = {broker._keys.schema.encode(), broker._keys.partition_count.encode()}
    keys = broker._redis.scan_iter(match=f"{prefix}:*", count=SCAN_COUNT)
    return {k async for k in keys if k not in marks}


async def inbound_entries(broker, kind: str) -> list[tuple[bytes, dict]]:
    """Every partition's inbound stream of one kind (XRANGE), in entry id order."""
    out = []
    for p in broker._keys.all_partitions:
        out += await broker._redis.xrange(broker._keys.inbound(kind, p))
    return sorted(out, key=lambda entry: tuple(map(int, entry[0].split(b"-"))))


async def inbound_length(broker, kind: str) -> int:
    keys = broker._keys
    return sum([await broker._redis.xlen(keys.inbound(kind, p)) for p in keys.all_partitions])


def redis_answers(url: str) -> bool:
    return answers(url)


async def eventually(
    predicate, within: float = 10.0, what: str = "condition", detail=None, every: float = 0.01
):
    """Await an async predicate until it is truthy (and return its value), or fail after
    the deadline with `what` (and `await detail()`, if given). No fixed sleeps in tests."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f": {await detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {within}s waiting for {what}{extra}")
        await asyncio.sleep(every)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll predicate until it returns something truthy, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer(RedisProcess):
    """A private redis-server on a free loopback port, with its own temporary data folder
    (removed by close()); start() again after kill() or stop() reuses port and data."""

    def __init__(self, *, appendonly: bool = False, fsync: str = "always", **kw) -> None:
        """kw: RedisProcess's options, tls, username, password (TLS and ACL tests)."""
        super().__init__(appendonly=appendonly, appendfsync=fsync, **kw)


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def redis_for_tests():
    """Yield a Redis URL: REDIS_URL, a testcontainers Redis, or a private redis-server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()
