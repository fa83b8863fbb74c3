"""A reference asyncio client: speaks the protocol like scaleout 1.0.0 in both modes
(polling with PollAndReport, or streaming with TaskStream + heartbeats), but retries and
reconnects after errors instead of dying (the 1.0.0 client dies on UNAVAILABLE,
docs/protocol.md §3.2). Used by tests, bench/ and the demo.

Two ways in, as the 1.0.0 client: API mode (``api_url`` + ``token``: trade the refresh token
for an access token at POST /api/auth/refresh, get assigned at POST /api/v1/clients/add, whose
answer names the client id and the address to dial, then send ``authorization: Bearer
<access>`` on every RPC and refresh 30 s before expiry), or direct attach to ``target`` with
no token (for replicas started with --insecure).

Training, validation, prediction and custom work are plain functions on numpy arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import grpc
import jwt

from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from workers.fedavg import load_npz, save_npz

log = logging.getLogger("refclient")

CHUNK = 1024 * 1024
RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
}

Train = Callable[[list, dict], tuple[list, int]]
REFRESH_MARGIN = 30.0  # seconds before expiry the access token is renewed (as 1.0.0 does)


class JoinRefused(RuntimeError):
    """The HTTP side refused the token or the assignment for good (401, 403, 400, 406...)."""


@dataclass
class Counters:
    tasks: int = 0
    updates: int = 0
    validations: int = 0
    predictions: int = 0
    failed: int = 0
    retries: int = 0
    polls: int = 0
    streams_opened: int = 0
    received: list = field(default_factory=list)  # correlation ids, in order


def _identity_train(arrays: list, settings: dict) -> tuple[list, int]:
    return arrays, 1


class ReferenceClient:
    def __init__(
        self,
        target: str,
        client_id: str,
        *,
        name: str = "",
        mode: str = "poll",
        poll_interval: float = 1.0,
        heartbeat_interval: float = 2.0,
        train: Train = _identity_train,
        validate: Callable[[list], dict] | None = None,
        predict: Callable[[list], dict] | None = None,
        custom: dict[str, Callable[[dict], dict]] | None = None,
        max_backoff: float = 2.0,
        round_robin: bool = False,
        channel: grpc.aio.Channel | None = None,
        api_url: str = "",
        token: str = "",
        root_certificates: bytes | None = None,
    ) -> None:
        if mode not in ("poll", "stream"):
            raise ValueError("mode must be 'poll' or 'stream'")
        self.target = target
        self.client_id = client_id
        self.name = name or client_id
        self.mode = mode
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.train = train
        self.validate = validate or (lambda arrays: {"arrays": len(arrays)})
        self.predict = predict or (lambda arrays: {"prediction": 0})
        self.custom = custom or {}
        self.max_backoff = max_backoff
        self.round_robin = round_robin  # spread calls over every address in the target
        self.counters = Counters()
        self.api_url = api_url.rstrip("/")
        self.token = token  # the refresh token (API mode)
        self.root_certificates = root_certificates  # TLS roots when the port is 443
        self.access_token = ""
        self.access_expires = 0.0
        self.assignment: dict = {}
        self.tls = False
        self._channel = channel  # shared by many clients (load tests), else one per run()
        self._set_metadata()

    def _set_metadata(self) -> None:
        """What goes with every RPC: the client id, name and, in API mode, the token."""
        metadata = [("client", self.client_id), ("client-id", self.client_id), ("name", self.name)]
        if self.access_token:
            metadata.append(("authorization", f"Bearer {self.access_token}"))
        self.metadata = tuple(metadata)

    # --- API mode: token exchange and assignment ------------------------------------------

    async def _http(self, http: aiohttp.ClientSession, path: str, body: dict, headers=None):
        """POST to the HTTP side until it answers for good: retries connection errors, 429,
        503 and 203 ("try again", docs/operations.md "The HTTP side"); raises JoinRefused
        on any other non-200."""
        delay = 0.2
        while True:
            try:
                async with http.post(self.api_url + path, json=body, headers=headers) as resp:
                    try:
                        answer = await resp.json(content_type=None)
                    except ValueError:
                        answer = {}
                    answer = answer if isinstance(answer, dict) else {}
                    if resp.status == 200:
                        return answer
                    if resp.status not in (203, 429, 503) and resp.status < 500:
                        message = answer.get("message", "")
                        raise JoinRefused(f"{path}: {resp.status} {message}".strip())
                    wait = float(resp.headers.get("Retry-After", delay) or delay)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("%s: %s: %s", self.client_id, path, exc)
                wait = delay
            self.counters.retries += 1
            await asyncio.sleep(min(wait, 10.0))
            delay = min(delay * 2, self.max_backoff)

    async def refresh(self, http: aiohttp.ClientSession) -> None:
        """A new access token for the refresh token; its expiry read from the JWT (unverified,
        as the 1.0.0 client does), else from expires_in."""
        answer = await self._http(
            http, "/api/auth/refresh", {"refresh_token": self.token, "role": "client"}
        )
        access = answer.get("access_token") or answer.get("access")
        if not isinstance(access, str) or not access:
            raise JoinRefused("/api/auth/refresh: no access token in the answer")
        try:
            expires = float(jwt.decode(access, options={"verify_signature": False})["exp"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            expires = time.time() + float(answer.get("expires_in") or 3600)
        self.access_token, self.access_expires = access, expires
        self._set_metadata()

    async def join(self, http: aiohttp.ClientSession) -> dict:
        """Refresh, then get assigned: the answer's client id becomes this client's."""
        await self.refresh(http)
        body = {
            "name": self.name,
            "client_id": self.client_id,
            "preferred_combiner": "",
            "package": "local",
            "client_version": "1.0.0",
        }
        headers = {"Authorization": f"Bearer {self.access_token}"}
        answer = await self._http(http, "/api/v1/clients/add", body, headers)
        self.assignment = answer
        if answer.get("client_id"):
            if self.name == self.client_id:
                self.name = answer["client_id"]
            self.client_id = answer["client_id"]
        if not self.target:  # else keep the given target (e.g. round-robin over replicas)
            self.target = f"{answer.get('public_hostname', '')}:{answer.get('port', '')}"
            self.tls = answer.get("port") == 443  # what the 1.0.0 client does
        self._set_metadata()
        return answer

    async def _keep_fresh(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait = max(1.0, self.access_expires - REFRESH_MARGIN - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                await self.refresh(http)
            except JoinRefused as exc:  # revoked: the next RPCs are refused, the loops end
                log.warning("%s: token refresh refused: %s", self.client_id, exc)
                return

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable, *args, attempts: int | None = None, **kwargs):
        """Await fn(...) and retry retryable errors with backoff (forever unless attempts)."""
        delay, n = 0.1, 0
        while True:
            try:
                return await fn(*args, **kwargs)
            except grpc.aio.AioRpcError as exc:
                n += 1
                if exc.code() not in RETRY or (attempts is not None and n >= attempts):
                    raise
                self.counters.retries += 1
                log.debug("%s: %s, retry in %.1fs", self.client_id, exc.code().name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    async def run(self, stop: asyncio.Event) -> None:
        options = [
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 30000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ]
        if self.round_robin:
            options.append(("grpc.lb_policy_name", "round_robin"))
        http = fresh = None
        if self.api_url:
            http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            if http is not None:
                await self.join(http)
                fresh = asyncio.create_task(self._keep_fresh(http, stop))
            own = self._channel is None
            if not own:
                channel = self._channel
            elif self.tls:
                creds = grpc.ssl_channel_credentials(self.root_certificates)
                channel = grpc.aio.secure_channel(self.target, creds, options=options)
            else:
                channel = grpc.aio.insecure_channel(self.target, options=options)
            self.stub = pb_grpc.CombinerClientStub(channel)
            self.models = pb_grpc.ModelServiceStub(channel)
            runner = self._poll_loop(stop) if self.mode == "poll" else self._stream_loop(stop)
            try:
                await runner
            finally:
                if self.mode == "poll":
                    # best effort on the way out, also when the run was cancelled
                    errors = (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError)
                    with contextlib.suppress(*errors):
                        async with asyncio.timeout(2):
                            await self._announce("Disconnect")
                if own:
                    await channel.close()
        finally:
            if fresh is not None:
                fresh.cancel()
            if http is not None:
                await http.close()

    async def _announce(self, kind: str) -> pb.Response:
        params = json.dumps({"client-version": "1.0.0"}) if kind == "VersionCheck" else ""
        request = pb.ClientAnnounceRequest(client_id=self.client_id, type=kind, parameters=params)
        return await self.stub.Announce(request, metadata=self.metadata)

    # --- polling mode -----------------------------------------------------------------------

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        reply = await self._call(self._announce, "VersionCheck")
        if not json.loads(reply.parameters or "{}").get("success"):
            raise RuntimeError(f"version check refused: {reply.response}")
        await self._call(self._announce, "Connect")
        current: tuple[str, asyncio.Task] | None = None
        while not stop.is_set():
            report = pb.ActivityReport(node_id=self.client_id)
            if current is not None:
                corr, task = current
                report.correlation_id = corr
                if task.done():
                    report.done = True
                    ok, response = task.result()
                    report.status = "COMPLETED" if ok else "FAILED"
                    report.response = response
                else:
                    report.status = "RUNNING"
            reply = await self._call(self.stub.PollAndReport, report, metadata=self.metadata)
            self.counters.polls += 1
            if report.done:
                current = None
            if current is None and reply.correlation_id:
                self.counters.received.append(reply.correlation_id)
                current = (reply.correlation_id, asyncio.create_task(self._run_task(reply)))
            elif current is not None and reply.status in ("INTERRUPTED", "TIMEOUT"):
                current[1].cancel()
            if current is not None and current[1].done():
                continue  # report the result at once
            waiters = [asyncio.ensure_future(stop.wait())]
            if current is not None:
                waiters.append(current[1])
            await asyncio.wait(waiters, timeout=self.poll_interval, return_when="FIRST_COMPLETED")
            waiters[0].cancel()
        if current is not None:
            current[1].cancel()

    # --- streaming mode ---------------------------------------------------------------------

    async def _stream_loop(self, stop: asyncio.Event) -> None:
        beat = asyncio.create_task(self._heartbeats(stop))
        seen: set[str] = set()
        try:
            while not stop.is_set():
                call = self.stub.TaskStream(
                    pb.ClientAvailableMessage(client_id=self.client_id), metadata=self.metadata
                )
                self.counters.streams_opened += 1
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    while True:
                        read = asyncio.ensure_future(call.read())
                        done, _ = await asyncio.wait({read, stopper}, return_when="FIRST_COMPLETED")
                        if read not in done:
                            read.cancel()
                            call.cancel()
                            return
                        task = read.result()
                        if task is grpc.aio.EOF:
                            break
                        if not task.correlation_id or task.correlation_id in seen:
                            continue  # keepalive, or a duplicate
                        seen.add(task.correlation_id)
                        self.counters.received.append(task.correlation_id)
                        await self._run_task(task)
                except grpc.aio.AioRpcError as exc:
                    log.debug("%s: stream ended with %s", self.client_id, exc.code().name)
                finally:
                    stopper.cancel()
                if not stop.is_set():
                    await asyncio.sleep(0.2)  # the stream ended: open a new one (any replica)
        finally:
            beat.cancel()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.SendHeartbeat(
                    pb.Heartbeat(client_id=self.client_id), metadata=self.metadata
                )
            await asyncio.sleep(self.heartbeat_interval)

    # --- tasks ------------------------------------------------------------------------------

    async def _run_task(self, task: pb.TaskRequest) -> tuple[bool, str]:
        """Run one task; returns (ok, response) for the done report."""
        self.counters.tasks += 1
        try:
            if task.type == "Fedn_ModelUpdate":
                await self._train(task)
            elif task.type == "Fedn_Validation":
                arrays = await self.download(task.model_id)
                data = json.dumps(self.validate(arrays))
                result = self._result(pb.ModelValidation, task, data)
                await self._call(self.stub.SendModelValidation, result, metadata=self.metadata)
                self.counters.validations += 1
            elif task.type == "Fedn_Prediction":
                arrays = await self.download(task.model_id)
                data = json.dumps(self.predict(arrays))
                result = self._result(pb.ModelPrediction, task, data)
                await self._call(self.stub.SendModelPrediction, result, metadata=self.metadata)
                self.counters.predictions += 1
            elif task.type.startswith("Custom_") and task.type[7:] in self.custom:
                params = json.loads(task.data) if task.data else {}
                return True, json.dumps(self.custom[task.type[7:]](params))
            else:
                raise ValueError(f"Unknown task type: {task.type}")
            return True, ""
        except asyncio.CancelledError:
            return True, ""  # aborted by the server; reported like 1.0.0 does
        except Exception as exc:
            self.counters.failed += 1
            log.warning("%s: task %s failed: %s", self.client_id, task.correlation_id, exc)
            return False, json.dumps({"error": str(exc)})

    def _result(self, kind, task: pb.TaskRequest, data: str):
        return kind(
            client_id=self.client_id,
            model_id=task.model_id,
            data=data,
            correlation_id=task.correlation_id,
            session_id=task.session_id,
        )

    async def _train(self, task: pb.TaskRequest) -> None:
        settings = json.loads(task.data).get("client_settings", {}) if task.data else {}
        arrays = await self.download(task.model_id)
        new_arrays, num_examples = await asyncio.to_thread(self.train, arrays, settings)
        update_id = str(uuid.uuid4())
        await self.upload(update_id, await asyncio.to_thread(save_npz, new_arrays))
        meta = {"training_metadata": {"num_examples": num_examples}, "config": task.data}
        update = pb.ModelUpdate(
            client_id=self.client_id,
            model_id=task.model_id,
            model_update_id=update_id,
            correlation_id=task.correlation_id,
            round_id=task.round_id,
            session_id=task.session_id,
            meta=json.dumps(meta),
        )
        await self._call(self.stub.SendModelUpdate, update, metadata=self.metadata)
        self.counters.updates += 1

    async def download(self, model_id: str) -> list:
        async def once() -> bytes:
            call = self.models.Download(pb.ModelRequest(model_id=model_id), metadata=self.metadata)
            data = b"".join([chunk.data async for chunk in call])
            # tuple() first: grpc 1.78's aio Metadata yields (key, value) pairs from keys()
            checksum = dict(tuple(await call.trailing_metadata() or ())).get("checksum")
            if checksum and checksum != hashlib.sha256(data).hexdigest():
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNKNOWN, None, None, details="checksum mismatch"
                )
            return data

        return await asyncio.to_thread(load_npz, await self._call(once))

    async def upload(self, model_id: str, data: bytes, chunk: int = CHUNK) -> pb.ModelResponse:
        checksum = hashlib.sha256(data).hexdigest()
        metadata = (*self.metadata, ("model-id", model_id), ("checksum", checksum))

        async def once():
            def chunks():
                for i in range(0, len(data), chunk):
                    yield pb.FileChunk(data=data[i : i + chunk])

            reply = await self.models.Upload(chunks(), metadata=metadata)
            if reply.status != pb.ModelStatus.OK:
                raise RuntimeError(f"upload refused: {reply.message}")
            return reply

        return await self._call(once)
