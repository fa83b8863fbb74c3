"""What every broker part shares: the client, the key schema, scripts, retries, batching."""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.batching import Batcher
from broker.keys import Keys
from broker.retry import RetryPolicy
from broker.scripts import Scripts


@dataclass
class Settings:
    prefix: str = "so"
    stream_maxlen: int = 100_000  # MAXLEN ~ for every inbound stream
    task_ttl: int = 7 * 24 * 3600  # task records and their id lookup expire after this
    upload_ttl: int = 3600  # an unfinished upload (and its 'uploading' marker) expires
    offline_after: float = 30.0  # seconds without contact before a client counts as offline
    presence_every: float = 1.0  # a replica rewrites a client's last_seen at most this often
    batch_window: float = 0.002  # seconds a batch waits for more callers (batching.py)
    # "local": acknowledged once the master has it; "replicated": once durability_replicas
    # replicas have it, waiting at most durability_timeout seconds (broker/durability.py)
    durability: str = "local"
    durability_replicas: int = 1
    durability_timeout: float = 1.0
    # Partitions of the per-client keys (broker/partitions.py); 0: 1 on a standalone Redis
    # or Sentinel, partitions.DEFAULT_CLUSTER on a Cluster. Only a fresh prefix takes it.
    partitions: int = 0


@dataclass
class Context:
    redis: object
    keys: Keys
    scripts: Scripts
    policy: RetryPolicy
    batcher: Batcher
    settings: Settings
    cluster: bool = False  # a Redis Cluster: no MULTI across slots (broker/topology.py)

    def pipeline(self, atomic: bool = True):
        """A pipeline; MULTI/EXEC (all or nothing) where the topology allows it. On a
        Cluster a transaction cannot span slots, so there the commands go as a plain
        pipeline: each is applied or not on its own, and callers keep them idempotent."""
        return self.redis.pipeline(transaction=atomic and not self.cluster)

    async def call(self, fn, *args, **kwargs):
        """One direct Redis call (off the hot paths) with the bounded retries."""
        return await self.policy.run(fn, *args, **kwargs)


def now() -> float:
    return time.time()


def now_str() -> str:
    return f"{time.time():.6f}"


def text(value) -> str:
    """Redis replies are bytes; scalar fields are UTF-8 strings."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_map(raw: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}
