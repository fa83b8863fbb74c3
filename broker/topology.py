"""Which Redis a URL names, and the one client the broker uses for it (docs/redis.md,
"Topologies").

* ``redis://[user:password@]host:port/db`` or ``rediss://...``: one server (standalone).
* ``redis+sentinel://[user:password@]host:port[,host:port...]/MASTER[/db]``: the master that
  these Sentinels name MASTER, followed across failovers (high availability). The login is
  the data nodes'; Sentinels are asked without one (``?sentinel_password=`` if they need
  one). ``rediss+sentinel://`` reaches the data nodes over TLS (``ssl_ca_certs=`` etc. as
  for ``rediss://``).

* a ``redis://`` or ``rediss://`` URL naming any node of a Redis Cluster: the whole cluster
  (sharding). ``redis://[login@]HOST:PORT,HOST:PORT.../`` names several nodes: the first that
  answers is asked for the slot map, so a process can start while one of them is down.
  Detected when the broker connects (``INFO cluster`` says ``cluster_enabled:1``),
  or forced with ``--redis-cluster``. The client is redis-py's RedisCluster, which follows
  MOVED/ASK redirections (a reshard) and re-reads the slot map after a failover; its
  per-node pools do not block, so they are larger (CLUSTER_POOL_FACTOR) and running out is
  retried like any transient error.

Standalone and Sentinel get the same client: a small blocking pool (callers beyond its size
wait for a connection rather than fail) of connections that pack commands with hiredis and
never lose a cancellation (broker/connection.py). Retries are the broker's own
(broker/retry.py), so redis-py's are off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff

from broker.connection import with_hiredis_packing
from broker.durability import Confirmation, confirm_cluster, master_infos, redis_class
from broker.errors import Misconfigured
from broker.retry import RetryPolicy

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# A call's deadline on Sentinel or Cluster: a failover (down-after-milliseconds or
# cluster-node-timeout, then ~2 s for the election) must fit in it.
SENTINEL_CALL_SECONDS = 10.0
# A cluster client's pool per node does not block (MaxConnectionsError at once): room for
# bursts of direct calls beside the batcher's pipelines.
CLUSTER_POOL_FACTOR = 4

# Each call's deadline (RetryPolicy.max_seconds) decides when Redis is too slow; the socket
# and pool timeouts sit just above it as a backstop for anything outside a call, and
# blocking reads (XREADGROUP BLOCK 1 s) stay below both.
CONNECTION = {
    "socket_timeout": 5,
    "socket_connect_timeout": 3,
    "socket_keepalive": True,
    "socket_read_size": 1024 * 1024,  # model chunks are 1 MiB: read them in one go
    "retry": Retry(NoBackoff(), 0),
    "health_check_interval": 0,
}


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    tls: bool = False
    login: dict = field(default_factory=dict)  # username, password of the data nodes
    options: dict = field(default_factory=dict)  # ssl_* and the like, for the data nodes
    sentinel_password: str = ""


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel(url: str) -> SentinelTarget:
    """A redis+sentinel:// URL, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{url!r}: each Sentinel is host:port, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{url!r}: the path is /MASTER_NAME[/db]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"{url!r}: the database is a number, got {path[1]!r}")
    login = {}
    if parts.username:
        login["username"] = unquote(parts.username)
    if parts.password:
        login["password"] = unquote(parts.password)
    options = dict(parse_qsl(parts.query))
    return SentinelTarget(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        tls=parts.scheme.lower().startswith("rediss"),
        login=login,
        sentinel_password=options.pop("sentinel_password", ""),
        options=options,
    )


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master-following pool, blocking like the standalone one (its own is not)."""


class FollowMaster:
    """A mixin for Sentinel-managed connections: every (re)connect asks the Sentinels where
    the master is first. redis-py reconnects a dropped connection inside a command to the
    address it had (redis-py issue #3874: after a failover, to the old master, until the
    socket timeout), so without this a retried call stalled for seconds and then failed."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect=True):
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        return await super().connect_check_health(check_health, retry_socket_connect)


def is_cluster(client) -> bool:
    """Is this broker client a Redis Cluster client?"""
    return isinstance(client, RedisCluster)


def node_urls(url: str) -> list[str]:
    """One URL per host of a ``redis://[login@]HOST:PORT,HOST:PORT.../...`` URL (a Cluster's
    startup nodes), each with the same login, path and query; a one-host URL as it is."""
    scheme, sep, rest = url.partition("://")
    # the authority ends at the first '/' or '?' (a login has them percent-encoded)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    login, at, hosts = rest[:cut].rpartition("@")
    tail = rest[cut:]
    if not sep or "," not in hosts:
        return [url]
    return [f"{scheme}://{login}{at}{host.strip()}{tail}" for host in hosts.split(",")]


