"""Record keeping: consume the inbound streams (a consumer group shared by all workers) and
keep what clients sent per session and per client, in documented keys with expiry."""

from __future__ import annotations

import asyncio
import logging
import time

from broker import Broker, BrokerError
from broker.consumers import StreamGroup
from broker.keys import INBOUND_KINDS
from workers.metrics import RECORDS, STREAM_LAG, STREAM_PENDING

log = logging.getLogger("workers.records")


class Records:
    def __init__(self, broker: Broker, worker_id: str, claim_after: float = 30.0) -> None:
        self.broker = broker
        self.group = StreamGroup(broker.ctx, "records", worker_id, INBOUND_KINDS)
        self.claim_after = claim_after
        self.processed = 0

    async def run(self, stop: asyncio.Event) -> None:
        await self.broker.ctx.call(self.group.ensure)
        last_claim = last_lag = 0.0
        while not stop.is_set():
            try:
                entries = await self.group.read(block_ms=1000)
                if time.monotonic() - last_claim > self.claim_after / 2:
                    entries += await self.group.claim(self.claim_after)
                    last_claim = time.monotonic()
                if time.monotonic() - last_lag > 5:
                    for kind, info in (await self.group.lag()).items():
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
        await self.broker.sessions.add_records(items, self.broker.settings.task_ttl)
        await self.group.ack(entries)
        self.processed += len(entries)
        for kind, _, _ in entries:
            RECORDS.labels(kind).inc()
