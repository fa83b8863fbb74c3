"""The OpenAPI description (combiner/openapi.py) against a real replica and a real Redis:
it lists every route, docs/openapi.json is current, every admin route refuses a client's
token (403) and no token (401), and schemathesis fuzzes every operation from the
description (data that fits it and data that does not): never a 5xx, a refusal is a JSON
{"message"} and writes nothing, answers match the described status and content types."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from broker.records import SessionStatus
from combiner.http_api import FailureLimiter
from combiner.openapi import SPEC_PATH
from tests.tokens import issue
from workers.fedavg import save_npz

DOCS_SPEC = Path(__file__).parents[1] / "docs" / "openapi.json"
EXAMPLES = 20  # per operation and generation mode


@pytest.fixture
async def served(make_replica, broker, tmp_path):
    replica = await make_replica(
        insecure=False, http_port=0, signing_key=str(tmp_path / "signing-key.pem")
    )
    replica.http.limiter = FailureLimiter(free=10**6)  # the fuzz sends bad refresh tokens
    key = replica.http.signing_key
    replica.admin = (await issue(broker, key, "operator", role="admin")).access_token
    replica.client = (await issue(broker, key, "c1")).access_token
    for token in (replica.admin, replica.client):
        await replica.auth.verify(token)  # the key is known: no lookups during the fuzz
    replica.url = f"http://127.0.0.1:{replica.http_port}"
    return replica


def spec_of(replica) -> dict:
    return replica.http.openapi()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield path, method, op


async def test_every_route_is_described_and_docs_openapi_json_is_current(served):
    spec = spec_of(served)
    routes = {
        (r.resource.get_info().get("path") or r.resource.get_info().get("formatter"), r.method)
        for r in served.http.app.router.routes()
        if r.method != "HEAD"
    }
    described = {(path, method.upper()) for path, method, _ in operations(spec)}
    assert described == routes - {(SPEC_PATH, "GET")}
    assert all(op["summary"] != "(undocumented)" for _, _, op in operations(spec))
    resp = await asyncio.to_thread(requests.get, served.url + SPEC_PATH, timeout=10)
    assert resp.status_code == 200 and resp.json() == spec
    on_disk = json.loads(DOCS_SPEC.read_text())
    assert on_disk == spec, "docs/openapi.json is stale: combiner openapi > docs/openapi.json"


class Writes:
    """What was written under prefix, from Redis's keyspace notifications: exact and cheap
    per call. A PUBLISH on our own channel is the barrier: Redis runs commands in order, so
    every notification of a write made before it arrives before it. The replica's own
    liveness records (rewritten by its upkeep) and expiries are not calls' writes."""

    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r, self.prefix = r, prefix
        self.old = r.config_get("notify-keyspace-events")["notify-keyspace-events"]
        r.config_set("notify-keyspace-events", "KA")
        self.pubsub = r.pubsub()
        self.pubsub.psubscribe(f"__keyspace@*__:{prefix}:*")
        self.barrier = f"{prefix}-barrier"
        self.pubsub.subscribe(self.barrier)
        for _ in range(2):  # both subscriptions confirmed: no barrier can pass them by
            m = self.pubsub.get_message(timeout=10)
            assert m and m["type"] in ("psubscribe", "subscribe"), m
        probe = f"{prefix}:writes-probe"  # the watch itself must see a write
        r.set(probe, "1")
        assert (probe, "set") in self.since_last()
        r.delete(probe)
        self.since_last()

    def since_last(self) -> list[tuple[str, str]]:
        """(key, event) of every write since the last call."""
        self.r.publish(self.barrier, "b")
        out = []
        while True:
            m = self.pubsub.get_message(timeout=10)
            assert m is not None, "the barrier never came back"
            channel = m["channel"].decode()
            if channel == self.barrier:
                return out
            key, event = channel.split(":", 1)[1], m["data"].decode()
            if event not in ("expired", "evicted") and not key.startswith(f"{self.prefix}:replica"):
                out.append((key, event))

    def close(self) -> None:
        self.pubsub.close()
        self.r.config_set("notify-keyspace-events", self.old)


