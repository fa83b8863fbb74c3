"""Prometheus metrics of a worker (served by `combiner worker --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STREAM_LAG = Gauge(
    "combiner_stream_lag_entries", "Entries the records consumer group has not read yet", ["stream"]
)
STREAM_PENDING = Gauge(
    "combiner_stream_pending_entries", "Entries read but not acknowledged", ["stream"]
)
RECORDS = Counter("combiner_records_total", "Stream entries kept as records", ["stream"])
ROUND_SECONDS = Histogram(
    "combiner_round_seconds",
    "Duration of finished training rounds",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
ROUNDS = Counter("combiner_rounds_total", "Rounds finished, by outcome", ["status"])
