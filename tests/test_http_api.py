"""The HTTP side of a replica (combiner/http_api.py) against a real replica, a real Redis and
a real aiohttp server over loopback: token exchange and assignment as the 1.0.0 client calls
them (docs/protocol.md §15), hostile input (4xx JSON, never 5xx, nothing written), slowed
failed refreshes, no token in any log line, and a hypothesis fuzz of both routes."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request

import aiohttp
import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from combiner.http_api import MAX_BODY, FailureLimiter
from combiner.signing import ALGORITHM, SigningKey, load_public
from tests.services import SCAN_COUNT, RedisServer, eventually
from tests.tokens import issue, publish

pytestmark = pytest.mark.topologies

REFRESH, ADD = "/api/auth/refresh", "/api/v1/clients/add"


async def keys(broker, prefix: str) -> set[bytes]:
    return {k async for k in broker._redis.scan_iter(match=f"{prefix}:*", count=SCAN_COUNT)}


class Api:
    """A replica with its HTTP side, and a session to call it."""

    def __init__(self, replica, session: aiohttp.ClientSession) -> None:
        self.replica = replica
        self.url = f"http://127.0.0.1:{replica.http_port}"
        self.session = session

    async def post(self, path: str, body=None, *, headers=None, data=None, method="POST"):
        """(status, parsed JSON body) of one request."""
        kwargs = {"json": body} if data is None else {"data": data}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            assert resp.content_type == "application/json", (resp.status, await resp.text())
            return resp.status, await resp.json(), resp.headers

    async def refresh(self, token: str, role: str = "client"):
        return await self.post(REFRESH, {"refresh_token": token, "role": role})

    async def add(self, access: str | None, **body):
        body = {"name": "n", "client_id": "", "preferred_combiner": "", "package": "local",
                "client_version": "1.0.0", **body}  # fmt: skip
        headers = {"Authorization": f"Bearer {access}"} if access else {}
        return await self.post(ADD, body, headers=headers)


@pytest.fixture
async def make_api(make_replica, tmp_path):
    sessions = []

    async def start(**opts):
        opts.setdefault("insecure", False)
        opts.setdefault("http_port", 0)
        opts.setdefault("signing_key", str(tmp_path / "signing-key.pem"))
        replica = await make_replica(**opts)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Api(replica, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def api(make_api):
    return await make_api()


@pytest.fixture
async def quiet(api, broker, prefix):
    """The replica's own keys exist (registration, published key): from here on a new key
    under the prefix was written by a request."""
    await api.replica.register(lease=60)
    return await keys(broker, prefix)


# --- token exchange ------------------------------------------------------------------------


async def test_refresh_answers_a_jwt_that_verifies_with_the_published_key(api, broker):
    refresh, record = await broker.credentials.create("alice")
    status, body, headers = await api.refresh(refresh)
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] == api.replica.opts.access_ttl
    assert "refresh_token" not in body and "refresh" not in body  # refresh tokens never rotate
    assert headers["Cache-Control"] == "no-store"
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == ALGORITHM
    published = await broker.credentials.public_keys()
    assert header["kid"] in published and header["kid"] == api.replica.http.signing_key.kid
    claims = jwt.decode(
        body["access_token"], load_public(published[header["kid"]]), algorithms=[ALGORITHM],
        audience="scaleout",
    )  # fmt: skip
    assert (claims["sub"], claims["tid"], claims["role"]) == ("alice", record.id, "client")
    caller = await api.replica.auth.verify(body["access_token"])  # what gRPC will accept
    assert caller.client_id == "alice"
    # the same refresh token works again (the 1.0.0 CLI re-uses it after restarts)
    assert (await api.refresh(refresh))[0] == 200


async def test_refresh_refuses_unknown_revoked_and_expired_tokens(api, broker):
    assert (await api.refresh("sct_" + "x" * 43))[:2] == (401, {"message": "unknown refresh token"})
    assert (await api.refresh("not-a-token"))[0] == 401
    revoked, _ = await broker.credentials.create("bob")
    assert (await api.refresh(revoked))[0] == 200
    await broker.credentials.revoke(revoked)
    # read from Redis on each refresh: refused at once, whatever any replica has cached
    assert (await api.refresh(revoked))[:2] == (401, {"message": "refresh token revoked"})
    expiring, _ = await broker.credentials.create("carol", expires_days=1 / 86400)

    async def expired():
        status, body, _ = await api.refresh(expiring)
        return status == 401 and body

    assert await eventually(expired, what="an expired refresh token refused") == {
        "message": "refresh token expired"
    }


async def test_refresh_roles(api, broker):
    client, _ = await broker.credentials.create("c1", "client")
    status, body, _ = await api.refresh(client, role="admin")
    assert status == 403 and "role is client" in body["message"]
    admin, _ = await broker.credentials.create("ops", "admin")
    for asked, granted in (("admin", "admin"), ("client", "client"), ("", "admin")):
        status, body, _ = await api.refresh(admin, role=asked)
        assert status == 200, body
        assert jwt.decode(body["access_token"], options={"verify_signature": False})["role"] == (
            granted
        )
    assert (await api.refresh(client, role="root"))[0] == 400


async def test_refresh_without_a_signing_key_or_tokens_says_so(make_api, broker):
    keyless = await make_api(signing_key="")
    refresh, _ = await broker.credentials.create("c1")
    status, body, headers = await keyless.refresh(refresh)
    assert status == 503 and "no signing key" in body["message"] and headers["Retry-After"]
    insecure = await make_api(insecure=True)
    status, body, _ = await insecure.refresh(refresh)
    assert status == 400 and "--insecure" in body["message"]


async def test_a_revoked_token_id_is_refused_by_grpc_auth_soon_after(api, broker):
    refresh, record = await broker.credentials.create("dora")
    access = (await api.refresh(refresh))[1]["access_token"]
    assert (await api.replica.auth.verify(access)).token_id == record.id
    await broker.credentials.revoke(record.id)

    async def refused():
        return (await api.add(access))[0] == 401

    await eventually(refused, what="the revoked token's access token refused")


# --- assignment ----------------------------------------------------------------------------


async def test_clients_add_answers_the_tokens_client_id_and_the_public_address(make_api, broker):
    api = await make_api(public_host="lb.example", public_port=443)
    refresh, _ = await broker.credentials.create("alice")
    access = (await api.refresh(refresh))[1]["access_token"]
    status, body, _ = await api.add(access, client_id="mallory", name="Alice's laptop")
    assert status == 200, body
    assert body == {
        "client_id": "alice",  # the token's, whatever the body says
        "name": "Alice's laptop",
        "public_hostname": "lb.example",
        "internal_hostname": "lb.example",
        "port": 443,
        "package": "local",
        "helper_type": "numpyhelper",
    }


async def test_clients_add_defaults_to_the_replicas_own_address(api, broker):
    key = api.replica.http.signing_key
    issued = await issue(broker, key, "bob")
    status, body, _ = await api.add(issued.access_token, client_id="", name=None)
    assert status == 200, body
    assert body["public_hostname"] == "127.0.0.1" and body["port"] == api.replica.port
    assert isinstance(body["port"], int) and body["name"] == "bob"


async def test_clients_add_refuses_missing_and_bad_tokens_and_waits_for_a_package(api, broker):
    for access in (None, "garbage", "a.b.c"):
        status, body, headers = await api.add(access)
        assert status == 401 and body["message"], (access, body)
        assert headers["WWW-Authenticate"] == "Bearer"
    unpublished = await issue(broker, SigningKey.generate(), "eve")
    assert (await api.add(unpublished.access_token))[0] == 401
    retired_key = await publish(broker)
    retired = await issue(broker, retired_key, "eve")
    await broker.credentials.retire_key(retired_key.kid)
    assert (await api.add(retired.access_token))[0] == 401
    issued = await issue(broker, api.replica.http.signing_key, "bob")
    status, body, _ = await api.add(issued.access_token, package="remote")
    assert status == 203 and "no compute package" in body["message"]  # the client retries
    assert (await api.add(issued.access_token, package="other"))[0] == 400


async def test_insecure_clients_add_takes_the_clients_word(make_api):
    api = await make_api(insecure=True)
    status, body, _ = await api.add(None, client_id="c7")
    assert (status, body["client_id"]) == (200, "c7")
    status, body, _ = await api.add(None, client_id=None)
    assert status == 200 and len(body["client_id"]) == 36  # a new uuid


async def test_redis_down_is_503_for_refresh_and_a_retried_203_for_add(tmp_path):
    """What the 1.0.0 client does with each: refresh failures stop it whatever the status;
    203 on add is the one answer it retries (every 3 s)."""
    from tests.conftest import replica_at

    server = RedisServer().start()
    try:
        async with replica_at(
            server.url, insecure=False, http_port=0, signing_key=str(tmp_path / "k.pem")
        ) as (replica, _):
            refresh, record = await replica.broker.credentials.create("c1")
            access = replica.http.signing_key.mint("c1", "client", record.id, 600).token
            async with aiohttp.ClientSession() as session:
                api = Api(replica, session)
                server.kill()
                status, body, headers = await api.refresh(refresh)
                assert status == 503 and body["message"] and headers["Retry-After"] == "1"
                status, body, _ = await api.add(access)
                assert status == 203 and "try again" in body["message"]
                server.start()
    finally:
        server.close()


# --- hostile input -------------------------------------------------------------------------

HOSTILE = [
    ("POST", REFRESH, {"Content-Type": "application/json"}, b"{not json"),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b"\xff\xfe\x00"),
    ("POST", REFRESH, {"Content-Type": "text/plain"}, b'{"refresh_token": "sct_x"}'),
    ("POST", REFRESH, {}, b'{"refresh_token": "sct_x"}'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'["sct_x"]'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'"sct_x"'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b"null"),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'{"refresh_token": 7}'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'{"refresh_token": ["a"]}'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'{"role": "client"}'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b'{"refresh_token": "", "role": 1}'),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b"[" * 100_00 + b"]" * 100_00),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b" " * (MAX_BODY + 1)),
    ("POST", REFRESH, {"Content-Type": "application/json"}, b"x" * (4 << 20)),
    ("POST", ADD, {"Content-Type": "application/json"}, b'{"client_id": "c1"}'),
    ("POST", ADD, {"Content-Type": "application/json", "Authorization": "Bearer"}, b"{}"),
    ("POST", ADD, {"Authorization": "Basic dXNlcjpwYXNz"}, b"{}"),
    ("POST", ADD, {"Authorization": "Bearer " + "A" * 65536}, b"{}"),
    ("GET", REFRESH, {}, b""),
    ("PUT", ADD, {}, b"{}"),
    ("DELETE", REFRESH, {}, b""),
    ("GET", "/", {}, b""),
    ("GET", "/api/v1/packages/download", {}, b""),
    ("POST", "/api/v1/clients/add/../../auth/refresh", {}, b""),
    ("POST", "/api/v1/sessions/", {"Content-Type": "application/json"}, b"{}"),
    ("GET", "/%00%ff", {}, b""),
]


@pytest.mark.parametrize("method,path,headers,data", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_requests_get_a_4xx_json_message_and_write_nothing(
    api, quiet, broker, prefix, method, path, headers, data
):
    api.replica.http.limiter = FailureLimiter(free=10**6)  # the statuses, not the slowing
    async with api.session.request(method, api.url + path, headers=headers, data=data) as resp:
        body = await resp.json(content_type=None)
        assert 400 <= resp.status < 500, (resp.status, body)
        assert resp.content_type == "application/json"
        assert isinstance(body["message"], str) and body["message"]
    assert await keys(broker, prefix) == quiet


async def test_a_header_too_long_to_parse_is_a_4xx_before_any_handler(api, broker, quiet, prefix):
    headers = {"Authorization": "Bearer " + "A" * (200 * 1024)}
    async with api.session.post(api.url + ADD, headers=headers, data=b"{}") as resp:
        assert 400 <= resp.status < 500
    assert await keys(broker, prefix) == quiet


async def test_hostile_add_fields_with_a_good_token(api, broker, quiet, prefix):
    issued = await issue(broker, api.replica.http.signing_key, "bob")
    quiet = await keys(broker, prefix)
    for field in ("name", "client_id", "preferred_combiner", "package", "client_version"):
        for value in (1, 2.5, True, [], {}, "x" * 5000):
            status, body, _ = await api.add(issued.access_token, **{field: value})
            assert status == 400 and field in body["message"], (field, value, body)
    assert await keys(broker, prefix) == quiet


async def test_repeated_failed_refreshes_from_one_address_are_slowed(make_api, broker):
    api = await make_api(trust_forwarded_for=True)
    good, _ = await broker.credentials.create("alice")
    attacker = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}  # the proxy appended 10.0.0.1
    limiter = api.replica.http.limiter
    for _ in range(limiter.free):
        body = {"refresh_token": "sct_guess", "role": "client"}
        assert (await api.post(REFRESH, body, headers=attacker))[0] == 401
    status, body, headers = await api.post(
        REFRESH, {"refresh_token": good, "role": "client"}, headers=attacker
    )
    assert status == 429 and int(headers["Retry-After"]) >= 1 and body["message"]
    # the block is per address: another client behind the same proxy still refreshes
    assert (await api.post(REFRESH, {"refresh_token": good}, headers={"X-Forwarded-For": "::1"}))[
        0
    ] == 200


async def test_without_trust_the_forwarded_header_is_ignored(api, broker):
    for i in range(api.replica.http.limiter.free):
        forged = {"X-Forwarded-For": f"198.51.100.{i}"}
        assert (await api.post(REFRESH, {"refresh_token": "sct_x"}, headers=forged))[0] == 401
    assert (await api.post(REFRESH, {"refresh_token": "sct_x"}))[0] == 429


def test_the_failure_limiter_grows_its_delay_and_bounds_its_memory():
    limiter = FailureLimiter(free=2, max_block=8, max_entries=10)
    assert limiter.retry_after("a") == 0
    limiter.failed("a")
    limiter.failed("a")
    first = limiter.retry_after("a")
    limiter.failed("a")
    assert 0 < first <= 1 < limiter.retry_after("a") <= 2
    for _ in range(20):
        limiter.failed("a")
    assert limiter.retry_after("a") <= 8
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) <= 10


# --- logs ----------------------------------------------------------------------------------


async def test_no_token_appears_in_any_log_line(api, broker, caplog):
    caplog.set_level(logging.DEBUG)
    refresh, _ = await broker.credentials.create("alice")
    access = (await api.refresh(refresh))[1]["access_token"]
    await api.add(access, client_id="x")
    await api.add(access + "x")
    await api.refresh(refresh + "x")
    await api.refresh(refresh, role="admin")
    await broker.credentials.revoke(refresh)
    await api.refresh(refresh)
    await api.post(REFRESH, data=b"{" + refresh.encode())
    assert "combiner.http.access" in {r.name for r in caplog.records}  # the access log ran
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (refresh, access, refresh[4:20], access.split(".")[2]):
        assert secret not in text


# --- fuzz ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["refresh_token", "role", "name", "client_id", "preferred_combiner", "package",
     "client_version", "x"]
)  # fmt: skip
texts = st.none() | st.text(max_size=40) | st.sampled_from(["{}:*%", "a\nb", "\x00", "é☃"])
add_bodies = st.fixed_dictionaries(
    {},
    optional={
        "name": texts, "client_id": texts, "preferred_combiner": texts,
        "package": st.sampled_from([None, "local", "remote", "x"]), "client_version": texts,
    },
)  # fmt: skip
bodies = (
    add_bodies.map(lambda d: json.dumps(d).encode())
    | st.dictionaries(field_names, json_values, max_size=6).map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
)
content_types = st.sampled_from(["application/json", "text/plain", "", "application/json; x=y"])


def fuzz_in_thread(url: str, access: str) -> list[int]:
    """Run the hypothesis fuzz with blocking urllib (the replica serves on the test's loop)."""
    seen: list[int] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from([REFRESH, ADD, "/api/v1/x", "/"]),
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PATCH"]),
        body=bodies,
        content_type=content_types,
        auth=st.sampled_from(["", f"Bearer {access}", "Bearer x", f"Bearer {access} {access}"]),
    )
    # A valid assignment is ~1 draw in 200: without this example a run of 300 may miss it.
    @example(path=ADD, method="POST", body=b'{"package": "local"}',
             content_type="application/json", auth=f"Bearer {access}")  # fmt: skip
    def one(path, method, body, content_type, auth):
        request = urllib.request.Request(url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        assert status < 500, (status, payload)
        parsed = json.loads(payload)
        assert isinstance(parsed, dict)
        if status >= 400:
            assert isinstance(parsed["message"], str)
        seen.append(status)

    one()
    return seen


async def test_fuzz_both_routes(api, broker, quiet, prefix):
    api.replica.http.limiter = FailureLimiter(free=10**6)
    issued = await issue(broker, api.replica.http.signing_key, "fuzz")
    await api.replica.auth.verify(issued.access_token)  # its key is known: no lookups later
    quiet = await keys(broker, prefix)
    errors: list[BaseException] = []

    def run():
        try:
            run.seen = fuzz_in_thread(api.url, issued.access_token)
        except BaseException as exc:  # reported on the loop's side
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 120)
    if errors:
        raise errors[0]
    assert {200, 400, 401, 404, 405} <= set(run.seen)
    assert await keys(broker, prefix) == quiet


