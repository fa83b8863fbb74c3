"""One worker process: every worker role, side by side. Several may run on one Redis.

Each role survives Redis trouble and Redis losing its keys (FLUSHDB, a restart without
persistence: consumer groups are recreated on NOGROUP / UNBLOCKED). A role that stops anyway
(an unexpected exception escapes it) stops the worker, which exits non-zero so that its
supervisor restarts it; the worker's record (``combiner status``) says which role stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from broker import Broker, BrokerError
from workers.coordinator import Coordinator
from workers.records import Records
from workers.server_functions import SERVER_FUNCTIONS_ROLE, Limits

log = logging.getLogger("workers")

ROLES = ("coordinator", "records", "liveness", "upkeep")


class RoleStopped(Exception):
    """A worker role ended while the worker was not being stopped."""


class Worker:
    def __init__(
        self,
        broker: Broker,
        worker_id: str = "",
        lease_ttl: float = 10.0,
        poll_every: float = 0.5,
        claim_after: float = 30.0,
        allow_server_functions: bool = False,
        server_functions_timeout: float = 60.0,
        server_functions_memory_mb: int = 2048,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id or broker.replica_id
        self.lease_ttl = lease_ttl
        limits = None
        if allow_server_functions:
            limits = Limits(server_functions_timeout, server_functions_memory_mb)
        self.coordinator = Coordinator(broker, self.worker_id, lease_ttl, poll_every, limits)
        self.records = Records(broker, self.worker_id, claim_after)
        self.stop_event = asyncio.Event()
        self.started = time.time()
        self.health: dict[str, str] = dict.fromkeys(ROLES, "ok")
        if allow_server_functions:
            self.health[SERVER_FUNCTIONS_ROLE] = "allowed"

    async def liveness(self) -> None:
        """Flip clients silent for longer than offline_after to offline (for status views;
        selection and round collection read last-seen times directly)."""
        while not self.stop_event.is_set():
            try:
                flipped = await self.broker.presence.mark_offline()
                if flipped:
                    log.info("%d client(s) went offline", flipped)
            except BrokerError as exc:
                log.warning("liveness: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.stop_event.wait()

    async def upkeep(self) -> None:
        """Keep this worker's record (roles' health) fresh for `combiner status`."""
        lease = max(3.0, self.lease_ttl)
        while not self.stop_event.is_set():
            await self.register(lease)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(lease / 3):
                    await self.stop_event.wait()

    async def register(self, lease: float) -> None:
        try:
            await self.broker.workers.register(self.worker_id, self.started, self.health, lease)
        except BrokerError as exc:
            log.warning("upkeep: %s", exc)

    async def run(self) -> None:
        """Run every role until stop_event is set; RoleStopped if a role ends before."""
        log.info("worker %s started", self.worker_id)
        roles = {
            asyncio.create_task(self.coordinator.run(self.stop_event), name="coordinator"): "",
            asyncio.create_task(self.records.run(self.stop_event), name="records"): "",
            asyncio.create_task(self.liveness(), name="liveness"): "",
            asyncio.create_task(self.upkeep(), name="upkeep"): "",
        }
        stopping = asyncio.create_task(self.stop_event.wait())
        failed: list[str] = []
        try:
            await asyncio.wait([*roles, stopping], return_when=asyncio.FIRST_COMPLETED)
            for task in roles:
                if task.done() and not self.stop_event.is_set():
                    exc = None if task.cancelled() else task.exception()
                    why = f"{type(exc).__name__}: {exc}" if exc else "ended"
                    self.health[task.get_name()] = f"stopped: {why}"
                    failed.append(task.get_name())
                    log.error(
                        "role %s stopped (%s); stopping the worker",
                        task.get_name(),
                        why,
                        exc_info=exc,
                    )
        finally:
            self.stop_event.set()
            stopping.cancel()
            for task in roles:
                task.cancel()
            await asyncio.gather(*roles, stopping, return_exceptions=True)
        if failed:
            await self.register(max(3.0, self.lease_ttl))  # shows until its lease ends
            raise RoleStopped(", ".join(failed))
        with contextlib.suppress(BrokerError):
            await self.broker.workers.deregister(self.worker_id)
        log.info("worker %s stopped", self.worker_id)


async def run_worker(broker: Broker, **kwargs) -> None:
    """Run a worker until SIGTERM/SIGINT; exit status 1 if one of its roles stopped."""
    worker = Worker(broker, **kwargs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop_event.set)
    try:
        await worker.run()
    except RoleStopped as exc:
        log.error("worker %s exits: role(s) stopped: %s", worker.worker_id, exc)
        raise SystemExit(1) from exc
    finally:
        await broker.close()
