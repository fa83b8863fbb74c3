"""One front-end replica: the grpc.aio server, health and reflection, and its upkeep loops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker import Broker, BrokerError
from combiner import model_service, servicer, tls
from combiner.auth import Authenticator
from combiner.errors import GuardedServer
from combiner.pb import scaleout_pb2 as pb

log = logging.getLogger("combiner")

SERVICES = ("scaleout.CombinerClient", "scaleout.ModelService")
METADATA_BYTES = 128 << 10


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 12080
    max_model_bytes: int = 1 << 30
    model_cache_bytes: int = 256 << 20
    drain_timeout: float = 10.0
    drain_delay: float = 0.0  # keep serving this long after NOT_SERVING (let the LB notice)
    stream_keepalive: float = 15.0
    stream_write_timeout: float = 30.0  # a TaskStream not read this long is ended
    reuse_port: bool = False  # SO_REUSEPORT: only for several processes on one port
    # Upload limits (docs/operations.md, "Upload limits")
    upload_idle_timeout: float = 120.0  # no chunk for this long: the upload is abandoned
    max_uploads: int = 256  # uploads in progress on this replica at once
    max_uploads_per_client: int = 2  # ... and per client id
    max_streams_per_client: int = 4  # TaskStreams one client may hold open on this replica
    # Auth and TLS (docs/security.md)
    insecure: bool = False  # no tokens: any caller may claim any client id
    http_port: int | None = None  # the HTTP side (token exchange, assignment); None: off
    public_host: str = ""  # what /api/v1/clients/add tells clients to dial (default: host)
    public_port: int = 0  # ... and its port (default: this replica's gRPC port)
    signing_key: str = ""  # Ed25519 private key file; empty: this replica mints no tokens
    access_ttl: int = 3600  # seconds an access token lives (the client refreshes 30 s early)
    audience: str = "scaleout"  # the aud claim; tokens of another deployment's aud fail
    tls_cert: str = ""  # PEM certificate chain; with tls_key: gRPC and HTTP over TLS
    tls_key: str = ""
    # The HTTP side blames failed refreshes on the last X-Forwarded-For address (behind a
    # proxy that sets it, e.g. HAProxy's `option forwardfor`), not on the proxy's own address.
    trust_forwarded_for: bool = False


def grpc_options(opts: ServeOptions) -> list[tuple[str, int]]:
    return [
        # The 1.0.0 client pings every 5 s, also without calls (docs/protocol.md §1, §12).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
        ("grpc.http2.min_ping_interval_without_data_ms", 4000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        # Metadata up to 128 KiB reaches the token check, so an oversized authorization
        # header is answered UNAUTHENTICATED like any bad token (grpc's own 16 KiB limit
        # would answer RESOURCE_EXHAUSTED); the check refuses tokens over 4 KiB unparsed.
        ("grpc.max_metadata_size", METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", METADATA_BYTES),
        # A second server on a taken port would silently share its traffic.
        ("grpc.so_reuseport", 1 if opts.reuse_port else 0),
        # Calls not yet accepted by the event loop are shed beyond these (1000 / 3000 by
        # default): a reconnect storm of thousands of TaskStreams would get CANCELLED.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
        # A connection that never finishes its (TLS) handshake is dropped after 10 s, not
        # grpc's 120 s: it holds a socket and delays the server's stop.
        ("grpc.server_handshake_timeout_ms", 10_000),
    ]


class Replica:
    """A running replica: server + servicers + upkeep, started and stopped as one
    (`async with Replica(broker, opts) as replica:`). The broker stays its owner's to close."""

    def __init__(self, broker: Broker, opts: ServeOptions) -> None:
        self.broker = broker
        self.opts = opts
        self.server = grpc.aio.server(options=grpc_options(opts))
        # None with --insecure: then nothing checks who calls (combiner/auth.py)
        self.auth = None if opts.insecure else Authenticator(broker.credentials, opts.audience)
        self.combiner = servicer.CombinerServicer(
            broker,
            opts.stream_keepalive,
            opts.stream_write_timeout,
            auth=self.auth,
            max_streams_per_client=opts.max_streams_per_client,
        )
        self.models = model_service.ModelServicer(
            broker,
            opts.max_model_bytes,
            opts.model_cache_bytes,
            upload_idle_timeout=opts.upload_idle_timeout,
            max_uploads=opts.max_uploads,
            max_uploads_per_client=opts.max_uploads_per_client,
        )
        # the token check (unless --insecure), status mapping, error logging and metrics for
        # every scaleout RPC (combiner/errors.py); health and reflection stay open
        guarded = GuardedServer(self.server, self.auth)
        servicer.add_to_server(self.combiner, guarded)
        model_service.add_to_server(self.models, guarded)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*(pb.DESCRIPTOR.services_by_name[s.split(".")[1]].full_name for s in SERVICES),
             reflection.SERVICE_NAME, health.SERVICE_NAME),
            self.server,
        )  # fmt: skip
        self.port = 0
        # --tls-cert/--tls-key, followed on disk (combiner/tls.py); the HTTP side takes its
        # SSLContext from here: self.tls.ssl_context()
        self.tls: tls.CertificateFiles | None = None
        self._tls_watch: asyncio.Task | None = None
        # The HTTP side (token exchange, assignment) on this loop: combiner/http_api.py
        self.http = None
        if opts.http_port is not None:
            from combiner.http_api import HttpApi  # aiohttp: only replicas that serve HTTP

            self.http = HttpApi(self)
        self.http_port = 0
        self._upkeep: asyncio.Task | None = None
        self.started = time.time()

    async def start(self) -> int:
        address = f"{self.opts.host}:{self.opts.port}"
        self.tls = tls.from_options(self.opts.tls_cert, self.opts.tls_key)  # TLSConfigError
        if self.tls is not None:
            self.port = self.server.add_secure_port(address, self.tls.grpc_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        if self.tls is not None:
            log.info(
                "TLS on: certificate %s (serial %x, valid until %s), renewals picked up",
                self.opts.tls_cert,
                self.tls.pair.serial,
                self.tls.pair.not_after,
            )
        else:
            log.info("TLS off: gRPC in plaintext (terminate TLS in front, e.g. HAProxy)")
        if self.auth is not None:
            await self.auth.start()
        else:
            log.warning(
                "--insecure: no tokens are checked, any caller may act as any client "
                "(loopback development only)"
            )
        self.broker.wakeups.start()
        await self.server.start()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.http is not None:
            self.http_port = await self.http.start()
        self._upkeep = asyncio.create_task(self._keep_up(), name="upkeep")
        if self.tls is not None:  # the HTTP side's SSLContexts follow renewals from here
            self._tls_watch = asyncio.create_task(self.tls.watch(), name="tls-watch")
        log.info(
            "replica %s serving on %s:%d (model store: %s)",
            self.broker.replica_id,
            self.opts.host,
            self.port,
            self.broker.models.kind,
        )
        return self.port

    async def _keep_up(self) -> None:
        """Renew this replica's lease and the leases of its open TaskStreams."""
        every = max(1.0, self.opts.stream_keepalive / 3)
        while True:
            try:
                streams = list(self.combiner.open_streams)
                await self.broker.presence.renew_streams(streams, lease=3 * every + 5)
                await self.register(lease=3 * every + 5)
            except BrokerError as exc:
                log.warning("upkeep: %s", exc)
            await asyncio.sleep(every)

    async def register(self, lease: float) -> None:
        """Announce this replica (address, open streams, clients served) for lease seconds."""
        await self.broker.replicas.register(
            address=f"{self.opts.host}:{self.port}",
            started=self.started,
            streams=len(self.combiner.open_streams),
            lease=lease,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING and keep serving for drain_delay, so the load balancer
        stops sending new calls here; then end the TaskStreams with a status the client
        retries elsewhere, refuse new calls, and let in-flight calls finish (up to grace)."""
        grace = self.opts.drain_timeout if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if grace and self.opts.drain_delay:
            await asyncio.sleep(self.opts.drain_delay)
        if self.http is not None:  # a client assigned now would dial a replica going away
            await self.http.stop()
        self.combiner.close_streams()
        for task in (self._upkeep, self._tls_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.server.stop(grace)
        if self.auth is not None:
            await self.auth.stop()
        await self.models.cache.close()
        with contextlib.suppress(Exception):
            await self.broker.replicas.deregister()

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # A normal exit drains; on an error or cancellation nobody waits for a drain.
        await self.stop(grace=None if exc_type is None else 0)


async def serve(broker: Broker, opts: ServeOptions, ready=None) -> None:
    """Run a replica until SIGTERM/SIGINT, then drain."""
    async with Replica(broker, opts) as replica:
        # Thousands of live stream coroutines make the cyclic GC run often and long (a
        # profile of a 5000-stream fan-out: p99 1.6 s -> 1.1 s); what exists at start never
        # needs it.
        gc.freeze()
        gc.set_threshold(100_000, 50, 1000)
        if ready is not None:
            ready(replica)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "draining: NOT_SERVING for %.1fs, then up to %.0fs",
            opts.drain_delay,
            opts.drain_timeout,
        )
    log.info("replica %s stopped", broker.replica_id)
