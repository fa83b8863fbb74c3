"""ModelService Upload/Download against a real replica and Redis, in both model stores
(chunks in Redis, files on disk): docs/protocol.md §4.4, §4.5, §10."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib

import grpc
import pytest

from combiner.pb import scaleout_pb2 as pb
from tests.conftest import Stubs, meta
from tests.services import SCAN_COUNT, eventually

pytestmark = pytest.mark.topologies

MiB = 1024 * 1024
KiB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_meta(model_id: str | None, checksum: str | None = None) -> tuple:
    extra = []
    if model_id is not None:
        extra.append(("model-id", model_id))
    if checksum is not None:
        extra.append(("checksum", checksum))
    return (*meta(), *extra)


async def upload(stubs, data: bytes, model_id, *, chunk=MiB, checksum="auto") -> pb.ModelResponse:
    async def chunks():
        for i in range(0, len(data), chunk):
            yield pb.FileChunk(data=data[i : i + chunk])

    checksum = sha(data) if checksum == "auto" else checksum
    return await stubs.models.Upload(chunks(), metadata=upload_meta(model_id, checksum))


async def download(stubs, model_id: str) -> tuple[list[bytes], dict]:
    call = stubs.models.Download(pb.ModelRequest(model_id=model_id), metadata=meta())
    chunks = [c.data async for c in call]
    trailer = dict(tuple(await call.trailing_metadata()))
    return chunks, trailer


async def code_of(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code()


class Store:
    """One replica with one model store, plus what the tests check it with."""

    def __init__(self, kind, replica, stubs, broker, model_dir) -> None:
        self.kind = kind
        self.replica = replica
        self.stubs = stubs
        self.broker = broker
        self.model_dir: pathlib.Path | None = model_dir

    async def keys_of(self, model_id: str) -> list[str]:
        # encoded ids only hold [A-Za-z0-9._~%-]: no glob characters
        pattern = self.broker._keys.model(model_id) + "*"
        keys = self.broker._redis.scan_iter(match=pattern, count=SCAN_COUNT)
        return [k.decode() async for k in keys]

    async def all_model_keys(self) -> list[str]:
        pattern = f"{self.broker._keys.prefix}:model:*"
        keys = self.broker._redis.scan_iter(match=pattern, count=SCAN_COUNT)
        return [k.decode() async for k in keys]

    def files(self) -> list[pathlib.Path]:
        if self.model_dir is None:
            return []
        return sorted(p for p in self.model_dir.parent.rglob("*") if p.is_file())

    async def stored_files(self, *model_ids: str) -> list[pathlib.Path]:
        """Disk store: the files the metas of these models name."""
        models = self.replica.broker.models  # the replica's: it has the model dir
        return sorted([models.file_path(m, await models.meta(m)) for m in model_ids])

    async def assert_nothing_stored(self, model_id: str) -> None:
        assert await self.keys_of(model_id) == []
        if self.model_dir is not None:
            assert [p.name for p in self.files()] == []
        assert await code_of(download(self.stubs, model_id)) == grpc.StatusCode.NOT_FOUND


async def open_store(kind, make_replica, broker, tmp_path, **opts):
    model_dir = tmp_path / "store" / "models" if kind == "disk" else None
    replica = await make_replica(model_dir=model_dir, **opts)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    return Store(kind, replica, Stubs(channel), broker, model_dir), channel


@pytest.fixture(params=["redis", "disk"])
async def store(request, make_replica, broker, tmp_path):
    s, channel = await open_store(request.param, make_replica, broker, tmp_path)
    async with channel:
        yield s


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [MiB, 32 * KiB], ids=["1MiB-chunks", "32KiB-chunks"])
async def test_multi_mib_round_trip(store, chunk):
    data = os.urandom(3 * MiB + 12345)
    reply = await upload(store.stubs, data, "m-1", chunk=chunk)
    assert reply.status == pb.ModelStatus.OK

    chunks, trailer = await download(store.stubs, "m-1")
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= MiB for c in chunks)
    assert trailer["checksum"] == sha(data)

    stored = await store.broker.models.meta("m-1")
    assert stored["state"] == "ok" and stored["store"] == store.kind
    assert stored["sha256"] == sha(data) and stored["size"] == str(len(data))
    if store.model_dir is not None:
        assert (await store.stored_files("m-1"))[0].read_bytes() == data
        assert store.files() == await store.stored_files("m-1")  # no staging file left behind
        assert await store.keys_of("m-1") == [store.broker._keys.model("m-1")]
    else:
        assert sorted(await store.keys_of("m-1")) == sorted(
            [
                store.broker._keys.model("m-1"),
                store.broker._keys.model_chunks("m-1"),
            ]
        )


async def test_empty_upload_round_trips(store):
    assert (await upload(store.stubs, b"", "empty")).status == pb.ModelStatus.OK
    chunks, trailer = await download(store.stubs, "empty")
    assert b"".join(chunks) == b"" and trailer["checksum"] == sha(b"")


async def test_upload_without_checksum_is_invalid_argument(store):
    # Without a checksum a cancelled upload could not be told from a finished one (grpc.aio
    # ends the request stream the same way), so a truncated model could become visible.
    for checksum in (None, ""):
        err = await code_of(upload(store.stubs, b"no checksum given", "nochk", checksum=checksum))
        assert err == grpc.StatusCode.INVALID_ARGUMENT
    await store.assert_nothing_stored("nochk")


# --- bad input -----------------------------------------------------------------------------


async def test_upload_without_model_id_is_invalid_argument(store):
    for model_id in (None, ""):
        err = await code_of(upload(store.stubs, b"abc", model_id))
        assert err == grpc.StatusCode.INVALID_ARGUMENT
    assert await store.all_model_keys() == []
    assert store.files() == []


async def test_checksum_mismatch_fails_and_stores_nothing(store):
    data = os.urandom(MiB + 100)  # more than one stored chunk
    reply = await upload(store.stubs, data, "bad-sum", chunk=32 * KiB, checksum=sha(b"other"))
    assert reply.status == pb.ModelStatus.FAILED
    assert "checksum" in reply.message
    await store.assert_nothing_stored("bad-sum")


@pytest.mark.parametrize(
    "model_id",
    ["../evil", "a/b", "/abs", "a\\b", "..", "a..b", ".hidden", "x" * 256, "y" * 1000],
    ids=["dotdot-slash", "slash", "absolute", "backslash", "dotdot", "inner-dotdot", "dot",
         "256-chars", "1000-chars"],
)  # fmt: skip
async def test_unsafe_model_id_is_invalid_argument_and_writes_nothing(store, tmp_path, model_id):
    err = await code_of(upload(store.stubs, b"payload", model_id))
    assert err == grpc.StatusCode.INVALID_ARGUMENT
    # nothing anywhere under the test's folder (model dir or next to it), nothing in Redis
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert await store.all_model_keys() == []
    err = await code_of(download(store.stubs, model_id))
    assert err == grpc.StatusCode.INVALID_ARGUMENT


async def test_longest_allowed_model_id_works(store):
    model_id = "x" * 255  # NAME_MAX: the longest file name the disk store can create
    assert (await upload(store.stubs, b"abc", model_id)).status == pb.ModelStatus.OK
    chunks, _ = await download(store.stubs, model_id)
    assert b"".join(chunks) == b"abc"


@pytest.mark.parametrize("kind", ["redis", "disk"])
async def test_model_over_the_size_limit_is_resource_exhausted(
    kind, make_replica, broker, tmp_path
):
    s, channel = await open_store(kind, make_replica, broker, tmp_path, max_model_bytes=MiB)
    async with channel:
        exact = os.urandom(MiB)
        assert (await upload(s.stubs, exact, "fits", chunk=32 * KiB)).status == pb.ModelStatus.OK

        big = os.urandom(MiB + 1)
        err = await code_of(upload(s.stubs, big, "too-big", chunk=32 * KiB))
        assert err == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await s.keys_of("too-big") == []
        if s.model_dir is not None:
            assert s.files() == await s.stored_files("fits")
        assert await code_of(download(s.stubs, "too-big")) == grpc.StatusCode.NOT_FOUND


async def test_download_unknown_model_is_not_found(store):
    assert await code_of(download(store.stubs, "never-uploaded")) == grpc.StatusCode.NOT_FOUND
    assert await code_of(download(store.stubs, "")) == grpc.StatusCode.INVALID_ARGUMENT


# --- uploads in progress -------------------------------------------------------------------


async def test_download_while_uploading_is_failed_precondition_then_works(store):
    data = os.urandom(2 * MiB + 7)
    call = store.stubs.models.Upload(metadata=upload_meta("slow", sha(data)))
    await call.write(pb.FileChunk(data=data[: 32 * KiB]))

    async def uploading():
        return (await store.broker.models.meta("slow")).get("state") == "uploading"

    await eventually(uploading, what="the upload to be marked uploading")
    err = await code_of(download(store.stubs, "slow"))
    assert err == grpc.StatusCode.FAILED_PRECONDITION

    for i in range(32 * KiB, len(data), 32 * KiB):
        await call.write(pb.FileChunk(data=data[i : i + 32 * KiB]))
    await call.done_writing()
    assert (await call).status == pb.ModelStatus.OK

    chunks, trailer = await download(store.stubs, "slow")
    assert b"".join(chunks) == data and trailer["checksum"] == sha(data)


async def test_cancelled_upload_leaves_nothing_visible(store):
    # Half of the model is sent (with the whole model's checksum, as the client does); then
    # the client cancels. grpc.aio ends the server's request iterator on a cancel just as
    # on a half-close, so the checksum (required) is what keeps it invisible.
    data = os.urandom(3 * MiB)
    call = store.stubs.models.Upload(metadata=upload_meta("gone", sha(data)))
    for i in range(0, MiB + 64 * KiB, 32 * KiB):  # enough for one staged 1 MiB chunk
        await call.write(pb.FileChunk(data=data[i : i + 32 * KiB]))

    async def staged():
        if store.model_dir is not None:
            return any(p.stat().st_size >= MiB for p in store.model_dir.glob(".upload-*"))
        return any(":upload:" in k for k in await store.keys_of("gone"))

    await eventually(staged, what="the first chunk to be staged")
    assert (await store.broker.models.meta("gone"))["state"] == "uploading"
    call.cancel()

    async def cleaned():
        return await store.keys_of("gone") == [] and store.files() == []

    await eventually(cleaned, what="the cancelled upload to be cleaned up")
    await store.assert_nothing_stored("gone")


# --- the same id twice ---------------------------------------------------------------------


async def test_reupload_identical_is_ok_and_different_is_already_exists(store):
    original = os.urandom(MiB + 5)
    assert (await upload(store.stubs, original, "dup")).status == pb.ModelStatus.OK
    assert (await upload(store.stubs, original, "dup", chunk=32 * KiB)).status == pb.ModelStatus.OK

    other = os.urandom(MiB + 5)
    err = await code_of(upload(store.stubs, other, "dup"))
    assert err == grpc.StatusCode.ALREADY_EXISTS

    chunks, trailer = await download(store.stubs, "dup")
    assert b"".join(chunks) == original and trailer["checksum"] == sha(original)
    assert (await store.broker.models.meta("dup"))["sha256"] == sha(original)
    # no staged leftovers of the refused uploads
    if store.model_dir is not None:
        assert store.files() == await store.stored_files("dup")
        assert store.files()[0].read_bytes() == original
    else:
        assert not [k for k in await store.keys_of("dup") if ":upload:" in k]


async def test_concurrent_uploads_of_one_id_store_exactly_the_winners_bytes(store):
    # Two uploads of one id with different bytes, at the same time, 24 times: one wins, the
    # other is refused, and what is stored (and served, with its trailer) is the winner's.
    async def one(model_id: str, data: bytes, client: str):
        async def chunks():
            for i in range(0, len(data), 256 * KiB):
                yield pb.FileChunk(data=data[i : i + 256 * KiB])

        md = (*meta(client), ("model-id", model_id), ("checksum", sha(data)))
        try:
            return (await store.stubs.models.Upload(chunks(), metadata=md)).status
        except grpc.aio.AioRpcError as err:
            return err.code()

    for pair in range(24):
        model_id = f"race-{pair}"
        a, b = os.urandom(2 * MiB + 3), os.urandom(2 * MiB + 3)
        got = await asyncio.gather(one(model_id, a, "ca"), one(model_id, b, "cb"))
        assert sorted(map(str, got)) == sorted(
            map(str, [pb.ModelStatus.OK, grpc.StatusCode.ALREADY_EXISTS])
        ), (pair, got)
        winner = a if got[0] == pb.ModelStatus.OK else b
        chunks, trailer = await download(store.stubs, model_id)
        assert trailer["checksum"] == sha(winner), pair
        assert b"".join(chunks) == winner, pair
        assert (await store.broker.models.meta(model_id))["sha256"] == sha(winner)
        models = store.replica.broker.models  # the replica's: it has the model dir
        assert bytes(await models.get(model_id)) == winner, pair  # what FedAvg reads
    # nothing of the losers is left behind: one stored copy per id, no staged uploads
    if store.model_dir is not None:
        assert store.files() == await store.stored_files(*(f"race-{i}" for i in range(24)))
    else:
        assert not [k for k in await store.all_model_keys() if ":upload:" in k]