# --- the reference client's token flow -------------------------------------------------------


async def test_the_reference_client_joins_with_a_token_and_sends_it_on_every_rpc(api, broker):
    from combiner.refclient import ReferenceClient

    refresh, _ = await broker.credentials.create("alice")
    client = ReferenceClient("", "whoever", api_url=api.url, token=refresh, poll_interval=0.05)
    corr = await broker.tasks.push("alice", "Custom_echo", data="{}")
    client.custom = {"echo": lambda params: {"ok": True}}
    stop = asyncio.Event()
    run = asyncio.create_task(client.run(stop))

    async def done():
        if run.done():
            run.result()  # a failure of the client fails the test here
        return corr in client.counters.received and client.counters.tasks == 1

    try:
        await eventually(done, what="alice's task handed to the token-holding client")
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
    assert client.client_id == "alice" and client.target == f"127.0.0.1:{api.replica.port}"
    sent = dict(client.metadata)
    assert sent["client"] == "alice" and sent["authorization"] == f"Bearer {client.access_token}"
    assert (await api.replica.auth.verify(client.access_token)).client_id == "alice"


async def test_the_reference_client_stops_on_a_refused_token(api, broker):
    from combiner.refclient import JoinRefused, ReferenceClient

    refresh, _ = await broker.credentials.create("bob")
    await broker.credentials.revoke(refresh)
    client = ReferenceClient("", "bob", api_url=api.url, token=refresh)
    with pytest.raises(JoinRefused, match="401 refresh token revoked"):
        await asyncio.wait_for(client.run(asyncio.Event()), 10)
