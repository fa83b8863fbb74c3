"""Pub/sub wake-ups for TaskStreams: one connection per replica, whatever the client count.

A replica SUBSCRIBEs once to ``P:wake`` and routes each message (the encoded ids of the
clients whose queues got tasks, one per line: one message per push.lua call, so a round's
fan-out to 5000 clients is 25 messages) to the streams it holds for those clients.
Pub/sub is fire-and-forget, so it only ever says "look at the queue": the queue in Redis
is the truth. After every (re)subscribe all local streams are woken to read their queues
again, so a message lost while the connection was down loses no task.

redis-py's asyncio pub/sub does not reconnect by itself and a silently dead TCP connection
can look idle forever, so the connection is probed with PING every second and replaced when
no PONG came back within ``probe_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.context import Context, text

log = logging.getLogger("broker.wakeups")


class Wakeups:
    def __init__(self, ctx: Context, probe_every: float = 1.0, probe_timeout: float = 3.0) -> None:
        self._ctx = ctx
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._probe_every = probe_every
        self._probe_timeout = probe_timeout
        self._task: asyncio.Task | None = None
        self._pubsub = None
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
        pubsub, self._pubsub = self._pubsub, None
        self.connected.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()

    async def _run(self) -> None:
        channel = self._ctx.keys.wake
        while True:
            try:
                self._pubsub = self._ctx.redis.pubsub()
                await self._pubsub.subscribe(channel)
                self.resubscribes += 1
                self.connected.set()
                log.info("wake-up subscription %s (#%d)", channel, self.resubscribes)
                self.wake_all()  # recover whatever was pushed while we were not listening
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wake-up connection lost (%s); reconnecting", exc)
            await self._close()
            self.wake_all()
            await asyncio.sleep(0.2)

    async def _listen(self) -> None:
        pubsub = self._pubsub
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
            if kind == "message":
                for client_id in self._ctx.keys.woken_clients(msg["data"]):
                    self._wake(client_id)
            elif kind == "pong":
                last_pong = time.monotonic()
