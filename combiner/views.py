"""What `session show`, `session start --wait --json`, `task show` and `status` print, built
from the broker's typed records (combiner/render.py turns them into text)."""

from __future__ import annotations

import json

from broker import Broker, NotFound
from broker.records import ACTIVE_SESSION_STATES, RoundStatus, SessionRecord, TaskRecord


def _json(value: str, default):
    try:
        return json.loads(value) if value else default
    except ValueError:
        return value  # stored as the client sent it


async def session_view(broker: Broker, session_id: str) -> dict:
    record = await broker.sessions.get(session_id)
    if record is None:
        raise NotFound(f"no session {session_id!r}")
    metrics = await broker.sessions.records(session_id, "metrics")
    rounds = []
    for r in range(1, record.rounds + 1):
        rid = str(r)
        rnd = await broker.sessions.round(session_id, rid)
        if rnd is None:
            break
        vtasks = await broker.sessions.round_tasks(session_id, rid, "validations")
        vrecords = await broker.tasks.records(vtasks)
        validations = [
            {"client_id": vtasks[corr], "data": _json(rec.get("result", ""), None)}
            for corr, rec in sorted(vrecords.items(), key=lambda kv: vtasks[kv[0]])
            if rec.get("result_at")
        ]
        rounds.append(
            {
                "round_id": rid,
                "status": rnd.status,
                "model_in": rnd.model_in,
                "model_id": rnd.model_out,
                "clients": rnd.client_ids,
                "updates": rnd.update_count,
                "aggregated": _json(rnd.aggregated, []),
                "rejected": _json(rnd.rejected, {}),
                "validations": len(validations),
                "validation_results": validations,
                "metrics": [
                    {
                        "client_id": m.get("client_id", ""),
                        "step": m.get("step", ""),
                        "metrics": m.get("metrics", {}),
                    }
                    for m in metrics
                    if m.get("round_id") == rid
                ],
                "reason": rnd.reason,
            }
        )
    return {
        "session_id": session_id,
        "status": record.status,
        "model_id": record.model_id,
        "seed_model_id": record.seed_model_id,
        "current_round": record.round_number,
        "config": record.config,
        "error": record.error,
        "driver": await broker.sessions.holder(session_id),
        "records": {
            kind: len(await broker.sessions.records(session_id, kind)) for kind in SESSION_RECORDS
        },
        "rounds": rounds,
    }


def rounds_done(view: dict) -> int:
    return sum(1 for r in view["rounds"] if r["status"] == RoundStatus.DONE)


def session_active(view: dict) -> bool:
    """Whether a session view (or a status view's session) is still to be driven."""
    return view["status"] in ACTIVE_SESSION_STATES


SESSION_RECORDS = ("updates", "validations", "predictions", "metrics", "reports")
CLIENT_RECORDS = ("statuses", "telemetry", "attributes", "metrics", "presence")


async def client_view(broker: Broker, client_id: str) -> dict:
    """One client: its record, and its latest statuses, telemetry, attributes, metrics."""
    record = await broker.presence.client(client_id)
    if not record:
        raise NotFound(f"no client {client_id!r}")
    online = client_id in set(await broker.presence.online())
    return {
        "client_id": client_id,
        "online": online,
        "record": record,
        "queued": await broker.tasks.queued(client_id),
        "latest": {
            kind: (await broker.sessions.client_records(client_id, kind))[:10]
            for kind in CLIENT_RECORDS
        },
    }


async def status_view(broker: Broker) -> dict:
    """The Redis underneath (topology, masters and their replicas, partitions, schema,
    durability), replicas and workers alive (workers with their roles' health), clients
    online and offline, stream lengths and lag, current sessions."""
    replicas = [
        {
            "id": r.id,
            "address": r.address,
            "streams": r.stream_count,
            "clients": r.client_count,
        }
        for r in await broker.replicas.alive()
    ]
    workers = [
        {"id": w.id, "pid": w.pid, "roles": w.role_health} for w in await broker.workers.alive()
    ]
    seen = await broker.presence.clients()
    online = set(await broker.presence.online())
    streams = await broker.inbound.lag("records")
    sessions = []
    for sid in await broker.sessions.all():
        rec = await broker.sessions.get(sid) or SessionRecord(id=sid, status="")
        sessions.append(
            {
                "session_id": sid,
                "status": rec.status,
                "round": rec.round_number,
                "rounds": rec.rounds,
                "model_id": rec.model_id,
            }
        )
    current = next((s for s in sessions if session_active(s)), None)
    return {
        "redis": await broker.redis_view(),
        "replicas": replicas,
        "workers": workers,
        "clients": {
            "online": sorted(online),
            "offline": sorted(set(seen) - online),
        },
        "streams": streams,
        "sessions": sessions,
        "current_session": current,
    }


RESULT_FIELDS = {
    "Fedn_ModelUpdate": ("model_update_id", "model update id"),
    "Fedn_Validation": ("result", "validation"),
    "Fedn_Prediction": ("result", "prediction"),
}


def task_view(raw: dict[str, str]) -> dict:
    """A task as `task show` presents it: state, the client's report, the result."""
    task = TaskRecord.from_hash(raw)
    kind = task.type
    field, _ = RESULT_FIELDS.get(kind, ("report_response", "response"))
    result = getattr(task, field)
    if kind in ("Fedn_Validation", "Fedn_Prediction") or kind.startswith("Custom_"):
        try:
            result = json.loads(result) if result else None
        except ValueError:
            pass  # stored as the client sent it
    view = {
        "correlation_id": task.correlation_id,
        "client_id": task.client_id,
        "type": kind,
        "state": task.state,
        "flag": task.flag,
        "model_id": task.model_id,
        "session_id": task.session_id,
        "round_id": task.round_id,
        "attempts": task.attempt_count,
        "delivered_via": task.via,
        "report": {
            "status": task.report_status,
            "response": task.report_response,
            "at": task.reported_at,
        },
        "result": result,
    }
    if kind == "Fedn_ModelUpdate":
        view["model_update_id"] = task.model_update_id
    return view
