"""The control plane: the routes the published ``scaleoututil.api.client.APIClient`` calls
(docs/api.md), served by every replica's HTTP side from Redis alone, so any replica answers
any call and an operator's notebook works unchanged.

Every route needs an admin access token (``combiner token create --role admin``, traded at
``/api/auth/refresh``), except the package download and checksum that clients call
themselves (any valid token). With ``--insecure`` tokens are off, here too.

Answers are JSON; lists are ``{"count": total, "result": [...]}`` (``X-Limit`` caps the
result), counts are a bare integer, errors ``{"message": ...}`` with a 4xx status. Nothing is
written unless the whole request is valid.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
from typing import TYPE_CHECKING

from aiohttp import web

from broker import BrokerError, BrokerUnavailable, Conflict, InvalidInput, NotFound, NotReady
from broker.errors import Forbidden, TooLarge
from broker.records import Role, SessionStatus
from combiner.api_shapes import (
    API_STATUS,
    HELPER,
    MAX_CHUNK,
    SAFE_FILE,
    SESSION_CONFIG,
    ApiError,
    api_config,
    by_id,
    check_package,
    flag,
    header_limit,
    int_field,
    iso,
    limited,
    listing,
    model_dto,
    number_field,
    package_dto,
    prediction_of,
    session_config,
)  # fmt: skip
from combiner.auth import AuthUnavailable, Unauthenticated, bearer
from combiner.http_api import BadRequest, error, read_json, text_field
from combiner.openapi import INT, LIMIT, NUM, STR, Doc, obj
from combiner.views import session_view
from workers.fedavg import BadUpdate, load_npz
from workers.server_functions import SERVER_FUNCTIONS_ROLE

if TYPE_CHECKING:
    from combiner.http_api import HttpApi

log = logging.getLogger("combiner.control")

MAX_FANOUT = 10_000  # client_ids of one run_command or start_predictions

BROKER_STATUS = {NotFound: 404, InvalidInput: 400, TooLarge: 413, Conflict: 409,
                 Forbidden: 403, NotReady: 409}  # fmt: skip


def route(admin: bool = True, **doc):
    """Checks the caller's token (an admin's unless admin=False) before the handler runs,
    and turns every refusal into a JSON 4xx (a Redis outage: 503 with Retry-After). doc is
    the handler's entry in the OpenAPI description (combiner/openapi.py's Doc)."""

    def wrap(handler):
        @functools.wraps(handler)
        async def run(self: ControlApi, request: web.Request) -> web.StreamResponse:
            try:
                await self.authorize(request, admin)
                return await handler(self, request)
            except ApiError as exc:
                return error(exc.status, str(exc), exc.headers)
            except BadRequest as exc:
                return error(400, str(exc))
            except BrokerUnavailable:
                return error(503, "Redis is not answering, try again", {"Retry-After": "1"})
            except BrokerError as exc:
                return error(BROKER_STATUS.get(type(exc), 400), str(exc))

        run.admin_only = admin
        run.doc = Doc(auth="admin" if admin else "token", **doc)
        return run

    return wrap


VALIDATION_FILTERS = {
    name: STR
    for name in ("session_id", "model_id", "correlation_id", "sender.name", "sender.role",
                 "sender.client_id")
}  # fmt: skip
STATUS_FILTERS = {n: STR for n in ("session_id", "type", "sender.name", "sender.role")}
PREDICTION_FILTERS = {n: STR for n in ("model_id", "correlation_id", "client_id", "prediction_id")}


class ControlApi:
    """The APIClient's routes on one replica's HTTP side (combiner/http_api.py)."""

    def __init__(self, http: HttpApi) -> None:
        self.http = http
        self.replica = http.replica
        self.broker = http.replica.broker
        self.max_bytes = http.opts.max_model_bytes

    def add_routes(self, router: web.UrlDispatcher) -> None:
        v1 = "/api/v1"
        get, post, put = router.add_get, router.add_post, router.add_put
        get("/get_controller_status", self.controller_status)
        for path in ("clients", "combiners", "models", "packages", "sessions", "rounds",
                     "statuses", "validations", "predictions"):  # fmt: skip
            # the APIClient asks both "models/" and "models?..." (get_session by name)
            get(f"{v1}/{path}", getattr(self, f"list_{path}"))
            get(f"{v1}/{path}/", getattr(self, f"list_{path}"))
            get(f"{v1}/{path}/count", getattr(self, f"count_{path}"))
        get(f"{v1}/clients/config", self.refused)
        get(f"{v1}/models/{{id}}/download", self.download_model)
        get(f"{v1}/models/{{id}}/ancestors", self.model_ancestors)
        post(f"{v1}/models/", self.add_model)
        put(f"{v1}/helpers/active", self.set_helper)
        post(f"{v1}/file-upload/init", self.upload_init)
        post(f"{v1}/file-upload/{{upload}}/chunk", self.upload_chunk)
        post(f"{v1}/file-upload/{{upload}}/complete", self.upload_complete)
        post(f"{v1}/file-upload/{{upload}}/abort", self.upload_abort)
        get(f"{v1}/packages/active", self.active_package)
        get(f"{v1}/packages/checksum", self.package_checksum)
        get(f"{v1}/packages/download", self.download_package)
        post(f"{v1}/packages/", self.add_package)
        post(f"{v1}/sessions/", self.create_session)
        post(f"{v1}/sessions/start", self.start_session)
        post(f"{v1}/control/continue", self.step_session)
        post(f"{v1}/control/stop", self.stop_session)
        post(f"{v1}/control/run_command", self.run_command)
        post(f"{v1}/predictions/start", self.start_predictions)
        post(f"{v1}/attributes/current", self.current_attributes)
        post(f"{v1}/attributes/list", self.attribute_trail)
        post(f"{v1}/attributes/", self.refused)
        post(f"{v1}/statuses/", self.refused)
        for path in ("clients", "combiners", "models", "packages", "sessions", "rounds",
                     "statuses", "validations"):  # fmt: skip
            get(f"{v1}/{path}/{{id}}", getattr(self, f"get_{path}"))

    async def authorize(self, request: web.Request, admin: bool) -> None:
        auth = self.replica.auth
        if auth is None:  # --insecure: tokens are off
            return
        values = request.headers.getall("Authorization", ())
        try:
            caller = await auth.verify(bearer([("authorization", v) for v in values]))
        except Unauthenticated as exc:
            raise ApiError(401, str(exc), {"WWW-Authenticate": "Bearer"}) from None
        except AuthUnavailable as exc:
            raise ApiError(503, str(exc), {"Retry-After": "1"}) from None
        if admin and caller.role != Role.ADMIN:
            raise ApiError(403, "this route needs an admin token (combiner token create "
                           "--role admin)")  # fmt: skip

    @route(summary="Routes of the hosted product this tier does not serve: a 4xx with the reason")
    async def refused(self, request: web.Request) -> web.Response:
        raise ApiError(
            400 if request.method == "POST" else 404,
            f"{request.method} {request.path} is not served by this tier: clients report "
            "statuses and attributes over gRPC, and join with a token (docs/api.md)",
        )

    # --- clients and combiners -----------------------------------------------------------

    async def _clients(self, request: web.Request) -> list[dict]:
        status = request.query.get("status", "")
        if status not in ("", "online", "offline"):
            raise BadRequest("status must be online or offline")
        combiner = request.query.get("combiner", "")
        seen = await self.broker.presence.clients()
        online = set(await self.broker.presence.online())
        out = []
        for client_id, last in sorted(seen.items(), key=lambda kv: -kv[1]):
            state = "online" if client_id in online else "offline"
            if status and state != status:
                continue
            out.append({"client_id": client_id, "id": client_id, "status": state,
                        "last_seen": iso(last)})  # fmt: skip
        records = await self.broker.presence.client_map([c["client_id"] for c in out])
        for c in out:
            rec = records[c["client_id"]]
            c["name"], c["combiner"] = rec.get("name", ""), rec.get("replica", "")
        return [c for c in out if c["combiner"] == combiner] if combiner else out

    @route(
        summary="Clients seen, newest first",
        query={"status": {"enum": ["online", "offline"]}, "combiner": STR},
        headers=LIMIT,
        answers="list",
    )
    async def list_clients(self, request: web.Request) -> web.Response:
        clients = await self._clients(request)
        return limited(request, clients)

    @route(
        summary="How many clients were seen",
        query={"status": {"enum": ["online", "offline"]}, "combiner": STR},
        answers="count",
    )
    async def count_clients(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._clients(request)))

    @route(summary="One client: name, online or offline, its replica, last seen")
    async def get_clients(self, request: web.Request) -> web.Response:
        client_id = request.match_info["id"]
        record = await self.broker.presence.client(client_id)
        if not record:
            raise ApiError(404, f"no client {client_id[:100]!r}")
        online = client_id in set(await self.broker.presence.online())
        return web.json_response({
            "client_id": client_id, "id": client_id, "name": record.get("name", ""),
            "status": "online" if online else "offline", "combiner": record.get("replica", ""),
            "last_seen": iso(record.get("last_seen")),
        })  # fmt: skip

    async def _combiners(self) -> list[dict]:
        return [
            {
                "id": r.id,
                "combiner_id": r.id,
                "name": r.id,
                "address": r.address,
                "status": "online",
                "streams": r.stream_count,
                "clients": r.client_count,
                "updated_at": iso(r.seen),
            }
            for r in await self.broker.replicas.alive()
        ]

    @route(summary="The live replicas", headers=LIMIT, answers="list")
    async def list_combiners(self, request: web.Request) -> web.Response:
        combiners = await self._combiners()
        return limited(request, combiners)

    @route(summary="How many replicas are live", answers="count")
    async def count_combiners(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._combiners()))

    @route(summary="One live replica")
    async def get_combiners(self, request: web.Request) -> web.Response:
        return by_id(await self._combiners(), request.match_info["id"], "no such live replica")

    @route(summary="instructing while a session runs, else idle")
    async def controller_status(self, request: web.Request) -> web.Response:
        active = await self.broker.sessions.active()
        return web.json_response({"state": "instructing" if active else "idle",
                                  "active_sessions": active})  # fmt: skip

    # --- models --------------------------------------------------------------------------

    @route(
        summary="Global models (seeds and round models)",
        query={"session_id": STR},
        headers={**LIMIT, "X-Sort-Key": STR, "X-Sort-Order": {"enum": ["asc", "desc"]}},
        answers="list",
    )
    async def list_models(self, request: web.Request) -> web.Response:
        limit = header_limit(request)
        key = request.headers.get("X-Sort-Key", "committed_at")
        if key != "committed_at":
            raise BadRequest("X-Sort-Key: only committed_at is supported")
        order = request.headers.get("X-Sort-Order", "desc").lower()
        if order not in ("asc", "desc"):
            raise BadRequest("X-Sort-Order must be asc or desc")
        session_id = request.query.get("session_id", "")
        catalog = self.broker.catalog
        models = await catalog.models(limit, order == "desc", session_id)
        total = len(models) if session_id else await catalog.model_count()
        return listing([model_dto(m) for m in models], total)

    @route(summary="How many global models", answers="count")
    async def count_models(self, request: web.Request) -> web.Response:
        return web.json_response(await self.broker.catalog.model_count())

    async def _model(self, model_id: str) -> dict[str, str]:
        entry = await self.broker.catalog.model(model_id)
        if not entry:
            raise ApiError(404, f"no model {model_id[:100]!r} in the catalog")
        return entry

    @route(summary="One global model: parent, session, round")
    async def get_models(self, request: web.Request) -> web.Response:
        return web.json_response(model_dto(await self._model(request.match_info["id"])))

    @route(
        summary="The model trail: the model and its parents back to the seed",
        query={"include_self": {"enum": ["true", "false"]}},
        headers={**LIMIT, "X-Reverse": {"enum": ["true", "false"]}},
        answers="array",
    )
    async def model_ancestors(self, request: web.Request) -> web.Response:
        model_id = request.match_info["id"]
        await self._model(model_id)
        include_self = flag(request.query.get("include_self"), "include_self", True)
        reverse = flag(request.headers.get("X-Reverse"), "X-Reverse", False)
        trail = await self.broker.catalog.ancestors(model_id, header_limit(request), include_self)
        if reverse:  # oldest first: the seed, then each round's model
            trail.reverse()
        return web.json_response([model_dto(m) for m in trail])

    @route(summary="A model's bytes (.npz)", answers="file")
    async def download_model(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["id"]
        meta, chunks = await self.broker.models.read(model_id)
        return await self._stream(request, chunks, f"{model_id}.npz", meta.get("size"))

    async def _stream(self, request, chunks, file_name: str, size) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{file_name}"',
        })  # fmt: skip
        if size:
            response.content_length = int(size)
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    @route(summary="The model format: only numpyhelper", body=obj("helper", helper=STR))
    async def set_helper(self, request: web.Request) -> web.Response:
        helper = text_field(await read_json(request), "helper", required=True)
        if helper != HELPER:
            raise BadRequest(f"helper must be {HELPER!r}: the only model format here")
        return web.json_response({"success": True, "message": f"helper is {HELPER}"})

    async def _form(self, request: web.Request) -> dict[str, str]:
        try:
            form = await request.post()
        except ValueError:
            raise BadRequest("the body is not a form") from None
        out = {}
        for name, value in form.items():
            if not isinstance(value, str):
                raise BadRequest(f"{name} must be a plain form field")
            out[name] = value
        if not form and request.content_type == "application/json":
            return {k: v for k, v in (await read_json(request)).items() if isinstance(v, str)}
        return out

    @route(
        summary="set_active_model: a seed model from a completed upload",
        form=obj("file_token", file_token=STR, helper=STR, name=STR),
    )
    async def add_model(self, request: web.Request) -> web.Response:
        """set_active_model: a seed model from a completed upload; it becomes the active
        model (the newest in the catalog)."""
        form = await self._form(request)
        if form.get("helper", HELPER) != HELPER:
            raise BadRequest(f"helper must be {HELPER!r}")
        token = text_field(form, "file_token", required=True)
        file_name, data = await self.broker.files.read(token)
        try:
            await asyncio.to_thread(load_npz, data)
        except BadUpdate as exc:
            raise BadRequest(f"not a model this tier can aggregate: {exc}") from None
        model_id = await self.broker.models.put(data)
        entry = await self.broker.catalog.add_model(model_id, name=form.get("name") or file_name)
        await self.broker.files.discard(token)
        log.info("control: model %s added (%d bytes)", model_id, len(data))
        return web.json_response(
            {"success": True, "message": "model added and active", **model_dto(entry)}
        )

    # --- file uploads --------------------------------------------------------------------

    @route(
        summary="Begin a chunked upload",
        body=obj("file_name", "file_size", file_name=STR, file_size=INT, chunk_size=INT),
    )
    async def upload_init(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        file_name = text_field(body, "file_name", required=True)
        size = int_field(body, "file_size", 0, 1, 1 << 62)
        int_field(body, "chunk_size", MAX_CHUNK, 1, MAX_CHUNK)
        upload_id = await self.broker.files.init(file_name, size, self.max_bytes)
        return web.json_response({"upload_id": upload_id})

    @route(
        summary="One chunk of an upload",
        headers={"X-Chunk-Index": {"type": "string", "pattern": "^[0-9]+$"}},
        octets=True,
    )
    async def upload_chunk(self, request: web.Request) -> web.Response:
        try:
            index = int(request.headers.get("X-Chunk-Index", ""))
        except ValueError:
            raise BadRequest("X-Chunk-Index must be an integer") from None
        if index < 0:
            raise BadRequest("X-Chunk-Index must be >= 0")
        await self.broker.files.info(request.match_info["upload"])  # 404 before reading
        # read past aiohttp's small client_max_size, with a bound of our own
        data = await request.content.read(MAX_CHUNK + 1)
        while len(data) <= MAX_CHUNK and not request.content.at_eof():
            more = await request.content.read(MAX_CHUNK + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > MAX_CHUNK:
            raise ApiError(413, f"a chunk may hold at most {MAX_CHUNK} bytes")
        if not data:
            raise BadRequest("empty chunk")
        await self.broker.files.chunk(request.match_info["upload"], index, data)
        return web.json_response({"success": True, "chunk_index": index})

    @route(summary="End an upload: answers the file token")
    async def upload_complete(self, request: web.Request) -> web.Response:
        token = await self.broker.files.complete(request.match_info["upload"])
        return web.json_response({"success": True, "file_token": token})

    @route(summary="Drop an upload")
    async def upload_abort(self, request: web.Request) -> web.Response:
        upload_id = request.match_info["upload"]
        await self.broker.files.info(upload_id)
        await self.broker.files.discard(upload_id)
        return web.json_response({"success": True, "message": "upload aborted"})

    # --- packages ------------------------------------------------------------------------

    @route(
        summary="set_active_package: a compute package (tar.gz holding scaleout.yaml)",
        form=obj(
            "file_token", file_token=STR, helper=STR, name=STR, description=STR, file_name=STR
        ),
    )
    async def add_package(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        helper = form.get("helper") or HELPER
        if helper != HELPER:
            raise BadRequest(f"helper must be {HELPER!r}")
        token = text_field(form, "file_token", required=True)
        uploaded_name, data = await self.broker.files.read(token)
        file_name = form.get("file_name") or uploaded_name
        if not SAFE_FILE.match(file_name):
            raise BadRequest("file_name must be a plain file name (letters, digits, . _ -)")
        await asyncio.to_thread(check_package, file_name, data)
        blob = await self.broker.models.put(data)
        entry = {
            "package_id": blob,
            "model_id": blob,
            "name": text_field(form, "name") or file_name,
            "description": text_field(form, "description"),
            "helper": helper,
            "file_name": file_name,
            "checksum": hashlib.sha256(data).hexdigest(),
            "size": str(len(data)),
            "committed_at": f"{time.time():.6f}",
        }
        await self.broker.catalog.add_package(entry)
        await self.broker.files.discard(token)
        log.info("control: package %s (%s, %d bytes) is active", blob, file_name, len(data))
        return web.json_response(
            {"success": True, "message": "package added and active", **package_dto(entry, blob)}
        )

    async def _active_package(self, name: str = "") -> dict[str, str]:
        catalog = self.broker.catalog
        entry = await (catalog.package_named(name) if name else catalog.active_package())
        if not entry:
            raise ApiError(404, "no compute package" + (f" named {name[:100]!r}" if name else ""))
        return entry

    @route(summary="Compute packages, newest first", headers=LIMIT, answers="list")
    async def list_packages(self, request: web.Request) -> web.Response:
        catalog = self.broker.catalog
        active = (await catalog.active_package()).get("package_id", "")
        packages = await catalog.packages(header_limit(request))
        return listing([package_dto(p, active) for p in packages], await catalog.package_count())

    @route(summary="How many compute packages", answers="count")
    async def count_packages(self, request: web.Request) -> web.Response:
        return web.json_response(await self.broker.catalog.package_count())

    @route(summary="One compute package")
    async def get_packages(self, request: web.Request) -> web.Response:
        catalog = self.broker.catalog
        entry = await catalog.package(request.match_info["id"])
        if not entry:
            raise ApiError(404, "no such package")
        active = (await catalog.active_package()).get("package_id", "")
        return web.json_response(package_dto(entry, active))

    @route(summary="The active compute package")
    async def active_package(self, request: web.Request) -> web.Response:
        entry = await self._active_package()
        return web.json_response(package_dto(entry, entry["package_id"]))

    @route(admin=False, summary="SHA-256 of the active (or named) package", query={"name": STR})
    async def package_checksum(self, request: web.Request) -> web.Response:
        entry = await self._active_package(request.query.get("name", ""))
        return web.json_response({"checksum": entry["checksum"], "file_name": entry["file_name"]})

    @route(
        admin=False,
        summary="The active (or named) package's bytes",
        query={"name": STR},
        answers="file",
    )
    async def download_package(self, request: web.Request) -> web.StreamResponse:
        entry = await self._active_package(request.query.get("name", ""))
        meta, chunks = await self.broker.models.read(entry["model_id"])
        return await self._stream(request, chunks, entry["file_name"], meta.get("size"))

    # --- sessions ------------------------------------------------------------------------

    async def _session_dto(self, session_id: str) -> dict:
        record = await self.broker.sessions.get(session_id)
        if record is None:
            raise ApiError(404, f"no session {session_id[:100]!r}")
        config = api_config(record.config)
        config["model_id"] = record.seed_model_id
        return {
            "session_id": record.id, "id": record.id, "name": record.name or record.id,
            "status": API_STATUS.get(record.status, record.status), "state": record.status,
            "seed_model_id": record.seed_model_id, "model_id": record.model_id,
            "current_round": record.round_number, "committed_at": iso(record.created_at),
            "finished_at": iso(record.finished_at), "error": record.error,
            "session_config": config,
        }  # fmt: skip

    @route(
        summary="Sessions, newest first, or the one with this name",
        query={"name": STR},
        headers=LIMIT,
        answers="list",
    )
    async def list_sessions(self, request: web.Request) -> web.Response:
        sessions = self.broker.sessions
        name = request.query.get("name")
        if name is not None:
            found = await sessions.by_name(name)
            ids = [found] if found else []
        else:
            ids = await sessions.newest(header_limit(request))
        items = [await self._session_dto(s) for s in ids if await sessions.get(s)]
        return listing(items, len(items) if name is not None else await sessions.count())

    @route(summary="How many sessions", answers="count")
    async def count_sessions(self, request: web.Request) -> web.Response:
        return web.json_response(await self.broker.sessions.count())

    @route(summary="One session: status (Created, Started, Finished, Failed, Stopped), config")
    async def get_sessions(self, request: web.Request) -> web.Response:
        return web.json_response(await self._session_dto(request.match_info["id"]))

    @route(
        summary="A new session, not started",
        body=obj(name=STR, seed_model_id=STR, session_id=STR, session_config=SESSION_CONFIG),
        ok=(201,),
    )
    async def create_session(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        config = session_config(body.get("session_config") or {})
        if config.get("server_functions") and not await self._server_functions_allowed():
            raise BadRequest(
                "server_functions need a worker started with --allow-server-functions, and "
                "none is running: start one, or aggregate with fedavg, fedopt, fedmedian or "
                "fedtrimmedavg (docs/api.md)"
            )
        name = text_field(body, "name")
        seed = text_field(body, "seed_model_id") or text_field(
            body.get("session_config") or {}, "model_id"
        )
        if not seed:
            seed = (await self.broker.catalog.active_model()).get("model_id", "")
        if not seed:
            raise BadRequest("no seed model: upload one first (set_active_model)")
        await self.broker.models.ready_meta(seed)  # NotFound / NotReady before writing
        if not await self.broker.catalog.model(seed):
            await self.broker.catalog.add_model(seed, name="seed")
        session_id = await self.broker.sessions.create(
            config, seed, text_field(body, "session_id"), name, status=SessionStatus.CREATED
        )
        log.info("control: session %s created (%s)", session_id, config["aggregator"])
        dto = await self._session_dto(session_id)
        return web.json_response({"success": True, **dto}, status=201)

    async def _server_functions_allowed(self) -> bool:
        return any(
            w.role_health.get(SERVER_FUNCTIONS_ROLE) == "allowed"
            for w in await self.broker.workers.alive()
        )

    @route(
        summary="Start a created session, or continue an ended one",
        body=obj("session_id", session_id=STR, rounds=INT, round_timeout=NUM),
    )
    async def start_session(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        session_id = text_field(body, "session_id", required=True)
        record = await self.broker.sessions.get(session_id)
        if record is None:
            raise ApiError(404, f"no session {session_id[:100]!r}")
        extra = {}
        if body.get("round_timeout") is not None:
            extra["round_timeout"] = number_field(body, "round_timeout", 180, 0, 7 * 24 * 3600)
        rounds = int_field(body, "rounds", record.rounds or 5, 1, 10_000)
        outcome = await self.broker.sessions.start(session_id, rounds, **extra)
        log.info("control: session %s %s for %d round(s)", session_id, outcome, rounds)
        return web.json_response({"success": True, "message": f"session {outcome}",
                                  "session_id": session_id})  # fmt: skip

    async def _current_session(self, active: bool) -> str:
        sessions = self.broker.sessions
        if active:
            ids = await sessions.active()
            return ids[0] if ids else ""
        newest = await sessions.newest(1)
        return newest[0] if newest else ""

    @route()
    async def step_session(self, request: web.Request) -> web.Response:
        """One more round of the newest session (it must have ended)."""
        session_id = await self._current_session(active=False)
        if not session_id:
            raise ApiError(404, "no session to step")
        outcome = await self.broker.sessions.start(session_id, 1)
        return web.json_response({"success": True, "message": f"session {outcome} for 1 round",
                                  "session_id": session_id})  # fmt: skip

    @route()
    async def stop_session(self, request: web.Request) -> web.Response:
        """Stop the running session at the end of its current round."""
        session_id = await self._current_session(active=True)
        if not session_id:
            raise ApiError(404, "no session is running")
        await self.broker.sessions.update(session_id, status=SessionStatus.STOPPED,
                                          finished_at=f"{time.time():.3f}")  # fmt: skip
        return web.json_response({"success": True, "message": "session stops after this round",
                                  "session_id": session_id})  # fmt: skip

    # --- rounds, validations, statuses ---------------------------------------------------

    async def _session_ids(self, request: web.Request) -> list[str]:
        session_id = request.query.get("session_id", "")
        if session_id:
            return [session_id] if await self.broker.sessions.get(session_id) else []
        return await self.broker.sessions.newest(50)

    async def _rounds(self, request: web.Request, session_id: str | None = None) -> list[dict]:
        out = []
        ids = await self._session_ids(request) if session_id is None else [session_id]
        for session_id in ids:
            view = await session_view(self.broker, session_id)
            for rnd in view["rounds"]:
                out.append({
                    "id": f"{session_id}:{rnd['round_id']}", "round_id": rnd["round_id"],
                    "session_id": session_id, "status": rnd["status"],
                    "model_id": rnd["model_id"], "round_config": api_config(view["config"]),
                    "round_data": {k: rnd[k] for k in ("model_in", "clients", "updates",
                                   "aggregated", "rejected", "validations", "reason")},
                })  # fmt: skip
        return out

    @route(
        summary="Rounds of one session, or of the 50 newest",
        query={"session_id": STR},
        headers=LIMIT,
        answers="list",
    )
    async def list_rounds(self, request: web.Request) -> web.Response:
        rounds = await self._rounds(request)
        return limited(request, rounds)

    @route(summary="How many rounds", query={"session_id": STR}, answers="count")
    async def count_rounds(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._rounds(request)))

    @route(summary="One round, by <session id>:<round number>")
    async def get_rounds(self, request: web.Request) -> web.Response:
        session_id, _, _ = request.match_info["id"].rpartition(":")
        if not session_id:
            raise BadRequest("a round id is <session id>:<round number>")
        if await self.broker.sessions.get(session_id) is None:
            raise ApiError(404, "no such round")
        rounds = await self._rounds(request, session_id)
        return by_id(rounds, request.match_info["id"], "no such round")

    async def _validations(self, request: web.Request) -> list[dict]:
        q = request.query
        filters = {
            "model_id": q.get("model_id"),
            "correlation_id": q.get("correlation_id"),
            "name": q.get("sender.name"),
            "client_id": q.get("sender.client_id"),
        }
        if q.get("sender.role") not in (None, "client"):
            return []
        out = []
        for session_id in await self._session_ids(request):
            for rec in await self.broker.sessions.records(session_id, "validations"):
                if any(v is not None and rec.get(k, "") != v for k, v in filters.items()):
                    continue
                out.append(self._validation_dto(rec))
        return out

    @staticmethod
    def _validation_dto(rec: dict) -> dict:
        return {
            "id": rec.get("entry", ""), "validation_id": rec.get("entry", ""),
            "model_id": rec.get("model_id", ""), "data": rec.get("data", ""),
            "correlation_id": rec.get("correlation_id", ""),
            "session_id": rec.get("session_id", ""), "timestamp": rec.get("timestamp", ""),
            "sender": {"name": rec.get("name", ""), "role": "client",
                       "client_id": rec.get("client_id", "")},
            "receiver": {"name": "", "role": "combiner"},
        }  # fmt: skip

    @route(summary="Validations, filtered", query=VALIDATION_FILTERS, headers=LIMIT, answers="list")
    async def list_validations(self, request: web.Request) -> web.Response:
        found = await self._validations(request)
        return limited(request, found)

    @route(summary="How many validations", query=VALIDATION_FILTERS, answers="count")
    async def count_validations(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._validations(request)))

    @route(summary="One validation (among the 50 newest sessions)")
    async def get_validations(self, request: web.Request) -> web.Response:
        return by_id(
            await self._validations(request), request.match_info["id"],
            "no such validation (among the 50 newest sessions)",
        )  # fmt: skip

    async def _client_records(self, kind: str) -> list[dict]:
        clients = list(await self.broker.presence.clients())
        out = await self.broker.sessions.clients_records(clients, kind)
        return sorted(out, key=lambda r: r.get("received_at", ""), reverse=True)

    async def _statuses(self, request: web.Request) -> list[dict]:
        q = request.query
        if q.get("session_id") or q.get("sender.role") not in (None, "client"):
            return []  # statuses from clients carry no session here
        out = []
        for rec in await self._client_records("statuses"):
            if q.get("type") not in (None, rec.get("type")):
                continue
            if q.get("sender.name") not in (None, rec.get("name", "")):
                continue
            out.append({
                "id": rec.get("entry", ""), "status_id": rec.get("entry", ""),
                "status": rec.get("status", ""), "log_level": rec.get("log_level", ""),
                "type": rec.get("type", ""), "timestamp": rec.get("timestamp", ""),
                "sender": {"name": rec.get("name", ""), "role": "client",
                           "client_id": rec.get("client_id", "")},
            })  # fmt: skip
        return out

    @route(
        summary="Clients' status messages, newest first",
        query=STATUS_FILTERS,
        headers=LIMIT,
        answers="list",
    )
    async def list_statuses(self, request: web.Request) -> web.Response:
        found = await self._statuses(request)
        return limited(request, found)

    @route(summary="How many status messages", query=STATUS_FILTERS, answers="count")
    async def count_statuses(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._statuses(request)))

    @route(summary="One status message")
    async def get_statuses(self, request: web.Request) -> web.Response:
        return by_id(await self._statuses(request), request.match_info["id"], "no such status")

    # --- predictions, attributes, custom commands ----------------------------------------

    async def _push_all(self, body: dict, task_type: str, data: str, model_id: str = ""):
        ids = body.get("client_ids") or await self.broker.presence.online()
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            raise BadRequest("client_ids must be a list of client ids")
        if not ids:
            raise ApiError(409, "no client is online")
        if len(ids) > MAX_FANOUT:
            raise BadRequest(f"at most {MAX_FANOUT} client_ids")
        ids = list(dict.fromkeys(ids))
        # push_many checks every id before it writes: a bad one leaves no task behind
        pushed = await self.broker.tasks.push_many(ids, task_type, model_id=model_id, data=data)
        return dict(zip(ids, pushed, strict=True))

    @route(
        summary="Predictions, filtered (prediction_id: those start_predictions asked for)",
        query=PREDICTION_FILTERS,
        headers=LIMIT,
        answers="list",
    )
    async def list_predictions(self, request: web.Request) -> web.Response:
        return limited(request, await self._predictions(request))

    async def _predictions(self, request: web.Request) -> list[dict]:
        q = request.query
        found = [
            rec for rec in await self._client_records("predictions")
            if all(q.get(k) in (None, rec.get(k)) for k in ("model_id", "correlation_id",
                                                             "client_id"))
        ]  # fmt: skip
        # A prediction names its task, not the prediction_id: that is in the task's data.
        tasks = await self.broker.tasks.records(
            {r.get("correlation_id", ""): r.get("client_id", "") for r in found}
        )
        out = []
        for rec in found:
            prediction_id = prediction_of(tasks.get(rec.get("correlation_id", ""), {}))
            if q.get("prediction_id") not in (None, prediction_id):
                continue
            out.append({"id": rec.get("entry", ""), "prediction_id": prediction_id,
                        "model_id": rec.get("model_id", ""), "data": rec.get("data", ""),
                        "correlation_id": rec.get("correlation_id", ""),
                        "sender": {"client_id": rec.get("client_id", ""), "role": "client",
                                   "name": rec.get("name", "")}})  # fmt: skip
        return out

    @route(summary="How many predictions, filtered", query=PREDICTION_FILTERS, answers="count")
    async def count_predictions(self, request: web.Request) -> web.Response:
        return web.json_response(len(await self._predictions(request)))

    @route(
        summary="A prediction task to every online client (or client_ids)",
        body=obj(prediction_id=STR, model_id=STR, client_ids={"type": "array", "items": STR}),
    )
    async def start_predictions(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        model_id = text_field(body, "model_id") or (
            await self.broker.catalog.active_model()).get("model_id", "")  # fmt: skip
        if not model_id:
            raise BadRequest("no model to predict with")
        await self.broker.models.ready_meta(model_id)
        prediction_id = text_field(body, "prediction_id")
        pushed = await self._push_all(
            body, "Fedn_Prediction", json.dumps({"prediction_id": prediction_id}), model_id
        )
        return web.json_response({"success": True, "message": "predictions started",
                                  "prediction_id": prediction_id,
                                  "correlation_ids": pushed})  # fmt: skip

    @route(
        summary="A Custom_<name> task to every online client (or client_ids)",
        body=obj("command_type", command_type=STR, client_ids={"type": "array", "items": STR}),
    )
    async def run_command(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        command = text_field(body, "command_type", required=True)
        if not re.fullmatch(r"Custom_[A-Za-z0-9_]{1,64}", command):
            raise BadRequest("command_type must be Custom_<name> (letters, digits, _)")
        params = {k: v for k, v in body.items()
                  if k not in ("command_type", "blocking", "timeout", "client_ids")}  # fmt: skip
        pushed = await self._push_all(body, command, json.dumps(params))
        return web.json_response({"success": True, "message": f"{command} sent",
                                  "correlation_ids": pushed})  # fmt: skip

    async def _attributes(self, node_id: str) -> list[dict]:
        return [
            {
                "node_id": node_id,
                "attributes": rec.get("attributes", {}),
                "timestamp": rec.get("timestamp", ""),
            }
            for rec in await self.broker.sessions.client_records(node_id, "attributes")
        ]

    @route(
        summary="Each node's newest attributes, merged",
        body=obj("node_ids", node_ids={"type": "array", "items": STR}),
    )
    async def current_attributes(self, request: web.Request) -> web.Response:
        nodes = (await read_json(request)).get("node_ids")
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
            raise BadRequest("node_ids must be a non-empty list of client ids")
        out = {}
        for node in nodes[:1000]:
            merged: dict = {}
            for rec in reversed(await self._attributes(node)):  # oldest first, newest wins
                if isinstance(rec["attributes"], dict):
                    merged.update(rec["attributes"])
            out[node] = merged
        return web.json_response(out)

    @route(
        summary="A node's attribute messages, newest first",
        body=obj("node_id", node_id=STR),
        answers="list",
    )
    async def attribute_trail(self, request: web.Request) -> web.Response:
        node = text_field(await read_json(request), "node_id", required=True)
        trail = await self._attributes(node)
        return listing(trail)
