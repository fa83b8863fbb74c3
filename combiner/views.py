"""What `session show`, `session start --wait --json` and `status` print, built from Redis."""

from __future__ import annotations

import json
import time

from broker import Broker, NotFound
from broker.consumers import StreamGroup
from broker.keys import INBOUND_KINDS


def _json(value: str, default):
    try:
        return json.loads(value) if value else default
    except ValueError:
        return value  # stored as the client sent it


async def session_view(broker: Broker, session_id: str) -> dict:
    record = await broker.sessions.get(session_id)
    if not record:
        raise NotFound(f"no session {session_id!r}")
    cfg = record.get("config", {})
    metrics = await broker.sessions.records(session_id, "metrics")
    rounds = []
    for r in range(1, int(cfg.get("rounds", 0)) + 1):
        rid = str(r)
        rnd = await broker.sessions.round(session_id, rid)
        if not rnd:
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
                "status": rnd.get("status", ""),
                "model_in": rnd.get("model_in", ""),
                "model_id": rnd.get("model_out", ""),
                "clients": _json(rnd.get("clients", ""), []),
                "updates": int(rnd.get("updates", "0") or 0),
                "aggregated": _json(rnd.get("aggregated", ""), []),
                "rejected": _json(rnd.get("rejected", ""), {}),
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
                "reason": rnd.get("reason", ""),
            }
        )
    return {
        "session_id": session_id,
        "status": record.get("status", ""),
        "model_id": record.get("model_id", ""),
        "seed_model_id": record.get("seed_model_id", ""),
        "current_round": int(record.get("current_round", "1")),
        "config": cfg,
        "error": record.get("error", ""),
        "driver": await broker.sessions.holder(session_id),
        "records": {
            kind: len(await broker.sessions.records(session_id, kind)) for kind in SESSION_RECORDS
        },
        "rounds": rounds,
    }


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
    """Replicas alive, clients online/offline, stream lengths and lag, current sessions."""
    r, keys, now = broker.redis, broker.keys, time.time()
    replicas = []
    for rid, expiry in await broker.ctx.call(r.zrange, keys.replicas, 0, -1, withscores=True):
        rid = rid.decode()
        if expiry < now:
            continue
        info = {
            k.decode(): v.decode()
            for k, v in (await broker.ctx.call(r.hgetall, keys.replica(rid))).items()
        }
        replicas.append(
            {
                "id": rid,
                "address": info.get("address", ""),
                "streams": int(info.get("streams", "0") or 0),
                "clients": int(info.get("clients", "0") or 0),
            }
        )
    seen = await broker.presence.clients()
    online = set(await broker.presence.online())
    streams = await StreamGroup(broker.ctx, "records", "status", INBOUND_KINDS).lag()
    sessions = []
    for sid in await broker.sessions.all():
        rec = await broker.sessions.get(sid)
        sessions.append(
            {
                "session_id": sid,
                "status": rec.get("status", ""),
                "round": int(rec.get("current_round", "1")),
                "rounds": int(rec.get("config", {}).get("rounds", 0)),
                "model_id": rec.get("model_id", ""),
            }
        )
    current = next((s for s in sessions if s["status"] in ("queued", "running")), None)
    return {
        "replicas": replicas,
        "clients": {
            "online": sorted(online),
            "offline": sorted(set(seen) - online),
        },
        "streams": streams,
        "sessions": sessions,
        "current_session": current,
    }
