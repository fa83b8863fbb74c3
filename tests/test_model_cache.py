"""The replica's model cache (combiner/model_cache.py): a model is read from the store once,
then served from memory; never stale, never a partial or failed read kept."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from prometheus_client import REGISTRY

from combiner.model_cache import encode_chunk
from combiner.pb import scaleout_pb2 as pb
from tests.test_models import MiB, code_of, download, open_store, sha, upload

pytestmark = pytest.mark.topologies


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, MiB])
def test_encoded_chunk_is_the_filechunk_message(size):
    data = os.urandom(size)
    assert pb.FileChunk.FromString(encode_chunk(data)).data == data
    if size:  # protobuf omits an empty field; ours says length 0, which parses the same
        assert encode_chunk(data) == pb.FileChunk(data=data).SerializeToString()


def downloads(result: str) -> float:
    value = REGISTRY.get_sample_value("combiner_model_cache_downloads_total", {"result": result})
    return value or 0.0


class Counts:
    """Cache outcomes since the start of a test (the metrics are process-wide)."""

    def __init__(self) -> None:
        self.start = {r: downloads(r) for r in ("hit", "miss", "bypass")}

    def __call__(self) -> dict[str, int]:
        return {r: int(downloads(r) - n) for r, n in self.start.items()}


@pytest.fixture(params=["redis", "disk"])
async def cached(request, make_replica, broker, tmp_path):
    s, channel = await open_store(
        request.param, make_replica, broker, tmp_path, model_cache_bytes=8 * MiB
    )
    async with channel:
        yield s


async def spoil(store, model_id: str) -> None:
    """Make the stored bytes unreadable behind a meta that still says ok."""
    if store.model_dir is not None:
        (await store.stored_files(model_id))[0].unlink()
    else:
        await store.broker._redis.delete(store.broker._keys.model_chunks(model_id))


async def test_second_download_is_served_from_memory(cached):
    data = os.urandom(3 * MiB + 5)
    assert (await upload(cached.stubs, data, "m")).status == pb.ModelStatus.OK
    counts = Counts()
    chunks, trailer = await download(cached.stubs, "m")
    assert b"".join(chunks) == data and trailer["checksum"] == sha(data)
    assert all(0 < len(c) <= MiB for c in chunks)

    await spoil(cached, "m")  # only a cached copy can still answer
    chunks, trailer = await download(cached.stubs, "m")
    assert b"".join(chunks) == data and trailer["checksum"] == sha(data)
    assert counts() == {"hit": 1, "miss": 1, "bypass": 0}


async def test_a_replaced_model_is_never_served_stale(cached):
    old, new = os.urandom(MiB + 1), os.urandom(MiB + 2)
    await upload(cached.stubs, old, "m")
    assert b"".join((await download(cached.stubs, "m"))[0]) == old

    await cached.broker.models.delete("m")
    assert await code_of(download(cached.stubs, "m")) == grpc.StatusCode.NOT_FOUND
    assert (await upload(cached.stubs, new, "m")).status == pb.ModelStatus.OK
    chunks, trailer = await download(cached.stubs, "m")
    assert b"".join(chunks) == new and trailer["checksum"] == sha(new)


async def test_concurrent_cold_downloads_read_the_store_once(cached):
    data = os.urandom(3 * MiB + 3)
    await upload(cached.stubs, data, "global")
    counts = Counts()
    results = await asyncio.gather(*(download(cached.stubs, "global") for _ in range(20)))
    for chunks, trailer in results:
        assert b"".join(chunks) == data and trailer["checksum"] == sha(data)
    assert counts() == {"hit": 19, "miss": 1, "bypass": 0}


async def test_least_recently_used_models_are_evicted_within_the_budget(cached):
    models = {f"m{i}": os.urandom(3 * MiB) for i in range(3)}  # 8 MiB holds two
    for model_id, data in models.items():
        await upload(cached.stubs, data, model_id)
    cache = cached.replica.models.cache
    counts = Counts()
    for model_id in ("m0", "m1", "m0", "m2"):  # m2 evicts m1, the least recently used
        chunks, _ = await download(cached.stubs, model_id)
        assert b"".join(chunks) == models[model_id]
        assert cache._bytes <= cache.max_bytes
    assert counts() == {"hit": 1, "miss": 3, "bypass": 0}

    for model_id in ("m0", "m2"):
        await spoil(cached, model_id)
        assert b"".join((await download(cached.stubs, model_id))[0]) == models[model_id]
    await spoil(cached, "m1")
    assert await code_of(download(cached.stubs, "m1")) != grpc.StatusCode.OK  # was evicted


async def test_a_model_over_half_the_budget_is_streamed_not_kept(cached):
    data = os.urandom(4 * MiB + 1)
    await upload(cached.stubs, data, "big")
    counts = Counts()
    for _ in range(2):
        chunks, trailer = await download(cached.stubs, "big")
        assert b"".join(chunks) == data and trailer["checksum"] == sha(data)
    assert counts() == {"hit": 0, "miss": 0, "bypass": 2}
    assert cached.replica.models.cache._bytes == 0


async def test_cache_off_streams_every_download_from_the_store(make_replica, broker, tmp_path):
    s, channel = await open_store("redis", make_replica, broker, tmp_path, model_cache_bytes=0)
    async with channel:
        data = os.urandom(MiB + 9)
        await upload(s.stubs, data, "m")
        counts = Counts()
        assert b"".join((await download(s.stubs, "m"))[0]) == data
        await spoil(s, "m")
        assert await code_of(download(s.stubs, "m")) == grpc.StatusCode.NOT_FOUND
        assert counts()["bypass"] == 2


async def test_a_failed_store_read_is_reported_and_not_kept(cached):
    data = os.urandom(2 * MiB)
    await upload(cached.stubs, data, "m")
    await spoil(cached, "m")
    expected = (
        grpc.StatusCode.NOT_FOUND if cached.kind == "redis" else grpc.StatusCode.FAILED_PRECONDITION
    )
    for _ in range(2):  # the failure is not cached: the second Download reads the store again
        assert await code_of(download(cached.stubs, "m")) == expected
    assert cached.replica.models.cache._bytes == 0


async def test_a_store_read_shorter_than_the_meta_is_not_served_whole(cached):
    data = os.urandom(2 * MiB + 1)
    await upload(cached.stubs, data, "m")
    if cached.model_dir is not None:
        (await cached.stored_files("m"))[0].write_bytes(data[:MiB])
    else:
        await cached.broker._redis.rpop(cached.broker._keys.model_chunks("m"))
    assert await code_of(download(cached.stubs, "m")) != grpc.StatusCode.OK
    assert cached.replica.models.cache._bytes == 0
