"""One worker process: every worker role, side by side. Several may run on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from broker import Broker, BrokerError
from workers.coordinator import Coordinator
from workers.records import Records

log = logging.getLogger("workers")


class Worker:
    def __init__(
        self,
        broker: Broker,
        worker_id: str = "",
        lease_ttl: float = 10.0,
        poll_every: float = 0.5,
        claim_after: float = 30.0,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id or broker.replica_id
        self.coordinator = Coordinator(broker, self.worker_id, lease_ttl, poll_every)
        self.records = Records(broker, self.worker_id, claim_after)
        self.stop_event = asyncio.Event()

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
                await asyncio.wait_for(self.stop_event.wait(), 5)

    async def run(self) -> None:
        log.info("worker %s started", self.worker_id)
        roles = [
            asyncio.create_task(self.coordinator.run(self.stop_event), name="coordinator"),
            asyncio.create_task(self.records.run(self.stop_event), name="records"),
            asyncio.create_task(self.liveness(), name="liveness"),
        ]
        try:
            await self.stop_event.wait()
        finally:
            for task in roles:
                task.cancel()
            await asyncio.gather(*roles, return_exceptions=True)
            log.info("worker %s stopped", self.worker_id)


async def run_worker(broker: Broker, **kwargs) -> None:
    worker = Worker(broker, **kwargs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop_event.set)
    try:
        await worker.run()
    finally:
        await broker.close()
