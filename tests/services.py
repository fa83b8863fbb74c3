"""Real services for tests: a private redis-server process, and the Redis-for-tests choice
(REDIS_URL, else testcontainers when a Docker engine answers, else a private server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from broker.redis_process import RedisProcess, answers


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
