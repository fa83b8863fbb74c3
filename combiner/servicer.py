"""CombinerClient: every RPC of the seed's control service, translated to broker calls.

Each inbound message is answered only after it is in Redis. Behaviour follows
docs/protocol.md §4; section numbers below refer to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from broker import Broker, InvalidInput
from broker.errors import NotReady
from broker.limits import TEXT_BYTES, check, check_ids
from broker.records import Task
from combiner import __version__
from combiner.auth import Caller, bind, current_caller
from combiner.metrics import OPEN_STREAMS, STALLED_STREAMS
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc

log = logging.getLogger("combiner")


def identity(context, body_id: str) -> tuple[str, str]:
    """The client id (body first, then the client-id/client metadata) and its name (§5).
    With a caller (tokens on), every client id the call names, body and metadata, must be
    the token's (else PermissionDenied), and the token's is the id, named or not."""
    # a comprehension, not dict(): some calls hand a grpc.aio.Metadata, whose keys() are
    # not what its __getitem__ takes
    meta = {k: v for k, v in (context.invocation_metadata() or ())}
    caller = current_caller.get()
    if caller is not None:
        bind(
            caller,
            body=body_id,
            metadata_client_id=meta.get("client-id", ""),
            metadata_client=meta.get("client", ""),
        )
        name = meta.get("name", "")
        check_ids(client_id=caller.client_id, name=name)
        return caller.client_id, name
    client_id = body_id or meta.get("client-id", "") or meta.get("client", "")
    if not client_id:
        raise InvalidInput("client id is empty: set it in the message or the client-id metadata")
    name = meta.get("name", "")
    check_ids(client_id=client_id, name=name)  # before any write (the broker checks again)
    return client_id, name


# What a protobuf Timestamp may hold: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_TS_SECONDS = range(-62_135_596_800, 253_402_300_800)
_TS_NANOS = range(1_000_000_000)


def timestamp(ts) -> str:
    """A protobuf Timestamp as an ISO string ('' when unset). One outside the range a
    Timestamp may hold is bad input (INVALID_ARGUMENT), which retrying cannot fix."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    if ts.seconds not in _TS_SECONDS or ts.nanos not in _TS_NANOS:
        raise InvalidInput(
            f"timestamp out of range: seconds={ts.seconds}, nanos={ts.nanos} (a Timestamp "
            "holds the years 1-9999 and nanos 0-999999999)"
        )
    return ts.ToDatetime().isoformat() + "Z"


def task_request(task: Task) -> pb.TaskRequest:
    return pb.TaskRequest(
        correlation_id=task.correlation_id,
        type=task.type,
        model_id=task.model_id,
        data=task.data,
        session_id=task.session_id,
        round_id=task.round_id,
        timestamp=task.timestamp,
        client_id=task.client_id,
    )


def version_ok(client_version: str) -> bool:
    """Any 1.x client speaks this protocol."""
    return client_version.split(".", 1)[0] == "1"


class StalledStream(Exception):
    """A TaskStream's client did not take a message within the write timeout; `write` is
    that write, still pending in the transport."""

    def __init__(self, write: asyncio.Future) -> None:
        super().__init__("task stream not read")
        self.write = write


def strict() -> bool:
    """Whether this call has a caller (tokens on): then a client acts only on its own tasks
    and models, and what it may not touch is refused with nothing written."""
    return current_caller.get() is not None


