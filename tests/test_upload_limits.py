"""Upload limits against a real replica and Redis, in both model stores (docs/operations.md,
"Upload limits"): an idle upload is abandoned, uploads at once are capped per replica and
per client, and an upload holds at most one chunk of the replica's memory."""

from __future__ import annotations

import gc
import os

import grpc
import pytest

from broker.models import CHUNK
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta
from tests.services import eventually
from tests.test_models import MiB, code_of, download, open_store, sha, upload

pytestmark = pytest.mark.topologies


def upload_call(store, model_id: str, data: bytes, client: str = "c1"):
    md = (*meta(client), ("model-id", model_id), ("checksum", sha(data)))
    return store.stubs.models.Upload(metadata=md)


async def staged_bytes(store) -> int:
    """What is staged of the uploads in progress (whole chunks)."""
    if store.model_dir is not None:
        return sum(p.stat().st_size for p in store.model_dir.glob(".upload-*"))
    keys = [k for k in await store.all_model_keys() if ":upload:" in k]
    return sum([await store.broker._redis.llen(k) for k in keys]) * CHUNK


def active(store) -> int:
    return len(store.replica.models.uploads.active)


async def open_upload(store, model_id: str, client: str, data: bytes):
    """An upload that has sent its first chunk and is now in progress on the replica."""
    before = active(store)
    call = upload_call(store, model_id, data, client)
    await call.write(pb.FileChunk(data=data[:CHUNK]))

    async def started():
        return active(store) > before

    await eventually(started, what=f"upload {model_id} to start")
    return call


async def finish(call, data: bytes) -> pb.ModelResponse:
    for i in range(CHUNK, len(data), CHUNK):
        await call.write(pb.FileChunk(data=data[i : i + CHUNK]))
    await call.done_writing()
    return await call


@pytest.fixture(params=["redis", "disk"])
def kind(request):
    return request.param


async def test_an_idle_upload_is_abandoned_and_its_staged_bytes_deleted(
    kind, make_replica, broker, tmp_path
):
    s, channel = await open_store(kind, make_replica, broker, tmp_path, upload_idle_timeout=0.5)
    async with channel:
        data = os.urandom(3 * MiB)
        call = upload_call(s, "idle", data)
        await call.write(pb.FileChunk(data=data[: 2 * MiB]))  # then nothing more

        async def staged():
            return await staged_bytes(s) >= 2 * MiB

        await eventually(staged, what="the first chunks to be staged")
        # the call ends by itself, with the status the client retries later
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "abandoned" in err.value.details()
        assert await s.keys_of("idle") == [] and s.files() == []
        assert active(s) == 0
        await s.assert_nothing_stored("idle")
        # a later upload of the same id (the client's retry) works
        assert (await upload(s.stubs, data, "idle")).status == pb.ModelStatus.OK


async def test_uploads_at_once_are_capped_per_client_and_per_replica(
    kind, make_replica, broker, tmp_path
):
    s, channel = await open_store(
        kind, make_replica, broker, tmp_path, max_uploads=3, max_uploads_per_client=2
    )
    async with channel:
        data = {n: os.urandom(2 * MiB + 1) for n in ("a1", "a2", "a3", "b1", "c1")}
        a1 = await open_upload(s, "a1", "client-a", data["a1"])
        a2 = await open_upload(s, "a2", "client-a", data["a2"])
        # a third from the same client: refused before anything is written
        md = (*meta("client-a"), ("model-id", "a3"), ("checksum", sha(data["a3"])))
        refused = s.stubs.models.Upload(iter([pb.FileChunk(data=data["a3"])]), metadata=md)
        assert await code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await s.keys_of("a3") == []
        b1 = await open_upload(s, "b1", "client-b", data["b1"])  # the replica's third
        # the replica is full: another client is refused too
        md = (*meta("client-c"), ("model-id", "c1"), ("checksum", sha(data["c1"])))
        refused = s.stubs.models.Upload(iter([pb.FileChunk(data=data["c1"])]), metadata=md)
        assert await code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await s.keys_of("c1") == []

        # an upload that ends (here: OK) frees its slots, for its client and the replica
        assert (await finish(a1, data["a1"])).status == pb.ModelStatus.OK
        assert active(s) == 2
        a3 = await open_upload(s, "a3", "client-a", data["a3"])
        # a cancelled one frees them too
        b1.cancel()

        async def freed():
            return active(s) == 2

        await eventually(freed, what="the cancelled upload to give back its slot")
        c1 = await open_upload(s, "c1", "client-c", data["c1"])
        for name, call in (("a2", a2), ("a3", a3), ("c1", c1)):
            assert (await finish(call, data[name])).status == pb.ModelStatus.OK
            chunks, trailer = await download(s.stubs, name)
            assert b"".join(chunks) == data[name] and trailer["checksum"] == sha(data[name])
        assert active(s) == 0


async def test_an_upload_holds_at_most_one_chunk_of_memory(kind, make_replica, broker, tmp_path):
    # Uploads that each send one chunk just under the 8 MiB message limit and go quiet: the
    # replica keeps at most one (1 MiB) chunk of each, the rest is staged in the store.
    s, channel = await open_store(kind, make_replica, broker, tmp_path)
    async with channel:
        calls, size = [], 8 * MiB - 64 * 1024
        for i in range(4):
            data = os.urandom(size)
            call = upload_call(s, f"big-{i}", data, client=f"c{i}")
            await call.write(pb.FileChunk(data=data))
            calls.append(call)

        async def staged():  # whole chunks in the store, the rest (a part) in the buffer
            uploads = s.replica.models.uploads.active
            full = await staged_bytes(s) == 4 * (size // CHUNK * CHUNK)
            return full and len(uploads) == 4 and all(u.held_bytes for u in uploads)

        await eventually(staged, what="every whole chunk to be staged")
        held = [u.held_bytes for u in s.replica.models.uploads.active]
        assert all(h <= CHUNK + 1024 for h in held), held
        # and no received message is kept while waiting for the next one (the client's
        # messages, in this same process, are gone once written)
        gc.collect()
        big = [o for o in gc.get_objects() if isinstance(o, pb.FileChunk) and o.ByteSize() > CHUNK]
        assert not big, f"{len(big)} received messages still held"
        for call in calls:
            call.cancel()
