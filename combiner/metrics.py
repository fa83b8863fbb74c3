"""Prometheus metrics of a replica (prometheus-client; `--metrics-port`). Workers keep
theirs in workers/metrics.py; both land in the default registry this module serves."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter("combiner_rpcs_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "combiner_rpc_seconds",
    "RPC handling time (streams: until the stream ends)",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
OPEN_STREAMS = Gauge("combiner_open_task_streams", "TaskStreams open on this replica")
STALLED_STREAMS = Counter(
    "combiner_stalled_task_streams_total",
    "TaskStreams whose client did not read a message within --stream-write-timeout",
)
REDIS_ROUND_TRIPS = Gauge(
    "combiner_redis_pipelines_total", "Batched Redis round trips (pipelines) sent so far"
)
REDIS_BATCHED_CALLS = Gauge(
    "combiner_redis_batched_calls_total", "Broker calls that went through the batcher so far"
)

MODEL_CACHE_DOWNLOADS = Counter(
    "combiner_model_cache_downloads_total",
    "Downloads by how the model cache served them: hit, miss (read once from the store "
    "into the cache), bypass (larger than half the cache, streamed from the store)",
    ["result"],
)
MODEL_CACHE_BYTES = Gauge("combiner_model_cache_bytes", "Model bytes held in the model cache")


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on host:port (a background thread)."""
    start_http_server(port, addr=host)


def track_batcher(batcher) -> None:
    """Publish the batcher's counters at scrape time."""
    REDIS_ROUND_TRIPS.set_function(lambda: batcher.round_trips)
    REDIS_BATCHED_CALLS.set_function(lambda: batcher.calls)
