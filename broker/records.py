"""The records kept in Redis hashes, typed: tasks, sessions, rounds, replicas.

Each record reads its hash once (``from_hash``) and writes it once (``to_hash``); the fields
stay plain strings with the names docs/redis.md lists, so redis-cli shows them as they are.
States are StrEnums: a state compares equal to the string stored in Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum


class TaskState(StrEnum):
    """A task's `state` (docs/redis.md "Task states"); the Lua scripts write the same words."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    LOST = "lost"


# A task in one of these is over; poll.lua keeps the same list (`final`).
FINAL_TASK_STATES = frozenset(
    {
        TaskState.COMPLETED,
        TaskState.FAILED,
        TaskState.INTERRUPTED,
        TaskState.CANCELLED,
        TaskState.TIMEOUT,
        TaskState.LOST,
    }
)


class SessionStatus(StrEnum):
    CREATED = "created"  # by the API's POST sessions/, waiting for POST sessions/start
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"  # by the API's control/stop, at the end of the round it was in


# Sessions a worker still has to drive.
ACTIVE_SESSION_STATES = frozenset({SessionStatus.QUEUED, SessionStatus.RUNNING})


class RoundStatus(StrEnum):
    WAITING = "waiting"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    VALIDATING = "validating"
    DONE = "done"
    FAILED = "failed"


# Fields of a TaskRequest, in the order poll.lua and stream_take.lua return them
# (tests/test_wire_fields.py holds the scripts to this order).
WIRE_FIELDS = ("correlation_id", "type", "model_id", "data", "session_id", "round_id", "timestamp")


@dataclass
class Task:
    """A task as the client sees it (TaskRequest fields)."""

    correlation_id: str
    type: str
    client_id: str = ""
    model_id: str = ""
    data: str = ""
    session_id: str = ""
    round_id: str = ""
    timestamp: str = ""

    @classmethod
    def from_wire(cls, values: list[str], client_id: str) -> Task:
        """One task from a script reply: the WIRE_FIELDS values, in that order."""
        return cls(client_id=client_id, **dict(zip(WIRE_FIELDS, values, strict=True)))


def _int(value: str) -> int:
    return int(value or 0)


def _json(value: str, default):
    try:
        return json.loads(value) if value else default
    except ValueError:
        return value  # stored as the client sent it


class _HashRecord:
    """A dataclass stored as one Redis hash of string fields with the same names."""

    @classmethod
    def from_hash(cls, raw: dict[str, str]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def partial_hash(cls, **values) -> dict[str, str]:
        """Some fields, as to_hash writes them: for updating a stored record in place."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
        return {
            k: json.dumps(v) if isinstance(v, dict | list) else str(v) for k, v in values.items()
        }

    def to_hash(self) -> dict[str, str]:
        """Every set field (empty strings are left out: absent and empty read the same)."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value != "":
                out[f.name] = str(value)
        return out


@dataclass
class TaskRecord(_HashRecord):
    """``P:{T}:c:C:task:T``: written by push.lua, the poll and stream scripts, result RPCs."""

    correlation_id: str = ""
    client_id: str = ""
    type: str = ""
    model_id: str = ""
    data: str = ""
    session_id: str = ""
    round_id: str = ""
    timestamp: str = ""
    created_at: str = ""
    state: str = ""
    flag: str = ""  # 'abort' | 'timeout'
    attempts: str = ""
    via: str = ""  # 'poll' | 'stream'
    replica: str = ""
    delivered_at: str = ""
    report_status: str = ""
    report_response: str = ""
    reported_at: str = ""
    finished_at: str = ""
    model_update_id: str = ""
    result_meta: str = ""
    result: str = ""
    result_at: str = ""
    result_entry: str = ""

    @property
    def settled(self) -> bool:
        """Nothing more will come of it: a result was kept, or it ended."""
        return bool(self.result_at) or self.state in FINAL_TASK_STATES

    @property
    def attempt_count(self) -> int:
        return _int(self.attempts)


@dataclass
class SessionRecord(_HashRecord):
    """``P:session:S``: created by `session start`, advanced by the coordinator."""

    id: str = ""
    name: str = ""
    status: str = SessionStatus.QUEUED
    config: dict = field(default_factory=dict)  # stored as JSON
    seed_model_id: str = ""
    model_id: str = ""
    current_round: str = "1"
    created_at: str = ""
    started_at: str = ""
    finished_at: str = ""
    error: str = ""

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> SessionRecord:
        record = super().from_hash({k: v for k, v in raw.items() if k != "config"})
        record.config = json.loads(raw["config"]) if raw.get("config") else {}
        return record

    def to_hash(self) -> dict[str, str]:
        out = super().to_hash()
        out["config"] = json.dumps(self.config)
        return out

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_SESSION_STATES

    @property
    def round_number(self) -> int:
        return int(self.current_round or 1)

    @property
    def rounds(self) -> int:
        return int(self.config.get("rounds", 0))


@dataclass
class RoundRecord(_HashRecord):
    """``P:session:S:round:R``: the coordinator's progress through one round."""

    status: str = ""
    model_in: str = ""
    model_out: str = ""
    clients: str = ""  # JSON list of the selected client ids
    deadline: str = ""
    validation_deadline: str = ""
    updates: str = ""
    aggregated: str = ""  # JSON list of the clients whose update was averaged
    rejected: str = ""  # JSON map client id -> why its update was not used
    reason: str = ""
    opt_state: str = ""  # FedOpt: the model id holding the optimizer state after this round
    started_at: str = ""
    aggregated_at: str = ""
    finished_at: str = ""

    @property
    def client_ids(self) -> list[str]:
        return _json(self.clients, [])

    @property
    def update_count(self) -> int:
        return _int(self.updates)


@dataclass
class ReplicaRecord(_HashRecord):
    """``P:replica:R``: what a live replica reports about itself (its upkeep rewrites it)."""

    id: str = ""
    address: str = ""
    pid: str = ""
    started: str = ""
    streams: str = "0"  # TaskStreams open on it now
    clients: str = "0"  # distinct clients it served within offline_after
    seen: str = ""

    @property
    def stream_count(self) -> int:
        return _int(self.streams)

    @property
    def client_count(self) -> int:
        return _int(self.clients)


class TokenStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Role(StrEnum):
    CLIENT = "client"
    ADMIN = "admin"


@dataclass
class TokenRecord(_HashRecord):
    """``P:auth:token:I``: a refresh token, kept as the SHA-256 of its text
    (broker/credentials.py)."""

    id: str = ""  # first 16 hex digits of the hash: what list shows and revoke takes
    hash: str = ""
    client_id: str = ""
    role: str = Role.CLIENT
    created: str = ""
    expires: str = ""  # unix seconds; empty: never
    status: str = TokenStatus.ACTIVE
    revoked_at: str = ""

    def usable(self, at: float) -> bool:
        return self.status == TokenStatus.ACTIVE and (not self.expires or float(self.expires) > at)

    def public(self) -> dict[str, str]:
        """What `combiner token list --json` shows (never the hash)."""
        out = self.to_hash()
        out.pop("hash", None)
        return out


@dataclass
class WorkerRecord(_HashRecord):
    """``P:worker:W``: what a live worker reports about itself (its upkeep role rewrites it)."""

    id: str = ""
    pid: str = ""
    started: str = ""
    seen: str = ""
    roles: str = "{}"  # JSON: role -> "ok" | "stopped: <error>"

    @property
    def role_health(self) -> dict[str, str]:
        value = _json(self.roles, {})
        return value if isinstance(value, dict) else {}
