"""`combiner token ...` as subprocesses against a real Redis: a token is printed once (the
last line of stdout) and Redis keeps only its hash; list, revoke, keys, retire-key; clear
errors without tracebacks; and `combiner serve --http-port` end to end (a token from the CLI
refreshed over HTTP, the signing key created and published)."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import urllib.error
import urllib.request

import jwt
import pytest

from broker.embedded import free_port
from combiner.processes import Child
from tests.test_cli import assert_clean_failure, clean_env, keys_under, run


def create(at, *args: str) -> tuple[str, str]:
    """(token, stderr) of `token create`."""
    proc = run("token", "create", *at, *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout.strip().splitlines()[-1], proc.stderr


def everything_under(rdb, prefix: str) -> str:
    """Every key and value under the prefix, as one text."""
    out = []
    for key in keys_under(rdb, prefix):
        kind = rdb.type(key).decode()
        value = {
            "hash": lambda k: rdb.hgetall(k),
            "zset": lambda k: rdb.zrange(k, 0, -1, withscores=True),
            "string": lambda k: rdb.get(k),
            "set": lambda k: rdb.smembers(k),
            "list": lambda k: rdb.lrange(k, 0, -1),
        }.get(kind, lambda k: b"")(key)
        out.append(f"{key} {value!r}")
    return "\n".join(out)


def token_list(at) -> list[dict]:
    proc = run("token", "list", "--json", *at)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_create_prints_the_token_last_and_redis_keeps_only_its_hash(at, rdb, prefix):
    token, stderr = create(at, "--client", "alice", "--expires-days", "30")
    assert token.startswith("sct_") and len(token) > 40
    assert "alice" in stderr and "expires" in stderr and token not in stderr
    stored = everything_under(rdb, prefix)
    assert stored and "alice" in stored
    assert token not in stored and token[4:] not in stored and token[4:24] not in stored
    (record,) = token_list(at)
    assert record["client_id"] == "alice" and record["role"] == "client"
    assert record["status"] == "active" and float(record["expires"]) > float(record["created"])
    assert "hash" not in record and token not in json.dumps(record)


def test_list_shows_a_table_and_json_without_hashes(at):
    first, _ = create(at, "--client", "c1")
    second, _ = create(at, "--client", "ops", "--role", "admin")
    proc = run("token", "list", *at)
    assert proc.returncode == 0, proc.stderr
    assert "c1" in proc.stdout and "ops" in proc.stdout and "admin" in proc.stdout
    assert "never" in proc.stdout
    records = token_list(at)
    assert [r["client_id"] for r in records] == ["c1", "ops"]
    for r in records:
        assert r["id"] in proc.stdout
        text = json.dumps(r) + proc.stdout
        assert first not in text and second not in text and "hash" not in r


def test_revoke_by_token_by_id_and_by_client(at):
    by_token, _ = create(at, "--client", "c1")
    create(at, "--client", "c2")
    create(at, "--client", "c3")
    create(at, "--client", "c3")
    ids = {r["client_id"]: r["id"] for r in token_list(at)}
    proc = run("token", "revoke", by_token, *at)
    assert proc.returncode == 0 and proc.stdout.split() == [ids["c1"]], proc.stderr
    proc = run("token", "revoke", ids["c2"], *at)
    assert proc.returncode == 0 and proc.stdout.split() == [ids["c2"]], proc.stderr
    proc = run("token", "revoke", "--client", "c3", *at)
    assert proc.returncode == 0 and len(proc.stdout.split()) == 2, proc.stderr
    assert {r["status"] for r in token_list(at)} == {"revoked"}


@pytest.mark.parametrize(
    "args,words",
    [
        (["revoke", "sct_nope"], ["no such token"]),
        (["revoke", "0123456789abcdef"], ["no such token"]),
        (["revoke", "--client", "nobody"], ["no tokens"]),
        (["revoke"], ["TOKEN"]),
        (["revoke", "x", "--client", "y"], ["TOKEN"]),
        (["create"], ["--client"]),
        (["create", "--client", "c1", "--role", "root"], ["--role"]),
        (["create", "--client", "c1", "--expires-days", "0"], ["--expires-days"]),
        (["create", "--client", "x" * 300], ["client id"]),
        (["retire-key", "nokey"], ["no published signing key"]),
    ],
)
def test_bad_token_commands_fail_clearly_and_write_nothing(at, rdb, prefix, args, words):
    before = keys_under(rdb, prefix)
    proc = run("token", *args[:1], *at, *args[1:])
    assert_clean_failure(proc, *words)
    assert keys_under(rdb, prefix) == before


def test_serve_with_http_creates_and_publishes_its_key_and_refreshes_cli_tokens(
    at, tmp_path, rdb, prefix
):
    token, _ = create(at, "--client", "alice")
    http_port = free_port()
    state = tmp_path / "state"
    replica = Child(
        ["serve", "--port", "0", "--http-port", str(http_port), "--state-dir", str(state),
         "--public-host", "lb.example", *at],
        str(tmp_path / "serve.log"), env=clean_env(),
    )  # fmt: skip
    replica.start(wait_listening=True)
    try:
        key_file = state / "signing-key.pem"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        url = f"http://127.0.0.1:{http_port}"
        # (serve printed "listening on" after its HTTP side started)
        status, body = post(url + "/api/auth/refresh", {"refresh_token": token})
        assert status == 200, body
        access = body["access_token"]
        kid = jwt.get_unverified_header(access)["kid"]
        proc = run("token", "keys", *at)
        assert proc.returncode == 0 and proc.stdout.split() == [kid], proc.stderr
        status, body = post(
            url + "/api/v1/clients/add", {"client_id": "x", "name": "a", "package": "local"},
            {"Authorization": f"Bearer {access}"},
        )  # fmt: skip
        assert status == 200 and body["client_id"] == "alice", body
        assert (body["public_hostname"], body["port"]) == ("lb.example", replica.port)
        run("token", "revoke", "--client", "alice", *at)
        assert post(url + "/api/auth/refresh", {"refresh_token": token})[0] == 401
        # rotation: once retired, the key's tokens are refused (after a restart it is
        # published again: a replica re-publishes the key it signs with)
        proc = run("token", "retire-key", kid, *at)
        assert proc.returncode == 0, proc.stderr
        assert run("token", "keys", "--json", *at).stdout.strip() == "{}"
    finally:
        replica.stop()
    log = pathlib.Path(tmp_path / "serve.log").read_text()
    assert token not in log and access not in log and "/api/auth/refresh" in log


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
