"""Metrics endpoints scraped and parsed; `status --json` against a known state."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from urllib.parse import urlsplit

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import free_port
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from combiner.processes import Child
from tests.conftest import meta
from tests.services import wait_for


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def serve_with_metrics(tmp_path, redis_url, prefix):
    mport = free_port()
    child = Child(
        ["serve", "--port", "0", "--redis-url", redis_url, "--prefix", prefix,
         "--metrics-port", str(mport), "--insecure"],
        str(tmp_path / "serve.log"),
    ).start(wait_listening=True)  # fmt: skip
    yield child, mport
    child.stop()


async def test_replica_metrics_count_rpcs_by_method_and_code(serve_with_metrics):
    child, mport = serve_with_metrics
    async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
        stub = pb_grpc.CombinerClientStub(channel)
        for _ in range(3):
            await stub.PollAndReport(pb.ActivityReport(node_id="m1"), metadata=meta("m1"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.PollAndReport(pb.ActivityReport())
        models = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in models.Download(pb.ModelRequest(model_id="nope"), metadata=meta()):
                pass
    samples = await asyncio.to_thread(scrape, mport)
    ok = samples[("combiner_rpcs_total", (("code", "OK"), ("method", "PollAndReport")))]
    bad = samples[
        ("combiner_rpcs_total", (("code", "INVALID_ARGUMENT"), ("method", "PollAndReport")))
    ]
    missing = samples[("combiner_rpcs_total", (("code", "NOT_FOUND"), ("method", "Download")))]
    assert (ok, bad, missing) == (3.0, 1.0, 1.0)
    assert samples[("combiner_rpc_seconds_count", (("method", "PollAndReport"),))] == 4.0
    assert samples[("combiner_redis_pipelines_total", ())] >= 1
    assert ("combiner_open_task_streams", ()) in samples


async def test_worker_metrics_report_stream_lag(tmp_path, redis_url, prefix, broker):
    await broker.inbound.add("metrics", "w1", {"metrics": b"\x80", "step": "0"})
    mport = free_port()
    worker = Child(
        ["worker", "--redis-url", redis_url, "--prefix", prefix, "--metrics-port", str(mport)],
        str(tmp_path / "worker.log"),
    ).start()
    try:

        def recorded():
            try:
                samples = scrape(mport)
            except OSError:
                return None
            return samples.get(("combiner_records_total", (("stream", "metrics"),)))

        assert await asyncio.to_thread(wait_for, recorded, 20, 0.1, "a scraped record count") == 1
        samples = await asyncio.to_thread(scrape, mport)
        assert samples[("combiner_stream_lag_entries", (("stream", "metrics"),))] == 0
    finally:
        worker.stop()


async def test_status_json_describes_a_known_cluster(make_replica, broker, redis_url, prefix):
    replica = await make_replica()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stub = pb_grpc.CombinerClientStub(channel)
        await stub.PollAndReport(pb.ActivityReport(node_id="on1"), metadata=meta("on1"))
        await stub.PollAndReport(pb.ActivityReport(node_id="on2"), metadata=meta("on2"))
        await stub.Announce(
            pb.ClientAnnounceRequest(client_id="gone", type="Connect"), metadata=meta("gone")
        )
        await stub.Announce(
            pb.ClientAnnounceRequest(client_id="gone", type="Disconnect"), metadata=meta("gone")
        )
        stream = stub.TaskStream(pb.ClientAvailableMessage(client_id="st1"), metadata=meta("st1"))
        corr = await broker.tasks.push("st1", "Fedn_Validation", model_id="m")
        assert (await stream.read()).correlation_id == corr
        # a stale client: seen long ago
        await broker._redis.zadd(
            broker._keys.clients(broker._keys.partition_of("old")), {"old": 1.0}
        )
        await replica.register(lease=30)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "combiner", "status", "--json",
             "--redis-url", redis_url, "--prefix", prefix],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        stream.cancel()
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert [r["id"] for r in view["replicas"]] == [replica.broker.replica_id]
    assert view["replicas"][0]["streams"] == 1
    # on1, on2 polled, st1 streams; gone said Disconnect (no longer counted)
    assert view["replicas"][0]["clients"] == 3
    assert view["clients"]["online"] == ["on1", "on2", "st1"]
    assert view["clients"]["offline"] == ["gone", "old"]
    assert view["streams"]["presence"]["length"] == 3  # connect, disconnect, stream open
    assert view["current_session"] is None and view["sessions"] == []
    redis = view["redis"]
    port = urlsplit(redis_url).port
    (master,) = redis["masters"]
    assert master["version"][0].isdigit()
    assert master == {"address": f"127.0.0.1:{port}", "role": "master",
                      "version": master["version"], "replicas": 0}  # fmt: skip
    assert (redis["topology"], redis["partitions"], redis["schema"]) == ("standalone", 1, 2)
    assert redis["durability"] == "local"


async def test_status_client_shows_its_latest_records(tmp_path, stubs, broker, redis_url, prefix):
    status = pb.Status(client_id="rc1", status="training started", log_level=pb.LogLevel.INFO)
    await stubs.combiner.SendStatus(status, metadata=meta("rc1"))
    telemetry = pb.TelemetryMessage(
        client_id="rc1", telemetries=[pb.TelemetryElem(key="cpu_usage", value=12.5)]
    )
    await stubs.combiner.SendTelemetryMessage(telemetry, metadata=meta("rc1"))
    worker = Child(
        ["worker", "--redis-url", redis_url, "--prefix", prefix, "--log-format", "json"],
        str(tmp_path / "worker.log"),
    ).start()
    try:

        def shown():
            done = subprocess.run(
                [sys.executable, "-m", "combiner", "status", "--client", "rc1",
                 "--redis-url", redis_url, "--prefix", prefix],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            view = json.loads(done.stdout)
            latest = view["latest"]
            return view if latest["statuses"] and latest["telemetry"] else None

        view = await asyncio.to_thread(wait_for, shown, 20, 0.2, "the client's records")
    finally:
        worker.stop()
    assert view["online"] is True and view["record"]["name"] == "rc1"
    assert view["latest"]["statuses"][0]["status"] == "training started"
    assert view["latest"]["statuses"][0]["log_level"] == "INFO"
    assert view["latest"]["telemetry"][0]["telemetries"] == {"cpu_usage": 12.5}
    # --log-format json: every log line of the worker is one JSON object
    lines = (tmp_path / "worker.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    assert any(e["msg"].startswith("worker ") and e["level"] == "info" for e in events)


def test_status_of_an_unknown_client_is_a_clear_error(redis_url, prefix):
    done = subprocess.run(
        [sys.executable, "-m", "combiner", "status", "--client", "nobody",
         "--redis-url", redis_url, "--prefix", prefix],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "no client 'nobody'" in done.stderr
    assert "Traceback" not in done.stderr