class StreamEnded(Exception):
    """Why an open TaskStream must end now: its status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class OpenStream:
    """One TaskStream as the revocation listener sees it: its wake-up event and caller."""

    __slots__ = ("caller", "event", "revoked")

    def __init__(self, caller: Caller, event: asyncio.Event) -> None:
        self.caller = caller
        self.event = event
        self.revoked = False


class CombinerServicer(pb_grpc.CombinerClientServicer):
    def __init__(
        self,
        broker: Broker,
        stream_keepalive: float = 15.0,
        stream_write_timeout: float = 30.0,
        auth=None,
        max_streams_per_client: int = 4,
    ) -> None:
        self.broker = broker
        self.stream_keepalive = stream_keepalive
        self.stream_write_timeout = stream_write_timeout
        self.open_streams: dict[str, int] = {}  # client id -> local streams (for leases)
        self.max_streams_per_client = max_streams_per_client
        self._stream_slots: dict[str, int] = {}  # client id -> streams begun here (the cap)
        self._by_token: dict[str, set[OpenStream]] = {}  # token id -> its open streams
        self._closing = asyncio.Event()
        self._auth = auth
        if auth is not None:
            auth.on_revoke(self._revoked)

    def _revoked(self, token_ids: set[str]) -> None:
        """A revocation reached this replica: end the TaskStreams opened with those tokens
        (each wakes, sees `revoked` and ends with UNAUTHENTICATED)."""
        for token_id in token_ids:
            for stream in self._by_token.get(token_id, ()):
                stream.revoked = True
                stream.event.set()

    def _take_stream_slot(self, client_id: str) -> None:
        """Count a new TaskStream of client_id, or refuse it past the cap with
        FAILED_PRECONDITION: the 1.0.0 client retries that after a pause (RESOURCE_EXHAUSTED
        would end its stream thread), so a client reconnecting before its old stream is
        noticed gone gets in once that one is, while a flood gets nothing more."""
        held = self._stream_slots.get(client_id, 0)
        if held >= self.max_streams_per_client:
            raise NotReady(
                f"client {client_id[:80]!r} has {held} task streams open on this replica, "
                "the most it may; try again later"
            )
        self._stream_slots[client_id] = held + 1

    def _give_stream_slot(self, client_id: str) -> None:
        left = self._stream_slots.get(client_id, 1) - 1
        if left:
            self._stream_slots[client_id] = left
        else:
            self._stream_slots.pop(client_id, None)

    def close_streams(self) -> None:
        """End every open TaskStream (drain). Each ends with FAILED_PRECONDITION, which
        the 1.0.0 client retries by opening a new stream (through the load balancer, on
        another replica). Ending it with OK would end the client's run, and UNAVAILABLE
        would kill it (docs/protocol.md §3.2, §4.11)."""
        self._closing.set()
        self.broker.wakeups.wake_all()  # each stream sees _closing when it wakes

    # --- results (§4.6-§4.8) -------------------------------------------------------------

    async def SendModelUpdate(self, request: pb.ModelUpdate, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        kept = await self.broker.inbound.add_result(
            "updates",
            client_id,
            request.correlation_id,
            {"model_update_id": request.model_update_id, "result_meta": request.meta},
            {
                "correlation_id": request.correlation_id,
                "model_id": request.model_id,
                "model_update_id": request.model_update_id,
                "session_id": request.session_id,
                "round_id": request.round_id,
                "meta": request.meta,
                "config": request.config,
                "timestamp": timestamp(request.timestamp),
            },
            name,
            require_model=request.model_update_id,
            strict=strict(),
        )
        if not kept:
            log.info(
                "update %s from %s not counted (unknown, duplicate or not uploaded)",
                request.correlation_id,
                client_id,
            )
        return pb.Response(response="Model update received.")

    async def _result(self, kind: str, request, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        await self.broker.inbound.add_result(
            kind,
            client_id,
            request.correlation_id,
            {"result": request.data},
            {
                "correlation_id": request.correlation_id,
                "model_id": request.model_id,
                "session_id": request.session_id,
                "data": request.data,  # stored as-is, even if it is not valid JSON (§10)
                "timestamp": timestamp(request.timestamp),
            },
            name,
            strict=strict(),
        )
        return pb.Response(response=f"{kind[:-1].capitalize()} received.")

    async def SendModelValidation(self, request: pb.ModelValidation, context) -> pb.Response:
        return await self._result("validations", request, context)

    async def SendModelPrediction(self, request: pb.ModelPrediction, context) -> pb.Response:
        return await self._result("predictions", request, context)

    # --- records (§4.9, §4.10) -----------------------------------------------------------

    async def SendModelMetric(self, request: pb.ModelMetric, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        fields = {
            "metrics": {m.key: m.value for m in request.metrics},  # the broker packs it
            "step": str(request.step.value) if request.HasField("step") else "",
            "model_id": request.model_id,
            "round_id": request.round_id,
            "session_id": request.session_id,
            "timestamp": timestamp(request.timestamp),
        }
        await self.broker.inbound.add("metrics", client_id, fields, name)
        return pb.Response()

    async def SendAttributeMessage(self, request: pb.AttributeMessage, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        fields = {
            "attributes": {a.key: a.value for a in request.attributes},
            "timestamp": timestamp(request.timestamp),
        }
        await self.broker.inbound.add("attributes", client_id, fields, name)
        return pb.Response()

    async def SendTelemetryMessage(self, request: pb.TelemetryMessage, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        fields = {
            "telemetries": {t.key: t.value for t in request.telemetries},
            "timestamp": timestamp(request.timestamp),
        }
        await self.broker.inbound.add("telemetry", client_id, fields, name)
        return pb.Response()

    async def SendStatus(self, request: pb.Status, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        fields = {
            "status": request.status,
            "log_level": pb.LogLevel.Name(request.log_level)
            if request.log_level in pb.LogLevel.values()
            else str(request.log_level),
            "type": request.type,
            "timestamp": timestamp(request.timestamp),
        }
        await self.broker.inbound.add("statuses", client_id, fields, name)
        return pb.Response(response="Status received.")

    # --- control (§4.1, §4.2, §4.11) -----------------------------------------------------

    async def Announce(self, request: pb.ClientAnnounceRequest, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        check("Announce parameters", request.parameters, TEXT_BYTES)
        kind = request.type
        if kind == "VersionCheck":
            try:
                params = json.loads(request.parameters) if request.parameters else {}
            except ValueError:
                params = {}
            except RecursionError:  # e.g. "[" * 50000: fits the limit, can never parse
                raise InvalidInput("Announce parameters: JSON nested too deeply") from None
            version = str(params.get("client-version", "")) if isinstance(params, dict) else ""
            ok = version_ok(version)
            await self.broker.presence.touch(client_id, name)
            message = "compatible" if ok else f"client version {version!r} is not supported (1.x)"
            return pb.Response(
                response=message,
                parameters=json.dumps({"success": ok, "version": __version__}),
            )
        if kind == "Connect":
            await self.broker.presence.connect(client_id, name)
            log.info("client %s connected", client_id)
            return pb.Response(response="Connected.")
        if kind == "Disconnect":
            await self.broker.presence.disconnect(client_id)
            log.info("client %s disconnected", client_id)
            return pb.Response(response="Disconnected.")
        # Unknown type: OK and empty; an error on Connect would be retried forever (§4.1).
        return pb.Response()

    async def PollAndReport(self, request: pb.ActivityReport, context) -> pb.TaskRequest:
        client_id, name = identity(context, request.node_id)
        reply = await self.broker.tasks.poll(
            client_id,
            name=name,
            correlation_id=request.correlation_id,
            status=request.status,
            done=request.done,
            response=request.response,
            strict=strict(),
        )
        if reply.task is not None:
            log.debug("task %s (%s) -> %s", reply.task.correlation_id, reply.task.type, client_id)
            return task_request(reply.task)
        if reply.echo:
            return pb.TaskRequest(correlation_id=reply.echo, status=reply.status)
        return pb.TaskRequest()

    async def SendHeartbeat(self, request: pb.Heartbeat, context) -> pb.Response:
        client_id, name = identity(context, request.client_id)
        await self.broker.presence.touch(client_id, name)
        return pb.Response(response="Heartbeat received.")

    async def _write(self, context, message: pb.TaskRequest) -> None:
        """Send one message on a TaskStream. context.write() returns once HTTP/2 flow control
        lets the message out, so a client that does not read blocks it: past the write
        timeout the stream is stalled (StalledStream) and takes nothing more from Redis."""
        write = asyncio.ensure_future(context.write(message))
        done, _ = await asyncio.wait([write], timeout=self.stream_write_timeout)
        if not done:
            raise StalledStream(write)
        write.result()

    async def TaskStream(self, request: pb.ClientAvailableMessage, context) -> None:
        client_id, name = identity(context, request.client_id)
        self._take_stream_slot(client_id)  # before anything is written
        try:
            await self._task_stream(client_id, name, current_caller.get(), context)
        except StreamEnded as ended:
            log.info("client %s: task stream ended: %s", client_id, ended)
            await context.abort(ended.code, str(ended))
        finally:
            self._give_stream_slot(client_id)

    def _check_caller(self, stream: OpenStream | None) -> None:
        """End the stream once its token is revoked (UNAUTHENTICATED: the client must stop)
        or expired. An expired one ends with FAILED_PRECONDITION, which the 1.0.0 client
        retries by opening the stream again, with the access token it refreshed meanwhile
        (it refreshes 30 s before expiry, for each new call; docs/protocol.md §15)."""
        if stream is None:
            return
        if stream.revoked or (
            self._auth is not None and self._auth.is_revoked(stream.caller.token_id)
        ):
            raise StreamEnded(grpc.StatusCode.UNAUTHENTICATED, "token revoked")
        if stream.caller.expires_at <= time.time():
            raise StreamEnded(
                grpc.StatusCode.FAILED_PRECONDITION,
                "access token expired: open the stream again with a fresh one",
            )

    async def _task_stream(self, client_id: str, name: str, caller: Caller | None, context):
        broker = self.broker
        # Tasks an earlier stream of this client took but never got an answer for (e.g.
        # its replica was killed before the client read them, or it was ended as stalled)
        # go back to the queue first (broker/lua/stream_recover.lua). This runs before the
        # stream counts as open and before its first take, so it never puts back a task
        # this stream took.
        recovered = await broker.tasks.recover_for_stream(client_id)
        if recovered:
            log.info("client %s: %d unanswered streamed task(s) queued again", client_id, recovered)
        event = broker.wakeups.register(client_id)  # set at once: read the queue first
        stream = None
        if caller is not None:  # revocation ends it (self._revoked sets its event)
            stream = OpenStream(caller, event)
            self._by_token.setdefault(caller.token_id, set()).add(stream)
        self.open_streams[client_id] = self.open_streams.get(client_id, 0) + 1
        OPEN_STREAMS.inc()
        sent: set[str] = set()
        try:
            # a revocation may have arrived while the recovery ran
            self._check_caller(stream)
            # inside the try: if Redis fails here, the stream is not left counted as open
            await broker.presence.connect(client_id, name)
            await broker.presence.renew_streams([client_id], lease=3 * self.stream_keepalive)
            log.info("client %s opened a task stream", client_id)
            while True:
                wait = self.stream_keepalive
                if caller is not None:  # wake when the token expires, too
                    wait = max(0.0, min(wait, caller.expires_at - time.time()))
                # One timer per wait, not a task and a wait() set: thousands of streams
                # wake at once when a round starts.
                try:
                    async with asyncio.timeout(wait):
                        await event.wait()
                except TimeoutError:
                    self._check_caller(stream)
                    # Application-level keepalive: an empty TaskRequest, which the client
                    # ignores (no type), keeps proxies from cutting an idle stream.
                    await self._write(context, pb.TaskRequest())
                    continue
                if self._closing.is_set():  # close_streams() woke every stream
                    break
                self._check_caller(stream)
                event.clear()
                # One bounded take at a time, written before the next: the replica holds
                # at most one take's worth of task data per stream (STREAM_TAKE_BYTES).
                tasks, more = await broker.tasks.take_for_stream(client_id)
                for task in tasks:
                    if task.correlation_id in sent:  # de-duplicate by correlation id
                        continue
                    sent.add(task.correlation_id)
                    await self._write(context, task_request(task))
                if more:
                    event.set()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "replica is draining; open the stream again"
            )
        except StalledStream as stalled:
            # The tasks this stream took and did not send stay 'delivered' in its
            # stream-delivered set: the client's next stream queues them again
            # (stream_recover.lua), as it does those the client got here but never answered.
            # grpc cannot send a status while a write is pending, and a server-side
            # handler cannot reset its stream, so the status follows once the client reads
            # the pending message (or the call ends when it cancels). Until then the replica
            # holds that one message and nothing else for this stream.
            STALLED_STREAMS.inc()
            log.warning("client %s: task stream not read, ending it", client_id)
            try:
                await stalled.write
            except Exception:  # the client went away: nothing left to tell it
                return
            # FAILED_PRECONDITION: the 1.0.0 client opens a new stream (docs/protocol.md §3)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"task stream not read for {self.stream_write_timeout:g} s; open it again",
            )
        finally:
            log.info("client %s task stream closed", client_id)
            OPEN_STREAMS.dec()
            broker.wakeups.unregister(client_id, event)
            if stream is not None:
                streams = self._by_token.get(caller.token_id)
                if streams is not None:
                    streams.discard(stream)
                    if not streams:
                        del self._by_token[caller.token_id]
            left = self.open_streams.get(client_id, 1) - 1
            if left:
                self.open_streams[client_id] = left
            else:
                self.open_streams.pop(client_id, None)
                try:
                    await broker.presence.end_stream(client_id)
                except Exception as exc:  # the stream is over either way
                    log.warning("could not end stream lease of %s: %s", client_id, exc)


def add_to_server(servicer: CombinerServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_CombinerClientServicer_to_server(servicer, server)