async def cluster_enabled(url: str) -> bool:
    """Does the server at url run in cluster mode? (Sentinel URLs: no.) With several hosts,
    the first that answers says; all of them must be nodes of a Cluster."""
    if is_sentinel(url):
        return False
    urls = node_urls(url)
    error: Exception | None = None
    for node in urls:
        probe = aioredis.Redis.from_url(node, socket_timeout=3, socket_connect_timeout=3)
        try:
            info = await probe.info("cluster")
        except rex.ResponseError:  # a server without INFO cluster (or an ACL without it)
            info = {}
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            error = exc
            continue
        finally:
            await probe.aclose()
        enabled = int(info.get("cluster_enabled", 0)) == 1
        if not enabled and len(urls) > 1:
            raise Misconfigured(f"{url!r} names several hosts, but {node!r} is not in a Cluster")
        return enabled
    raise error


async def describe(client) -> dict:
    """What a broker client runs on, for the status view: the topology, and each master
    (each Cluster primary) with its role, version and connected replicas. Raises
    ResponseError if the Redis user may not run INFO."""
    kind = "cluster" if is_cluster(client) else "standalone"
    if isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool):
        kind = "sentinel"
    infos = await master_infos(client, "server", "replication")
    masters = [
        {
            "address": address,
            "role": info.get("role", "?"),
            "version": str(info.get("redis_version", "?")),
            "replicas": int(info.get("connected_slaves", 0)),
        }
        for address, info in sorted(infos.items())
    ]
    return {"topology": kind, "masters": masters}


def retry_policy(url: str, cluster: bool = False) -> RetryPolicy:
    """The retries a URL's topology needs. A Sentinel failover leaves no master to talk to
    for ~2 s after Sentinels see it down (down-after-milliseconds, then the election and the
    promotion); calls wait that out instead of failing (BrokerUnavailable), so the deadline
    per call is longer there and bounded by time, not by a count of fast refusals."""
    if is_sentinel(url) or cluster:
        return RetryPolicy(attempts=100, max_seconds=SENTINEL_CALL_SECONDS)
    return RetryPolicy()


def make_client(
    url: str, pool_size: int = 16, confirmation: Confirmation | None = None, cluster: bool = False
) -> aioredis.Redis | RedisCluster:
    """The broker's Redis client for url (standalone, Sentinel or Cluster; see the module
    doc). With a confirmation, every write waits for replicas (broker/durability.py,
    replicated mode)."""
    if cluster:
        if is_sentinel(url):
            raise Misconfigured("a redis+sentinel:// URL names a Sentinel master, not a Cluster")
        first, *others = node_urls(url)
        startup = [ClusterNode(p.hostname, p.port) for p in map(urlsplit, others)]
        client = RedisCluster.from_url(
            first,
            startup_nodes=startup or None,
            max_connections=pool_size * CLUSTER_POOL_FACTOR,
            **CONNECTION,
        )
        # Every node's connections are built from this one dict (and the startup nodes
        # already were): ours, so that no cancellation is lost here either.
        kwargs = client.connection_kwargs
        kwargs["connection_class"] = with_hiredis_packing(kwargs["connection_class"])
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = kwargs["connection_class"]
        return confirm_cluster(client, confirmation)
    if is_sentinel(url):
        return _sentinel_client(parse_sentinel(url), pool_size, confirmation)
    if len(node_urls(url)) > 1:
        raise Misconfigured(f"{url!r} names several hosts: that is for a Redis Cluster only")
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=5, **CONNECTION
    )
    pool.connection_class = with_hiredis_packing(pool.connection_class)
    return redis_class(confirmation)(connection_pool=pool)


def _sentinel_client(
    target: SentinelTarget, pool_size: int, confirmation: Confirmation | None
) -> aioredis.Redis:
    base = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
    connection_class = with_hiredis_packing(
        type(f"Following{base.__name__}", (FollowMaster, base), {})
    )
    sentinel_kwargs = {"socket_timeout": 1, "socket_connect_timeout": 1}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        target.master,
        redis_class=redis_class(confirmation),
        connection_pool_class=BlockingSentinelPool,
        connection_class=connection_class,
        max_connections=pool_size,
        timeout=5,
        db=target.db,
        **target.login,
        **target.options,
        **CONNECTION,
    )
