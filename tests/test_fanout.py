"""The wake-up fan-out (broker/wakeups.py, docs/architecture.md contract 4): a replica holds ONE
pub/sub connection and a bounded command pool whatever the number of open TaskStreams, and
it notices a dead or silently dead pub/sub connection within seconds and subscribes again
without losing a task."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from broker.embedded import free_port
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import Stubs, meta, next_task, replica_at
from tests.services import RedisServer, eventually

pytestmark = pytest.mark.topologies

POOL_SIZE = 16  # broker.make_client's default: what a `combiner serve` replica gets
DETECT_WITHIN = 5.0  # seconds: a dead pub/sub connection must be noticed and replaced


def open_stream(stubs: Stubs, client_id: str):
    return stubs.combiner.TaskStream(
        pb.ClientAvailableMessage(client_id=client_id), metadata=meta(client_id)
    )


async def streams_ready(replica, n: int) -> None:
    async def ready():
        return len(replica.combiner.open_streams) >= n and replica.broker.wakeups.connected.is_set()

    await eventually(ready, 30, f"{n} open streams")


@pytest.fixture
async def private_redis():
    """A Redis of our own, so CLIENT LIST shows only this test's connections."""
    server = RedisServer().start()
    observer = aioredis.Redis.from_url(server.url)
    yield server, observer
    await observer.aclose()
    server.close()


async def connections(observer) -> tuple[int, int]:
    """(normal, pubsub) connections to the server, without the observer's own."""
    me = await observer.client_id()
    normal = [c for c in await observer.client_list(_type="normal") if int(c["id"]) != me]
    pubsub = await observer.client_list(_type="pubsub")
    return len(normal), len(pubsub)


async def test_redis_connections_stay_constant_from_10_to_300_streams(private_redis, prefix):
    server, observer = private_redis
    async with replica_at(server.url, prefix, POOL_SIZE) as (replica, stubs):
        calls = []
        seen = []
        for target in (10, 300):
            calls += [open_stream(stubs, f"c{i}") for i in range(len(calls), target)]
            await streams_ready(replica, target)
            # every stream is served: one task each, through the single subscription
            pushed = {
                f"c{i}": await replica.broker.tasks.push(f"c{i}", "Custom_x", model_id="m")
                for i in range(target)
            }
            got = await asyncio.gather(*(next_task(call) for call in calls))
            assert [t.correlation_id for t in got] == [pushed[f"c{i}"] for i in range(target)]
            normal, pubsub = await connections(observer)
            seen.append((target, normal, pubsub))
            assert pubsub == 1, seen  # one pub/sub connection multiplexes every stream
            # the pub/sub connection is drawn from the same bounded pool
            assert normal + pubsub <= POOL_SIZE, seen
        assert replica.broker.wakeups.resubscribes == 1
        for call in calls:
            call.cancel()


async def test_killed_pubsub_connection_is_replaced_within_5s(private_redis, prefix):
    server, observer = private_redis
    async with replica_at(server.url, prefix, POOL_SIZE) as (replica, stubs):
        call = open_stream(stubs, "c1")
        await streams_ready(replica, 1)
        first = await replica.broker.tasks.push("c1", "Custom_x")
        assert (await next_task(call)).correlation_id == first
        before = replica.broker.wakeups.resubscribes

        assert await observer.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        corr = await replica.broker.tasks.push("c1", "Custom_x")  # its wake-up may be lost

        async def resubscribed():
            return replica.broker.wakeups.resubscribes > before

        await eventually(resubscribed, DETECT_WITHIN, "a new subscription")
        assert (await next_task(call)).correlation_id == corr
        assert (await connections(observer))[1] == 1
        # and wake-ups flow on the new connection
        later = await replica.broker.tasks.push("c1", "Custom_x")
        assert (await next_task(call)).correlation_id == later
        record = await replica.broker.tasks.show(later)
        assert (record["state"], record["attempts"]) == ("delivered", "1")
        call.cancel()


class FreezableProxy:
    """A TCP proxy between a replica and Redis. ``freeze_pubsub()`` turns the connection
    that carried SUBSCRIBE silent in both directions without closing it (bytes are read
    and dropped, like a black-holed TCP path), which neither side can tell from an idle
    connection. New connections are forwarded normally (the path was re-routed)."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.host, self.port = parsed.hostname, parsed.port or 6379
        self.db = parsed.path or "/0"
        self.listen_port = free_port()
        self.links: list[dict] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listen_port}{self.db}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def _accept(self, down_r, down_w) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        link = {"pubsub": False, "frozen": False, "writers": (down_w, up_w)}
        self.links.append(link)
        for src, dst, upward in ((down_r, up_w, True), (up_r, down_w, False)):
            task = asyncio.create_task(self._pump(link, src, dst, upward))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, link, src, dst, upward: bool) -> None:
        try:
            while data := await src.read(65536):
                if upward and b"SUBSCRIBE" in data.upper():
                    link["pubsub"] = True
                if link["frozen"]:
                    continue  # silently dropped
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in link["writers"]:
                w.close()

    def freeze_pubsub(self) -> int:
        frozen = 0
        for link in self.links:
            if link["pubsub"] and not link["frozen"]:
                link["frozen"] = True
                frozen += 1
        return frozen

    def live_pubsub(self) -> int:
        return sum(1 for link in self.links if link["pubsub"] and not link["frozen"])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            for w in link["writers"]:
                w.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_silently_dead_pubsub_connection_is_detected_within_5s(
    redis_url, broker, prefix, topology
):
    if topology == "cluster":
        pytest.skip(
            "a cluster client reaches every node at the address it announces, not via a proxy"
        )
    proxy = FreezableProxy(redis_url)
    await proxy.start()
    try:
        async with replica_at(proxy.url, prefix, POOL_SIZE) as (replica, stubs):
            call = open_stream(stubs, "c1")
            await streams_ready(replica, 1)
            first = await broker.tasks.push("c1", "Custom_x")
            assert (await next_task(call)).correlation_id == first
            before = replica.broker.wakeups.resubscribes

            assert proxy.freeze_pubsub() == 1  # the socket stays open, nothing flows
            frozen_at = time.monotonic()
            # pushed while the replica cannot hear its wake-up: recovered after resubscribing
            during = await broker.tasks.push("c1", "Custom_x")

            async def resubscribed():
                return replica.broker.wakeups.resubscribes > before and proxy.live_pubsub()

            await eventually(resubscribed, DETECT_WITHIN, "the silent connection to be replaced")
            detected = time.monotonic() - frozen_at
            assert (await next_task(call)).correlation_id == during, detected
            # a task pushed now reaches the stream through the new subscription
            corr = await broker.tasks.push("c1", "Custom_x")
            assert (await next_task(call)).correlation_id == corr, detected
            for c in (during, corr):
                record = await broker.tasks.show(c)
                assert (record["state"], record["attempts"]) == ("delivered", "1")
            call.cancel()
    finally:
        await proxy.close()
