"""Record keeping: consume the inbound streams (a consumer group shared by all workers) and
keep what clients sent per session and per client, in documented keys with expiry."""

from __future__ import annotations

import asyncio
import logging
import time

from broker import Broker, BrokerError
from workers.metrics import RECORDS, STREAM_LAG, STREAM_PENDING

log = logging.getLogger("workers.records")

GROUP = "records"  # one consumer group shared by every worker; `combiner status` shows its lag


class Records:
    def __init__(self, broker: Broker, worker_id: str, claim_after: float = 30.0) -> None:
        self.broker = broker
        self.worker_id = worker_id  # this worker's consumer name in the group
        self.claim_after = claim_after
        self.processed = 0

    async def run(self, stop: asyncio.Event) -> None:
        inbound = self.broker.inbound
        await inbound.ensure_group(GROUP)
        last_claim = last_lag = 0.0
        while not stop.is_set():
            try:
                entries = await inbound.read(GROUP, self.worker_id, block_ms=1000)
                if time.monotonic() - last_claim > self.claim_after / 2:
                    entries += await inbound.claim(GROUP, self.worker_id, self.claim_after)
                    last_claim = time.monotonic()
                if time.monotonic() - last_lag > 5:
                    for kind, info in (await inbound.lag(GROUP)).items():
                        STREAM_LAG.labels(kind).set(info["lag"] or 0)
                        STREAM_PENDING.labels(kind).set(info["pending"] or 0)
                    last_lag = time.monotonic()
                if entries:
                    await self.handle(entries)
            except BrokerError as exc:
                log.warning("records: %s", exc)
                await asyncio.sleep(1)

    async def handle(self, entries) -> None:
        items = [
            (
                fields.get("session_id", ""),
                fields.get("client_id", ""),
                kind,
                entry_id,
                {"entry": entry_id, "kind": kind, **fields},
            )
            for kind, entry_id, fields in entries
        ]
        await self.broker.sessions.add_records(items)
        await self.broker.inbound.ack(GROUP, entries)
        self.processed += len(entries)
        for kind, _, _ in entries:
            RECORDS.labels(kind).inc()
