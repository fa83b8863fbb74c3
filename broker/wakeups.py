"""Pub/sub wake-ups for TaskStreams: one connection per replica (one per primary on a
Cluster), whatever the client count.

A replica subscribes once to every partition's ``P:{T}:wake`` and routes each message (the
encoded ids of the clients whose queues got tasks, one per line: one message per push.lua
call, so a round's fan-out to 5000 clients is 25 messages) to the streams it holds for
those clients.
Pub/sub is fire-and-forget, so it only ever says "look at the queue": the queue in Redis
is the truth. After every (re)subscribe all local streams are woken to read their queues
again, so a message lost while the connection was down loses no task.

redis-py's asyncio pub/sub does not reconnect by itself and a silently dead TCP connection
can look idle forever, so the connection is probed with PING every second and replaced when
no PONG came back within ``probe_timeout`` seconds.

With N partitions there is one channel per partition. On a standalone Redis or Sentinel
they all go on that one connection. On a Redis Cluster they are shard channels (SSUBSCRIBE:
classic pub/sub stays pinned to whichever node it met first), one connection to each primary
that owns some, each probed the same way. Redis ends a shard channel's subscription
(``sunsubscribe``) when its slot moves to another node (a reshard) and a failover drops the
connection: either way every connection is replaced after re-reading the slot map, and all
streams are woken, since messages published meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool

from broker.context import Context, text

log = logging.getLogger("broker.wakeups")


class Wakeups:
    def __init__(self, ctx: Context, probe_every: float = 1.0, probe_timeout: float = 3.0) -> None:
        self._ctx = ctx
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._probe_every = probe_every
        self._probe_timeout = probe_timeout
        self._task: asyncio.Task | None = None
        self._pubsubs: list = []
        self._node_clients: list[aioredis.Redis] = []
        self.resubscribes = 0  # how often the connection was (re)established
        self.connected = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    def register(self, client_id: str) -> asyncio.Event:
        """An event set whenever client_id's queue may have new tasks (set at once, too)."""
        event = asyncio.Event()
        event.set()
        self._waiters.setdefault(client_id, set()).add(event)
        return event

    def unregister(self, client_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(client_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[client_id]

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def _wake(self, client_id: str) -> None:
        for event in self._waiters.get(client_id, ()):
            event.set()

    async def _close(self) -> None:
        pubsubs, self._pubsubs = self._pubsubs, []
        clients, self._node_clients = self._node_clients, []
        self.connected.clear()
        for closable in [*pubsubs, *clients]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await closable.aclose()

    async def _subscribe(self, channels: list[str]) -> None:
        """Open the subscriptions: one pub/sub connection, or one per Cluster primary."""
        if not self._ctx.cluster:
            pubsub = self._ctx.redis.pubsub()
            self._pubsubs.append(pubsub)
            await pubsub.subscribe(*channels)
            return
        cluster = self._ctx.redis
        await cluster.nodes_manager.initialize()  # the slot map as it is now
        by_node: dict[str, tuple] = {}
        for channel in channels:
            node = cluster.get_node_from_key(channel)
            by_node.setdefault(node.name, (node, []))[1].append(channel)
        for node, owned in by_node.values():
            pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            client = aioredis.Redis(connection_pool=pool)
            self._node_clients.append(client)
            pubsub = client.pubsub()
            self._pubsubs.append(pubsub)
            for channel in owned:  # one SSUBSCRIBE names channels of one slot only
                await pubsub.ssubscribe(channel)

    async def _run(self) -> None:
        keys = self._ctx.keys
        channels = [keys.wake(p) for p in keys.all_partitions]
        while True:
            try:
                await self._subscribe(channels)
                self.resubscribes += 1
                self.connected.set()
                log.info(
                    "wake-up subscription %s (%d channels on %d connections, #%d)",
                    channels[0],
                    len(channels),
                    len(self._pubsubs),
                    self.resubscribes,
                )
                self.wake_all()  # recover whatever was pushed while we were not listening
                listeners = [asyncio.create_task(self._listen(p)) for p in self._pubsubs]
                try:
                    done, _ = await asyncio.wait(listeners, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in listeners:
                        task.cancel()
                    await asyncio.gather(*listeners, return_exceptions=True)
                for task in done:
                    task.result()  # the listener's error
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wake-up connection lost (%s); reconnecting", exc)
            await self._close()
            self.wake_all()
            await asyncio.sleep(0.2)

    async def _listen(self, pubsub) -> None:
        last_pong = last_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_ping >= self._probe_every:
                await pubsub.ping()
                last_ping = now
            if now - last_pong > self._probe_timeout:
                raise ConnectionError(
                    f"no PONG on the pub/sub connection for {now - last_pong:.1f}s"
                )
            msg = await pubsub.get_message(timeout=self._probe_every / 2)
            if msg is None:
                continue
            kind = text(msg.get("type"))
            if kind in ("message", "smessage"):
                for client_id in self._ctx.keys.woken_clients(msg["data"]):
                    self._wake(client_id)
            elif kind == "pong":
                last_pong = time.monotonic()
            elif kind == "sunsubscribe":  # the channel's slot moved to another node
                raise ConnectionError(f"shard channel {text(msg.get('channel'))} moved")
