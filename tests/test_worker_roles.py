"""Worker roles against Redis losing its keys and against a role that stops (issue 11 item
8, docs/operations.md "Worker roles"): the records worker writes records again after a
FLUSHDB, a stopped role makes the worker exit non-zero, and `combiner status` shows the
workers with their roles' health."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from combiner.pb import scaleout_pb2 as pb
from combiner.processes import Child
from tests.conftest import meta, replica_at
from tests.services import RedisServer, eventually, wait_for

pytestmark = pytest.mark.topologies

ROLES = {"coordinator", "records", "liveness", "upkeep"}


@pytest.fixture
def redis_server():
    server = RedisServer().start()  # its own: these tests FLUSHDB and break keys
    yield server
    server.close()


def status_json(url: str, prefix: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "combiner", "status", "--json", "--redis-url", url,
         "--prefix", prefix],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def worker_child(tmp_path, url: str, prefix: str) -> Child:
    return Child(
        ["worker", "--worker-id", "w1", "--lease-ttl", "3", "--redis-url", url,
         "--prefix", prefix],
        str(tmp_path / "worker.log"),
    ).start()  # fmt: skip


async def status_recorded(broker, client_id: str, text: str) -> bool:
    records = await broker.sessions.client_records(client_id, "statuses")
    return any(text in json.dumps(r) for r in records)


async def test_records_are_written_again_after_flushdb(tmp_path, redis_server):
    prefix = f"t{uuid.uuid4().hex[:10]}"
    worker = worker_child(tmp_path, redis_server.url, prefix)
    try:
        async with replica_at(redis_server.url, prefix) as (replica, stubs):
            broker = replica.broker
            await stubs.combiner.SendStatus(
                pb.Status(client_id="c1", status="before the flush"), metadata=meta("c1")
            )
            await eventually(lambda: status_recorded(broker, "c1", "before the flush"), 20)

            await broker._redis.flushdb()  # the worker is blocked on the inbound streams
            await stubs.combiner.SendStatus(
                pb.Status(client_id="c2", status="after the flush"), metadata=meta("c2")
            )
            await eventually(lambda: status_recorded(broker, "c2", "after the flush"), 20)
            assert worker.alive

            # and the worker registered itself again, every role healthy
            def shown():
                view = status_json(redis_server.url, prefix)
                return view if view["workers"] else None

            view = await asyncio.to_thread(wait_for, shown, 20, 0.2, "the worker in status")
            [w] = view["workers"]
            assert w["id"] == "w1" and w["roles"] == dict.fromkeys(ROLES, "ok")
    finally:
        worker.stop()


async def test_a_role_that_stops_makes_the_worker_exit_non_zero(tmp_path, redis_server):
    prefix = f"t{uuid.uuid4().hex[:10]}"
    worker = worker_child(tmp_path, redis_server.url, prefix)
    try:
        async with replica_at(redis_server.url, prefix) as (replica, stubs):
            broker = replica.broker
            await stubs.combiner.SendStatus(
                pb.Status(client_id="c1", status="x"), metadata=meta("c1")
            )
            await eventually(lambda: status_recorded(broker, "c1", "x"), 20)
            # A stream key turned into a string: the records role can neither read it nor
            # recreate its group (WRONGTYPE), an error no retry cures.
            stream = broker._keys.inbound("statuses", broker._keys.partition_of("c1"))
            pipe = broker._redis.pipeline(transaction=False)
            pipe.delete(stream)
            pipe.set(stream, "not a stream")
            await pipe.execute()

            code = await asyncio.to_thread(worker.process.wait, 30)
            assert code != 0
            view = status_json(redis_server.url, prefix)  # shown until its lease ends
            [w] = view["workers"]
            assert w["roles"]["records"].startswith("stopped: ")
            assert "WRONGTYPE" in w["roles"]["records"]
            assert w["roles"]["liveness"] == "ok"
    finally:
        worker.stop()
