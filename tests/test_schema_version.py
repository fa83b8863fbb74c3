"""The schema version in Redis (broker/schema.py): the first connect to a prefix writes it,
every later one agrees, and keys written by another schema version (or a key that holds no
version) make every process refuse to run against them, with a message saying what to do
and without writing anything else; replicas, workers and CLI commands alike."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from broker import SchemaMismatch, connect
from broker.context import Settings
from broker.schema import SCHEMA_VERSION
from broker.scripts import Scripts
from tests.services import RedisServer
from tests.test_cli import assert_clean_failure, run


@pytest.fixture(scope="module")
def own_redis():
    """A Redis of this module's own (free port), so DBSIZE counts only what we wrote."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def fresh(own_redis):
    """(url, prefix, sync client) on an empty database of our own Redis."""
    client = redis.Redis.from_url(own_redis.url)
    client.flushdb()
    client.script_flush()
    yield own_redis.url, f"t{uuid.uuid4().hex[:10]}", client
    client.close()


def marks(prefix: str) -> set[bytes]:
    """The keys every connect to a fresh prefix writes: the version and the partitions."""
    return {f"{prefix}:schema".encode(), f"{prefix}:partitions".encode()}


def expect_refusal(message: str, prefix: str, found: str) -> None:
    assert f"prefix {prefix!r}" in message, message
    assert found in message, message
    assert f"expects schema version {SCHEMA_VERSION}" in message, message
    assert "`combiner model get ID -o FILE`" in message, message
    assert "`combiner model put FILE --id ID`" in message, message
    assert "docs/operations.md 'Moving to a new schema version'" in message, message


async def test_the_first_connect_writes_the_version_and_the_next_ones_agree(fresh):
    url, prefix, r = fresh
    assert r.dbsize() == 0
    async with connect(url, settings=Settings(prefix=prefix)) as broker:
        assert await broker.ping()
    assert set(r.keys("*")) == marks(prefix)
    assert r.get(f"{prefix}:schema") == str(SCHEMA_VERSION).encode()
    assert r.get(f"{prefix}:partitions") == b"1"  # a standalone Redis: one partition
    for _ in range(2):
        async with connect(url, settings=Settings(prefix=prefix)) as broker:
            await broker.tasks.push("c1", "Custom_x")  # and it works as before
    assert r.get(f"{prefix}:schema") == str(SCHEMA_VERSION).encode()


async def test_a_prefix_from_before_the_version_existed_is_refused(fresh):
    """Keys without a P:schema were written in the layout of version 1."""
    url, prefix, r = fresh
    r.zadd(f"{prefix}:clients", {"c1": 1.0})
    with pytest.raises(SchemaMismatch) as err:
        await connect(url, settings=Settings(prefix=prefix))
    expect_refusal(str(err.value), prefix, f"{prefix}:clients of version 1's layout")
    assert r.keys("*") == [f"{prefix}:clients".encode()]  # nothing written


async def test_a_fresh_prefix_keeps_the_partitions_it_was_first_given(fresh):
    url, prefix, r = fresh
    async with connect(url, settings=Settings(prefix=prefix, partitions=4)) as broker:
        await broker.tasks.push("c7", "Custom_x")
    assert r.get(f"{prefix}:partitions") == b"4"
    async with connect(url, settings=Settings(prefix=prefix, partitions=8)) as broker:
        assert broker._keys.partitions == 4  # the prefix's number wins (and is logged)
        assert (await broker.tasks.take_for_stream("c7"))[0]  # the task is where it was
    r.set(f"{prefix}:partitions", "many")
    with pytest.raises(SchemaMismatch) as err:
        await connect(url, settings=Settings(prefix=prefix))
    assert f"{prefix}:partitions = b'many'" in str(err.value)


@pytest.mark.parametrize(
    "stored, found",
    [
        (str(SCHEMA_VERSION + 1), f"schema version {SCHEMA_VERSION + 1}"),
        ("0", "'0', which is not a schema version"),  # versions start at 1
        ("garbage", "'garbage', which is not a schema version"),
        ("1.0", "'1.0', which is not a schema version"),
        (" 1", "' 1', which is not a schema version"),
        ("", "'', which is not a schema version"),
    ],
    ids=["newer", "zero", "garbage", "float", "space", "empty"],
)
async def test_another_version_is_refused_and_nothing_else_is_written(fresh, stored, found):
    url, prefix, r = fresh
    r.set(f"{prefix}:schema", stored)
    r.hset(f"{prefix}:session:s1", "status", "running")  # the deployment's own data
    before = {k: r.dump(k) for k in r.keys("*")}
    with pytest.raises(SchemaMismatch) as err:
        await connect(url, settings=Settings(prefix=prefix))
    expect_refusal(str(err.value), prefix, found)
    assert {k: r.dump(k) for k in r.keys("*")} == before
    assert r.dbsize() == 2
    # it stopped before loading its scripts, too
    assert not any(r.script_exists(*Scripts().sha.values()))


async def test_a_schema_key_of_another_type_is_refused(fresh):
    url, prefix, r = fresh
    r.hset(f"{prefix}:schema", "version", "1")
    with pytest.raises(SchemaMismatch) as err:
        async with connect(url, settings=Settings(prefix=prefix)):
            pass
    expect_refusal(str(err.value), prefix, "a key that is not a string")
    assert r.keys("*") == [f"{prefix}:schema".encode()]
    assert r.type(f"{prefix}:schema") == b"hash"


async def test_concurrent_first_connects_all_succeed_with_one_version(fresh):
    url, prefix, r = fresh
    brokers = await asyncio.gather(
        *(connect(url, settings=Settings(prefix=prefix), pool_size=2) for _ in range(8))
    )
    try:
        assert all(await asyncio.gather(*(b.ping() for b in brokers)))
    finally:
        await asyncio.gather(*(b.close() for b in brokers))
    assert set(r.keys("*")) == marks(prefix)
    assert r.get(f"{prefix}:schema") == str(SCHEMA_VERSION).encode()


def test_every_command_refuses_another_version_clearly(fresh):
    """Read-only and writing CLI commands, a replica and a worker: each exits non-zero with
    the message (an `Error:` line, no traceback), and none writes anything."""
    url, prefix, r = fresh
    r.set(f"{prefix}:schema", "1")  # the previous version
    at = ["--redis-url", url, "--prefix", prefix]
    commands = [
        ["status", *at],
        ["status", "--json", *at],
        ["task", "show", "x", *at],
        ["token", "list", *at],
        ["task", "push", "--client", "c1", "--type", "Custom_x", *at],
        ["serve", "--port", "0", "--drain-delay", "0", *at],
        ["worker", *at],
    ]
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda args: run(*args), commands))
    for args, proc in zip(commands, procs, strict=True):
        assert_clean_failure(proc, "schema version 1")
        # click prints the message on one line after "Error: "
        message = next(line for line in proc.stderr.splitlines() if line.startswith("Error:"))
        expect_refusal(message, prefix, "schema version 1")
        assert "listening on" not in proc.stdout, args
    assert r.keys("*") == [f"{prefix}:schema".encode()]
    assert r.get(f"{prefix}:schema") == b"1"


def test_a_read_only_command_on_a_fresh_prefix_writes_only_the_version(fresh):
    url, prefix, r = fresh
    proc = run("status", "--json", "--redis-url", url, "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    assert set(r.keys("*")) == marks(prefix)
