"""broker/connection.py: commands packed by hiredis are byte for byte what redis-py packs,
and a real Redis answers them."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from broker.connection import with_hiredis_packing
from broker.topology import make_client

ARGS = [
    ("SET", "k", "v"),
    ("SET", "ä:{c:x}", "ü\n\r\x00"),
    ("EVALSHA", "0" * 40, 2, "k1", "k2", 1, -7, 0.1, 1e-05, 10**20, 3.0, b"\x00\xff", ""),
    ("CONFIG GET", "maxmemory"),
    ("RPUSH", "chunks", b"x" * (1 << 20)),  # large: redis-py's own path, not copied
    ("RPUSH", "chunks", memoryview(b"y" * 100)),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a[0])
def test_packed_bytes_are_what_redis_py_packs(args):
    plain, packed = Connection(), with_hiredis_packing(Connection)()
    assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))


def test_an_unpackable_argument_is_a_data_error():
    with pytest.raises(DataError):
        with_hiredis_packing(Connection)().pack_command("SET", "k", object())


async def test_a_real_redis_answers_packed_commands(redis_url, prefix):
    client = make_client(redis_url)
    try:
        key = f"{prefix}:packed"
        assert await client.set(key, "ä\x00", ex=60)
        assert await client.get(key) == "ä\x00".encode()
        pipe = client.pipeline(transaction=True)
        pipe.rpush(f"{key}:list", b"z" * (1 << 20), "small", 1.5)
        pipe.lrange(f"{key}:list", 1, -1)
        assert (await pipe.execute())[1] == [b"small", b"1.5"]
        assert (await client.config_get("maxmemory"))["maxmemory"] is not None
        await client.delete(key, f"{key}:list")
    finally:
        await client.aclose()


async def test_a_cancelled_command_is_never_carried_on_as_if_not_cancelled(redis_url, prefix):
    """Python 3.11's wait_for, which redis-py wraps every write in, returned normally in about
    one cancelled call in ten under load; a task stopped with cancel() then kept running. The
    cancellation is sent at every loop turn of a command in turn, so the turn where the write
    finishes is among them."""
    client = make_client(redis_url)
    carried_on = []
    try:
        for turns in range(40):
            for _ in range(5):

                async def command():
                    await client.set(f"{prefix}:k", "v")
                    return asyncio.current_task().cancelling()

                task = asyncio.create_task(command())
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    if await task:  # it returned although cancel() reached it
                        carried_on.append(turns)
                except asyncio.CancelledError:
                    pass
    finally:
        await client.aclose()
    assert carried_on == []