def refusal(resp: requests.Response) -> str:
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("message"), str), resp.text
    return body["message"]


def fill(path: str) -> str:
    return path.replace("{id}", "x").replace("{upload}", "x")


async def test_admin_routes_refuse_a_client_token_and_no_token_and_write_nothing(
    served, redis_url, prefix
):
    spec = spec_of(served)
    admin_ops = [(p, m) for p, m, op in operations(spec) if op["x-auth"] == "admin"]
    assert len(admin_ops) > 40

    def run() -> None:
        writes = Writes(redis.Redis.from_url(redis_url), prefix)
        try:
            writes.since_last()
            for path, method in admin_ops:
                url = served.url + fill(path)
                for token, want in ((served.client, 403), ("", 401)):
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    resp = requests.request(method, url, headers=headers, json={}, timeout=10)
                    assert resp.status_code == want, (method, path, resp.status_code, resp.text)
                    refusal(resp)
                    assert writes.since_last() == [], (method, path)
        finally:
            writes.close()

    await asyncio.to_thread(run)


async def seed_state(broker) -> dict[str, str]:
    """A seed model, a package and a session, so fuzzed ids sometimes name real things."""
    import numpy as np

    model_id = await broker.models.put(save_npz([np.ones(3, dtype=np.float32)]))
    await broker.catalog.add_model(model_id, name="seed")
    config = {"rounds": 1, "min_clients": 1, "max_clients": 1}
    session_id = await broker.sessions.create(config, model_id, status=SessionStatus.CREATED)
    return {"models": model_id, "sessions": session_id, "clients": "c1"}


def fuzz(url: str, admin: str, spec: dict, writes: Writes, known: dict) -> dict:
    """Every operation, EXAMPLES draws each of data that fits and data that does not, four
    in five with an admin token (the token checks are the test above). Returns status ->
    count."""
    schema = schemathesis.openapi.from_dict(spec)
    seen: dict[int, int] = {}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    for result in schema.get_all_operations():
        op = result.ok()
        kind = op.path.split("/")[3] if op.path.count("/") > 3 else ""
        strategies = [op.as_strategy(mode) for mode in GenerationMode]
        if "{id}" in op.path and kind in known:
            strategies.append(op.as_strategy(path_parameters={"id": known[kind]}))

        @settings(max_examples=EXAMPLES * 2, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        # hypothesis leans to the first choice: an admin, then what schemathesis drew
        @given(case=st.one_of(strategies), auth=st.sampled_from(["admin"] * 4 + ["drawn"]))
        def one(case, auth):
            writes.since_last()
            if auth == "admin":
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {admin}"}
            resp = case.call(base_url=url, timeout=10)
            case.validate_response(resp, checks=checks)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            if resp.status_code >= 400:
                refusal(resp)
                wrote = writes.since_last()
                assert wrote == [], f"{case.method} {case.path}: a refusal wrote {wrote}"

        one()
    return seen


async def test_schemathesis_fuzz_of_every_operation(served, broker, redis_url, prefix):
    known = await seed_state(broker)
    spec = spec_of(served)
    out: dict = {}

    def run() -> None:
        writes = Writes(redis.Redis.from_url(redis_url), prefix)
        try:
            out["seen"] = fuzz(served.url, served.admin, spec, writes, known)
        except BaseException as exc:  # reported on the loop's side
            out["error"] = exc
        finally:
            writes.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 280)
    if "error" in out:
        raise out["error"]
    assert "seen" in out, "the fuzz did not finish in time"
    statuses = set(out["seen"])
    print("statuses seen:", dict(sorted(out["seen"].items())))
    assert {200, 201, 400, 404} <= statuses and max(statuses) < 500, out["seen"]
