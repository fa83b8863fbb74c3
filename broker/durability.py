"""Durability you can choose (docs/redis.md, "Durability"): ``local`` or ``replicated``.

``local`` (the default): a write is acknowledged once the Redis master has it. Replication is
asynchronous, so a master that dies (kill -9, a crashed host) may take its last writes with
it, even though RPCs were answered OK for them; the replica Sentinel promotes lacks them.

``replicated``: a write is acknowledged only once at least ``durability_replicas`` replicas
have it. The broker's client (make_client) is then a ConfirmingRedis: every pipeline or
command that writes carries ``WAIT <replicas> <timeout ms>`` right after it, on the same
connection and in the same packet (WAIT counts the replicas that acknowledged *this
connection's* writes, and inside MULTI it answers at once, so it follows the EXEC). Both go
in one write, so it costs no extra round trip from the replica: the master sends the writes
and its REPLCONF GETACK to the replicas in the same event-loop turn and answers the WAIT when
enough replicas have acknowledged. Fewer in time: BrokerUnavailable ("write not confirmed by
a Redis replica within N ms"), which the RPC answers FAILED_PRECONDITION (the 1.0.0 client
retries that; never UNAVAILABLE, which it dies on). The write itself stays on the master, so
the client's retry may store it twice: at-least-once, like a retry after a lost reply.

On Redis 7.2+ with the master's AOF on (nodes of a Sentinel deployment run one config, so
its replicas are taken to run AOF too), ``WAITAOF 0 <replicas> <timeout ms>`` replaces WAIT:
the write is then in a replica's AOF on disk, not only in its memory. Detected once, when
the broker connects (probe()).

On a Redis Cluster each node's part of a pipeline, and each direct command, carries its own
WAIT in the same way (ConfirmingClusterNode): the node answers it once its own replicas have
the write. Only the callers whose commands went to a node that could not confirm fail; the
other nodes' callers are answered as usual. A primary needs ``durability_replicas`` replicas
*left* after a failover for its slots to keep taking writes, so run one more per primary.

Commands that only read, and the consumer-group bookkeeping a failover may lose harmlessly
(XREADGROUP, XAUTOCLAIM: entries are delivered again), carry no WAIT. The first writes at
connect (the schema version key, broker/schema.py) run unconfirmed() so a process can start
while its replicas are away (probe() logs a warning then; its calls fail until one is back).

With ``local`` nothing here runs: the client is redis-py's plain one, per-call cost unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import _PIPELINE_YIELD_MIN_COMMANDS, Pipeline, _yield_in_read_loop
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ResponseError

from broker.errors import BrokerUnavailable

log = logging.getLogger("broker")

LOCAL, REPLICATED = "local", "replicated"
MODES = (LOCAL, REPLICATED)

# Commands after which no WAIT is sent: they write nothing that must survive a failover.
# (ASKING above all: it lets only the next command in, which must not be a WAIT.)
NOT_CONFIRMED = frozenset(
    """GET MGET HGET HGETALL HMGET HEXISTS HLEN HKEYS HVALS HSCAN HSTRLEN LRANGE LINDEX LLEN
    LPOS SMEMBERS SISMEMBER SMISMEMBER SCARD SSCAN SRANDMEMBER ZRANGE ZREVRANGE ZRANGEBYSCORE
    ZREVRANGEBYSCORE ZRANGEBYLEX ZCARD ZSCORE ZMSCORE ZRANK ZREVRANK ZCOUNT ZSCAN EXISTS TYPE
    TTL PTTL EXPIRETIME SCAN KEYS DBSIZE STRLEN GETRANGE XLEN XRANGE XREVRANGE XREAD XPENDING
    PING ECHO INFO TIME ROLE LASTSAVE HELLO AUTH SELECT COMMAND EVALSHA_RO EVAL_RO FCALL_RO
    WAIT WAITAOF XREADGROUP XAUTOCLAIM ASKING READONLY READWRITE""".split()
) | frozenset(
    f"{a} {b}"
    for a, subs in {
        "XINFO": "GROUPS STREAM CONSUMERS",
        "SCRIPT": "LOAD EXISTS",
        "CLIENT": "SETNAME GETNAME ID INFO LIST SETINFO",
        "CONFIG": "GET",
        "MEMORY": "USAGE",
        "OBJECT": "ENCODING FREQ IDLETIME",
        "FUNCTION": "LIST DUMP STATS",
        "CLUSTER": "SLOTS SHARDS NODES INFO MYID KEYSLOT",
    }.items()
    for b in subs.split()
)

_off: contextvars.ContextVar[bool] = contextvars.ContextVar("unconfirmed", default=False)
_EXEC = b"$4\r\nEXEC\r\n"


@contextlib.contextmanager
def unconfirmed():
    """Writes made inside this block (in this task) carry no WAIT."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def writes(name) -> bool:
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name).upper() not in NOT_CONFIRMED


