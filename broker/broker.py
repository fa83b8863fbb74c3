"""The Broker: the one object the front end and the workers hold to reach Redis.

Its public names are its parts (presence, tasks, inbound, models, wakeups, sessions,
replicas, workers, credentials, catalog, files), ``replica_id``, ``pipeline_counters`` and
start/close/ping;
the client, key schema, scripts, batcher and settings are private (tests/test_layout.py
keeps combiner/ and workers/ off them). Tests and benchmarks that must look at Redis itself
(to assert what was or was not written) may read ``_redis``, ``_keys`` and ``_batcher``;
nothing else may.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from redis.exceptions import ResponseError

from broker import durability, schema
from broker.batching import Batcher
from broker.catalog import Catalog
from broker.context import Context, Settings
from broker.credentials import Credentials
from broker.files import FileUploads
from broker.inbound import Inbound
from broker.keys import Keys
from broker.models import ModelStore
from broker.partitions import DEFAULT_CLUSTER
from broker.presence import Presence
from broker.replicas import Replicas
from broker.retry import RetryPolicy
from broker.scripts import Scripts
from broker.sessions import Sessions
from broker.tasks import TaskQueues
from broker.topology import cluster_enabled, describe, is_cluster, make_client, retry_policy
from broker.wakeups import Wakeups
from broker.workers import Workers

log = logging.getLogger("broker")


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PipelineCounters:
    """Read-only view of the batcher's counters (for metrics)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    @property
    def round_trips(self) -> int:
        return self._batcher.round_trips

    @property
    def calls(self) -> int:
        return self._batcher.calls


class Broker:
    def __init__(
        self,
        client,
        settings: Settings | None = None,
        replica_id: str = "",
        model_dir: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._settings = settings or Settings()
        self.replica_id = replica_id or default_replica_id()
        self._keys = Keys(self._settings.prefix)
        self._scripts = Scripts()
        policy = policy or RetryPolicy()
        self._redis = client
        self.cluster = is_cluster(client)
        self._batcher = Batcher(
            client,
            self._scripts,
            policy,
            window=self._settings.batch_window,
            atomic=not self.cluster,
        )
        self._ctx = Context(
            client, self._keys, self._scripts, policy, self._batcher, self._settings, self.cluster
        )
        self.presence = Presence(self._ctx, self.replica_id)
        self.tasks = TaskQueues(self._ctx, self.replica_id, self.presence)
        self.inbound = Inbound(self._ctx, self.presence)
        self.models = ModelStore(self._ctx, model_dir)
        self.wakeups = Wakeups(self._ctx)
        self.sessions = Sessions(self._ctx)
        self.replicas = Replicas(self._ctx, self.replica_id, self.presence)
        self.workers = Workers(self._ctx)
        self.credentials = Credentials(self._ctx)
        self.catalog = Catalog(self._ctx)
        self.files = FileUploads(self._ctx)
        self.pipeline_counters = PipelineCounters(self._batcher)

    async def start(self) -> None:
        """Check the prefix's schema version (writing it on a fresh prefix), then load the
        scripts (bounded retries). Raises SchemaMismatch if the keys under the prefix were
        written by another schema version (broker/schema.py), BrokerUnavailable if Redis
        is down."""
        wanted = self._settings.partitions or (DEFAULT_CLUSTER if self.cluster else 1)
        partitions = await self._ctx.call(schema.claim, self._redis, self._keys, wanted)
        if self._settings.partitions and partitions != self._settings.partitions:
            log.warning(
                "prefix %r has %d partitions (set when it was first used); %d asked for",
                self._keys.prefix,
                partitions,
                self._settings.partitions,
            )
        self._keys.use_partitions(partitions)
        await self._ctx.call(self._scripts.load, self._redis)

    async def close(self) -> None:
        if self._closed:
            return  # closed by its owner and by whoever it was lent to: once is enough
        self._closed = True
        await self.wakeups.stop()
        try:
            async with asyncio.timeout(5):  # not wait_for: see broker/connection.py
                await self._batcher.flush()
        except Exception:
            pass  # Redis gone: those calls fail with BrokerUnavailable by themselves
        await self._redis.aclose()
        pool = getattr(self._redis, "connection_pool", None)  # a RedisCluster has none
        sentinels = getattr(pool, "sentinel_manager", None)
        if sentinels is not None:  # redis+sentinel://: its connections to the Sentinels
            await sentinels.aclose()

    async def ping(self) -> bool:
        return bool(await self._ctx.call(self._redis.ping))

    async def redis_view(self) -> dict:
        """The Redis this broker runs on (topology.describe), its prefix's partitions and
        schema version, and the durability it writes with. Without the right to run INFO
        (an ACL user without +info), the masters are None and the reason is given."""
        view = {
            "partitions": self._keys.partitions,
            "schema": schema.SCHEMA_VERSION,
            "durability": self._settings.durability,
        }
        try:
            view.update(await self._ctx.call(describe, self._redis))
        except ResponseError as exc:
            kind = "cluster" if self.cluster else "standalone or sentinel"
            view.update(topology=kind, masters=None, error=str(exc))
        return view

    _closed = False

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


class Connecting:
    """What connect() returns: await it for a started Broker the caller closes, or use it as
    `async with connect(url) as broker:`, which closes the Broker however the block ends."""

    def __init__(self, url: str, pool_size: int, cluster: bool | None, **kwargs) -> None:
        self._url, self._pool_size, self._cluster, self._kwargs = url, pool_size, cluster, kwargs
        self._broker: Broker | None = None

    async def _open(self) -> Broker:
        kwargs = dict(self._kwargs)
        cluster = self._cluster
        if cluster is None:
            policy = kwargs.get("policy") or retry_policy(self._url)
            cluster = await policy.run(cluster_enabled, self._url)
        kwargs["policy"] = kwargs.get("policy") or retry_policy(self._url, cluster)
        confirm = durability.confirmation(kwargs.get("settings") or Settings())
        broker = Broker(make_client(self._url, self._pool_size, confirm, cluster), **kwargs)
        try:
            with durability.unconfirmed():  # starts with its replicas away (durability.py)
                await broker.start()
            await broker._ctx.call(durability.probe, broker._redis)
        except BaseException:
            await broker.close()  # the pool holds no connection yet, but release it anyway
            raise
        return broker

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> Broker:
        self._broker = await self._open()
        return self._broker

    async def __aexit__(self, *exc_info) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.close()


def connect(
    url: str,
    *,
    settings: Settings | None = None,
    replica_id: str = "",
    model_dir: str | None = None,
    policy: RetryPolicy | None = None,
    pool_size: int = 16,
    cluster: bool | None = None,
) -> Connecting:
    """A Broker on the Redis at url. cluster: None detects a Redis Cluster from the server
    (broker/topology.py), True or False forces the mode."""
    return Connecting(
        url,
        pool_size,
        cluster,
        settings=settings,
        replica_id=replica_id,
        model_dir=model_dir,
        policy=policy,
    )
