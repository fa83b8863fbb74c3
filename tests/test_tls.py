"""TLS on a replica (--tls-cert/--tls-key): gRPC over TLS, renewal without a restart, the
HTTP side's SSLContext, and clear errors for bad files. Certificates are made here."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from combiner import tls
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from combiner.server import Replica, ServeOptions
from tests.certs import TestCA, peer_serial
from tests.conftest import meta
from tests.services import eventually


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def files(ca, tmp_path):
    return ca.write_server(tmp_path / "tls")


@pytest.fixture
async def tls_replica(make_replica, files):
    return await make_replica(tls_cert=str(files.cert), tls_key=str(files.key))


def secure(port: int, ca_pem: bytes, host: str = "localhost") -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(ca_pem))


async def test_tls_replica_answers_a_secure_channel_and_refuses_plaintext(tls_replica, ca):
    assert tls_replica.tls is not None
    for host in ("localhost", "127.0.0.1"):
        async with secure(tls_replica.port, ca.pem, host) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = await pb_grpc.CombinerClientStub(channel).SendHeartbeat(
                pb.Heartbeat(client_id="c1"), metadata=meta("c1"), timeout=5
            )
            assert isinstance(reply, pb.Response)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_replica.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_a_channel_trusting_another_ca_is_refused(tls_replica):
    async with secure(tls_replica.port, TestCA("someone else").pem) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_a_renewed_certificate_is_served_without_a_restart(tls_replica, ca, files, tmp_path):
    port = tls_replica.port
    assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca) == files.serial
    renewed = ca.write_server(tmp_path / "tls")  # same paths, new key and serial
    assert renewed.serial != files.serial

    async def serves_renewed():
        return await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca) == renewed.serial

    await eventually(serves_renewed, 10, "the renewed certificate on a new connection")
    async with secure(port, ca.pem) as channel:  # and gRPC works on it
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert tls_replica.tls.reloads == 1


async def test_a_half_written_renewal_keeps_the_current_certificate(tls_replica, ca, files):
    other_cert, _ = ca.issue()  # a certificate whose key is not in --tls-key
    from cryptography.hazmat.primitives import serialization

    files.cert.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    assert tls_replica.tls.refresh() is False
    assert await asyncio.to_thread(peer_serial, "127.0.0.1", tls_replica.port, files.ca) == (
        files.serial
    )


async def test_the_http_side_context_offers_http11_and_follows_renewals(ca, tmp_path):
    files = ca.write_server(tmp_path)
    certs = tls.CertificateFiles(str(files.cert), str(files.key))
    context = certs.ssl_context()

    async def answer(reader, writer):
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    watch = asyncio.create_task(certs.watch(every=0.05))
    try:
        got = await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca, ("http/1.1",))
        assert got == files.serial

        def negotiated() -> str | None:
            import socket
            import ssl

            client = ssl.create_default_context(cafile=str(files.ca))
            client.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client.wrap_socket(raw, server_hostname="localhost") as conn:
                    return conn.selected_alpn_protocol()

        assert await asyncio.to_thread(negotiated) == "http/1.1"
        renewed = ca.write_server(tmp_path)

        async def serves_renewed():
            serial = await asyncio.to_thread(
                peer_serial, "127.0.0.1", port, files.ca, ("http/1.1",)
            )
            return serial == renewed.serial

        await eventually(serves_renewed, 10, "the renewed certificate on the HTTP side")
    finally:
        watch.cancel()
        server.close()
        await server.wait_closed()


def test_bad_files_are_clear_errors(ca, tmp_path):
    files = ca.write_server(tmp_path)
    other = ca.write_server(tmp_path / "other")
    with pytest.raises(tls.TLSConfigError, match="go together"):
        tls.from_options(str(files.cert), "")
    with pytest.raises(tls.TLSConfigError, match="No such file"):
        tls.from_options(str(tmp_path / "missing.pem"), str(files.key))
    with pytest.raises(tls.TLSConfigError, match="no PEM certificate"):
        tls.from_options(str(files.key), str(files.key))
    with pytest.raises(tls.TLSConfigError, match="no PEM private key"):
        tls.from_options(str(files.cert), str(files.cert))
    with pytest.raises(tls.TLSConfigError, match="is not the key"):
        tls.from_options(str(files.cert), str(other.key))
    assert tls.from_options("", "") is None


async def test_replica_start_refuses_bad_files(broker, tmp_path):
    replica = Replica(
        broker,
        ServeOptions(port=0, insecure=True, tls_cert=str(tmp_path / "nope.pem"), tls_key="k"),
    )
    with pytest.raises(tls.TLSConfigError, match=r"nope\.pem"):
        await replica.start()


def test_serve_with_a_missing_certificate_exits_with_a_clear_error(tmp_path):
    missing = tmp_path / "missing.pem"
    done = subprocess.run(
        [sys.executable, "-m", "combiner", "serve", "--redis-url", "redis://127.0.0.1:1/0",
         "--port", "0", "--tls-cert", str(missing), "--tls-key", str(missing)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "Error:" in done.stderr and str(missing) in done.stderr


# --- Redis over TLS (rediss://) ------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path):
    from broker.redis_process import RedisStartError, RedisTLS
    from tests.services import RedisServer

    files = TestCA().write_server(tmp_path / "redis-tls", sans=("localhost", "127.0.0.1"))
    server = RedisServer(tls=RedisTLS(str(files.cert), str(files.key), str(files.ca)))
    try:
        server.start()
    except RedisStartError as exc:
        # A redis-server built without TLS does not know the directive (Debian's 7.0 does).
        if "Bad directive" in str(exc) and "tls" in str(exc):
            pytest.skip("this redis-server is built without TLS")
        raise
    yield server
    server.close()


def test_tls_redis_refuses_plaintext(tls_redis):
    import redis

    assert tls_redis.url.startswith("rediss://") and "ssl_ca_certs=" in tls_redis.url
    assert redis.Redis.from_url(tls_redis.url).ping()
    plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=2)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()


async def test_replica_push_and_poll_over_rediss(tls_redis, prefix):
    from broker import connect
    from broker.connection import HiredisPacking
    from broker.context import Settings
    from broker.topology import make_client
    from tests.conftest import replica_at

    client = make_client(tls_redis.url)
    connection_class = client.connection_pool.connection_class
    assert issubclass(connection_class, HiredisPacking)
    assert "SSL" in connection_class.__name__
    assert await client.ping()
    await client.aclose()

    async with (
        replica_at(tls_redis.url, prefix) as (_replica, stubs),
        connect(tls_redis.url, settings=Settings(prefix=prefix)) as operator,
    ):
        corr = await operator.tasks.push("c1", "Custom_echo", data="{}")
        task = await stubs.combiner.PollAndReport(
            pb.ActivityReport(node_id="c1", status=""), metadata=meta("c1"), timeout=10
        )
        assert task.correlation_id == corr
        assert (await operator.tasks.show(corr))["state"] == "delivered"


async def test_the_http_side_serves_tls_and_a_renewed_certificate(
    make_replica, ca, files, tmp_path
):
    replica = await make_replica(tls_cert=str(files.cert), tls_key=str(files.key), http_port=0)
    port = replica.http.port
    http11 = ("http/1.1",)
    assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca, http11) == (
        files.serial
    )
    renewed = ca.write_server(tmp_path / "tls")  # same paths, new key and serial

    async def serves_renewed():
        got = await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca, http11)
        return got == renewed.serial

    await eventually(serves_renewed, 10, "the renewed certificate on the HTTP side")