@dataclass
class Confirmation:
    """What replicated mode waits for: ``replicas`` acknowledgements within ``timeout_ms``."""

    replicas: int = 1
    timeout_ms: int = 1000
    waitaof: bool = False  # set by probe(): Redis 7.2+ with appendonly yes

    def command(self) -> tuple:
        if self.waitaof:
            return ("WAITAOF", 0, self.replicas, self.timeout_ms)
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, reply) -> None:
        """Raise BrokerUnavailable unless the WAIT / WAITAOF reply counts enough replicas."""
        acked = int(reply[1] if isinstance(reply, list | tuple) else reply)
        if acked < self.replicas:
            what = "a Redis replica" if self.replicas == 1 else f"{self.replicas} Redis replicas"
            raise BrokerUnavailable(
                f"write not confirmed by {what} within {self.timeout_ms} ms ({acked} acknowledged)"
            )


def confirmation(settings) -> Confirmation | None:
    """The Confirmation that settings ask for, or None for local durability."""
    mode = settings.durability
    if mode not in MODES:
        raise ValueError(f"durability must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == LOCAL:
        return None
    if settings.durability_replicas < 1:
        raise ValueError("durability_replicas must be at least 1")
    return Confirmation(
        replicas=settings.durability_replicas,
        timeout_ms=max(1, round(settings.durability_timeout * 1000)),
    )


class ConfirmingPipeline(Pipeline):
    """A pipeline whose writes are followed by the confirmation, in the same packet."""

    confirmation: Confirmation

    async def _execute_transaction(self, connection, commands, raise_on_error):
        return await self._confirmed(
            super()._execute_transaction, connection, commands, raise_on_error, True
        )

    async def _execute_pipeline(self, connection, commands, raise_on_error):
        return await self._confirmed(
            super()._execute_pipeline, connection, commands, raise_on_error, False
        )

    async def _confirmed(self, execute, connection, commands, raise_on_error, transaction):
        if _off.get() or not any(writes(args[0]) for args, _ in commands):
            return await execute(connection, commands, raise_on_error)
        trailer = connection.pack_command(*self.confirmation.command())
        send = type(connection).send_packed_command
        sent = False

        async def send_with_wait(command, check_health: bool = True):
            # The one write that carries the queued commands (a transaction's ends with its
            # EXEC; redis-py sends nothing else here unless HIMPORT, unused, prepares first).
            nonlocal sent
            if not sent and (not transaction or bytes(command[-1]).endswith(_EXEC)):
                command, sent = [*command, *trailer], True
            await send(connection, command, check_health)

        connection.send_packed_command = send_with_wait  # this connection, this call only
        try:
            response = await execute(connection, commands, raise_on_error)
        except BaseException:
            if sent:  # the confirmation's reply is still on the socket: never reuse it
                await connection.disconnect(nowait=True)
            raise
        finally:
            del connection.send_packed_command
        self.confirmation.check(await connection.read_response())
        return response


class ConfirmingRedis(aioredis.Redis):
    """The broker's client in replicated mode (see the module doc)."""

    confirmation: Confirmation

    def pipeline(self, transaction: bool = True, shard_hint=None) -> Pipeline:
        pipe = ConfirmingPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.confirmation = self.confirmation
        return pipe

    async def _send_command_parse_response(self, conn, command_name, *args, **options):
        if _off.get() or not writes(command_name):
            return await super()._send_command_parse_response(conn, command_name, *args, **options)
        confirm = self.confirmation
        await conn.send_packed_command(
            [*conn.pack_command(*args), *conn.pack_command(*confirm.command())]
        )
        try:
            result = await self.parse_response(conn, command_name, **options)
        except ResponseError as exc:  # the command failed; its WAIT reply follows anyway
            await conn.read_response()
            raise exc
        confirm.check(await conn.read_response())
        return result


def redis_class(confirm: Confirmation | None) -> type[aioredis.Redis]:
    """The client class for a Confirmation (redis-py's own for local durability)."""
    if confirm is None:
        return aioredis.Redis
    return type("ConfirmingRedis", (ConfirmingRedis,), {"confirmation": confirm})


class ConfirmingClusterNode(ClusterNode):
    """A Cluster node whose writes are followed by the confirmation, in the same packet:
    redis-py's ClusterNode.execute_command / execute_pipeline (pinned 8.2.0), plus the
    trailer and its reply, read before the connection goes back to the node's pool."""

    __slots__ = ()
    confirmation: Confirmation

    async def execute_command(self, *args, asking: bool = False, **kwargs):
        if _off.get() or asking or not writes(args[0]):
            return await super().execute_command(*args, asking=asking, **kwargs)
        confirm = self.confirmation
        connection = self.acquire_connection()
        try:
            await self.disconnect_if_needed(connection)
            await connection.send_packed_command(
                [*connection.pack_command(*args), *connection.pack_command(*confirm.command())]
            )
            try:
                result = await self.parse_response(connection, args[0], **kwargs)
            except ResponseError:  # the command failed (MOVED too); its WAIT reply follows
                await connection.read_response()
                raise
            confirm.check(await connection.read_response())
            return result
        finally:
            try:
                await self.disconnect_if_needed(connection)
            finally:
                self.release(connection)

    async def execute_pipeline(self, commands) -> bool:
        if _off.get() or not any(writes(c.args[0]) for c in commands):
            return await super().execute_pipeline(commands)
        confirm = self.confirmation
        connection = self.acquire_connection()
        try:
            await self.disconnect_if_needed(connection)
            try:
                await connection.send_packed_command(
                    connection.pack_commands([*(c.args for c in commands), confirm.command()])
                )
            except Exception as exc:
                self._mark_free_connections_for_reconnect_on_error(exc)
                raise
            failed = False
            for i, cmd in enumerate(commands):
                if i and not i % _PIPELINE_YIELD_MIN_COMMANDS:
                    await _yield_in_read_loop(connection)
                try:
                    cmd.result = await self.parse_response(connection, cmd.args[0], **cmd.kwargs)
                except Exception as exc:
                    cmd.result, failed = exc, True
            try:
                confirm.check(await connection.read_response())
            except Exception as exc:
                # Applied here, not confirmed: each of them fails (the batcher re-sends a
                # connection error's callers, and answers "not confirmed" as on one Redis)
                self._mark_free_connections_for_reconnect_on_error(exc)
                for cmd in commands:
                    if not isinstance(cmd.result, Exception):
                        cmd.result = exc
                failed = True
            return failed
        finally:
            try:
                await self.disconnect_if_needed(connection)
            finally:
                self.release(connection)


class ConfirmingNodesManager(NodesManager):
    """Every node the cluster client learns of (slot map, MOVED) enters its caches here."""

    __slots__ = ()
    node_class: type[ConfirmingClusterNode]

    def set_nodes(self, old, new, remove_old: bool = False) -> None:
        super().set_nodes(old, new, remove_old)
        for node in old.values():
            if type(node) is ClusterNode:
                node.__class__ = self.node_class


def confirm_cluster(client: RedisCluster, confirm: Confirmation | None) -> RedisCluster:
    """Make a cluster client's writes wait for replicas (nothing for local durability)."""
    if confirm is None:
        return client
    node_class = type(
        "ConfirmingClusterNode",
        (ConfirmingClusterNode,),
        {"__slots__": (), "confirmation": confirm},
    )
    manager = client.nodes_manager
    manager.__class__ = type(
        "ConfirmingNodesManager",
        (ConfirmingNodesManager,),
        {"__slots__": (), "node_class": node_class},
    )
    manager.set_nodes(manager.startup_nodes, {})  # the nodes it already has
    client.confirmation = confirm
    return client


async def master_infos(redis, *sections: str) -> dict[str, dict]:
    """INFO of each master by its address: every primary of a Cluster, else the one master
    (the one Sentinel names now)."""
    if isinstance(redis, RedisCluster):
        return await redis.info(*sections, target_nodes=RedisCluster.PRIMARIES)
    pool = redis.connection_pool
    info = await redis.info(*sections)
    if isinstance(pool, SentinelConnectionPool):
        host, port = await pool.get_master_address()
    else:
        host, port = pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")
        if pool.connection_kwargs.get("path"):  # a unix socket
            return {pool.connection_kwargs["path"]: info}
    return {f"{host}:{port}": info}


async def probe(redis) -> None:
    """At connect, in replicated mode: use WAITAOF where every master has it and runs AOF,
    and warn about each master with fewer connected replicas than every write waits for
    (on a Cluster: each primary)."""
    confirm = getattr(redis, "confirmation", None)
    if confirm is None:
        return
    try:
        masters = await master_infos(redis, "server", "replication", "persistence")
    except ResponseError as exc:  # an ACL user without +info (docs/redis.md, "ACL users")
        log.warning("durability replicated: cannot check the replicas (%s); using WAIT", exc)
        return
    waitaof = bool(masters)
    for name, info in masters.items():
        version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
        waitaof &= version >= (7, 2) and int(info.get("aof_enabled", 0)) == 1
        connected = int(info.get("connected_slaves", 0))
        if info.get("role") != "master" or connected < confirm.replicas:
            log.warning(
                "durability replicated: Redis %s (%s) has %d connected replica(s), %d needed: "
                "writes will fail (FAILED_PRECONDITION, 'write not confirmed') until enough "
                "replicas are connected",
                name,
                info.get("role", "?"),
                connected,
                confirm.replicas,
            )
    confirm.waitaof = waitaof
    log.info(
        "durability replicated: every write waits for %d replica(s), at most %d ms (%s)",
        confirm.replicas,
        confirm.timeout_ms,
        "WAITAOF" if confirm.waitaof else "WAIT",
    )
