"""What the published APIClient sends and reads (its ``scaleoututil/api/client.py``), as
checks and shapes: the session configuration it posts, checked and turned into the
coordinator's (workers/coordinator.py), and the JSON it expects back for models, packages and
lists. No Redis here: combiner/control_api.py reads the state and answers with these.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import tarfile
import textwrap

from aiohttp import web

from broker.records import SessionStatus
from combiner.http_api import BadRequest
from combiner.openapi import BOOL, INT, NUM, STR, obj
from workers.aggregators import AGGREGATORS, check_config

MAX_CHUNK = 4 * 1024 * 1024  # the APIClient sends 900 KiB chunks (less after a 413)
MAX_LIMIT = 10_000
MAX_SOURCE = 256 * 1024  # server_functions source text
HELPER = "numpyhelper"
PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2")  # what the 1.0.0 client unpacks
SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")

# What the APIClient's session_is_finished and our records call each state.
API_STATUS = {
    SessionStatus.CREATED: "Created",
    SessionStatus.QUEUED: "Started",
    SessionStatus.RUNNING: "Started",
    SessionStatus.COMPLETED: "Finished",
    SessionStatus.FAILED: "Failed",
    SessionStatus.STOPPED: "Stopped",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


def iso(unix: str | float | None) -> str:
    if unix in (None, ""):
        return ""
    return datetime.datetime.fromtimestamp(float(unix), datetime.UTC).isoformat()


def listing(items: list, total: int | None = None) -> web.Response:
    return web.json_response({"count": len(items) if total is None else total, "result": items})


def limited(request: web.Request, found: list) -> web.Response:
    """The first X-Limit of everything found, with the total count."""
    return listing(found[: header_limit(request)], len(found))


def by_id(found: list[dict], item_id: str, missing: str) -> web.Response:
    for item in found:
        if item["id"] == item_id:
            return web.json_response(item)
    raise ApiError(404, missing)


def header_limit(request: web.Request) -> int | None:
    raw = request.headers.get("X-Limit")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("X-Limit must be an integer") from None
    if value <= 0:
        raise BadRequest("X-Limit must be >= 1")
    # get_model_trail sends the model count as its limit: past MAX_LIMIT, answer the most
    return min(value, MAX_LIMIT)


def flag(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false")


def int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in {low}..{high}")
    return value


def number_field(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
        raise BadRequest(f"{name} must be a number in ({low}, {high}]")
    return float(value)


def bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


SESSION_CONFIG = obj(
    aggregator={"enum": list(AGGREGATORS)},
    aggregator_kwargs={"type": "object", "nullable": True},
    rounds=INT, round_timeout=NUM, buffer_size=INT, model_id=STR,
    delete_models_storage=BOOL, clients_required=INT, requested_clients=INT, validate=BOOL,
    helper_type={"type": "string", "nullable": True},
    server_functions={"type": "string", "nullable": True},
)  # fmt: skip


def session_config(raw) -> dict:
    """The APIClient's session_config, checked, as the coordinator's config
    (workers/coordinator.py DEFAULTS). Unknown keys are refused: a typo must not be
    silently ignored."""
    if not isinstance(raw, dict):
        raise BadRequest("session_config must be an object")
    known = {"aggregator", "aggregator_kwargs", "rounds", "round_timeout", "buffer_size",
             "model_id", "delete_models_storage", "clients_required", "requested_clients",
             "validate", "helper_type", "server_functions"}  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadRequest(f"unknown session_config field(s): {', '.join(unknown)}")
    source = raw.get("server_functions") or ""
    if source:
        source = check_source(source)
    helper = raw.get("helper_type")
    if helper not in (None, "", HELPER):
        raise BadRequest(f"helper_type must be {HELPER!r} (the only model format here)")
    aggregator = raw.get("aggregator") or "fedavg"
    kwargs = raw.get("aggregator_kwargs") or {}
    if not isinstance(aggregator, str) or not isinstance(kwargs, dict):
        raise BadRequest("aggregator must be a string and aggregator_kwargs an object")
    if aggregator not in AGGREGATORS:
        raise BadRequest(f"aggregator must be one of {', '.join(AGGREGATORS)}")
    try:
        check_config(aggregator, kwargs)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    required = int_field(raw, "clients_required", 1, 1, 100_000)
    requested = int_field(raw, "requested_clients", max(required, 8), 1, 100_000)
    buffer_size = int_field(raw, "buffer_size", -1, -1, 100_000)
    if buffer_size == 0:
        raise BadRequest("buffer_size must be -1 (every selected client) or >= 1")
    return {
        "rounds": int_field(raw, "rounds", 5, 1, 10_000),
        "round_timeout": number_field(raw, "round_timeout", 180, 0, 7 * 24 * 3600),
        "min_clients": required,
        "max_clients": max(required, requested),
        "validate": bool_field(raw, "validate", True),
        "aggregator": aggregator,
        "aggregator_kwargs": kwargs,
        "buffer_size": buffer_size,
        "delete_models_storage": bool_field(raw, "delete_models_storage", False),
        "helper_type": HELPER,
        **({"server_functions": source} if source else {}),
    }


def check_source(source) -> str:
    """server_functions as the APIClient sends them (inspect.getsource of the class, indented
    if the class was defined inside a function): Python that compiles, dedented. Compiling
    runs nothing; only opted-in workers run it (docs/api.md)."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE:
        raise BadRequest(f"server_functions must be Python source of at most {MAX_SOURCE} bytes")
    source = textwrap.dedent(source)
    try:
        compile(source, "<server_functions>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise BadRequest(f"server_functions do not compile: {exc}") from None
    return source


def api_config(config: dict) -> dict:
    """The coordinator's config shown with the APIClient's names."""
    return {
        "rounds": config.get("rounds"),
        "round_timeout": config.get("round_timeout"),
        "clients_required": config.get("min_clients"),
        "requested_clients": config.get("max_clients"),
        "validate": config.get("validate", True),
        "aggregator": config.get("aggregator", "fedavg"),
        "aggregator_kwargs": config.get("aggregator_kwargs", {}),
        "buffer_size": config.get("buffer_size", -1),
        "delete_models_storage": config.get("delete_models_storage", False),
        "helper_type": HELPER,
    }


def model_dto(entry: dict[str, str]) -> dict:
    return {
        "id": entry["model_id"],
        "model_id": entry["model_id"],
        "model": entry["model_id"],
        "name": entry.get("name", ""),
        "parent_model": entry.get("parent_model") or None,
        "session_id": entry.get("session_id") or None,
        "round_id": entry.get("round_id") or None,
        "committed_at": iso(entry.get("committed_at")),
    }


def package_dto(entry: dict[str, str], active_id: str = "") -> dict:
    return {
        "id": entry["package_id"],
        "package_id": entry["package_id"],
        "name": entry.get("name", ""),
        "description": entry.get("description", ""),
        "file_name": entry.get("file_name", ""),
        "storage_file_name": entry.get("file_name", ""),
        "helper": entry.get("helper", HELPER),
        "checksum": entry.get("checksum", ""),
        "size": int(entry.get("size", 0)),
        "committed_at": iso(entry.get("committed_at")),
        "active": entry["package_id"] == active_id,
    }


def prediction_of(task: dict[str, str]) -> str:
    """The prediction_id start_predictions put in a Fedn_Prediction task's data, or ""."""
    try:
        value = json.loads(task.get("data") or "{}").get("prediction_id", "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


def check_package(file_name: str, data: bytes) -> None:
    """A compute package the 1.0.0 client can unpack: a tar archive holding scaleout.yaml,
    with no member that would land outside the folder it is unpacked in."""
    if not file_name.endswith(PACKAGE_SUFFIXES):
        raise BadRequest(f"file_name must end with one of {', '.join(PACKAGE_SUFFIXES)}")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadRequest(f"not a readable tar archive: {exc}") from None
    for m in members:
        if m.name.startswith("/") or ".." in m.name.split("/") or m.issym() or m.islnk():
            raise BadRequest(f"package member {m.name[:100]!r} is a link or leaves its folder")
    if not any(m.name.rsplit("/", 1)[-1] == "scaleout.yaml" for m in members):
        raise BadRequest("the package holds no scaleout.yaml")
