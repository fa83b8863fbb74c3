"""compose.yaml, the Dockerfile and deploy/haproxy.cfg are what the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess

import click
import pytest
import yaml

from combiner.cli import main
from tests.cluster import HAPROXY_CFG, ROOT

COMPOSE = ROOT / "compose.yaml"


def parse(args: list[str]) -> click.Context:
    """Parse a `combiner ...` command line the way the CLI would, without running it."""
    cmd, ctx, name = main, None, "combiner"
    while True:
        ctx = cmd.make_context(name, list(args), parent=ctx)
        if not isinstance(cmd, click.Group):
            return ctx
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, args = cmd.resolve_command(ctx, rest)


def test_every_compose_command_is_a_valid_combiner_invocation():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    combiner = [s for s in services.values() if s.get("image") == "redis-combiner:latest"]
    assert len(combiner) == 5
    kinds = sorted(s["command"][0] for s in combiner)
    assert kinds == ["serve", "serve", "serve", "worker", "worker"]
    for service in combiner:
        ctx = parse(service["command"])
        assert ctx.command.name in ("serve", "worker")
    assert parse(["serve", "--port", "0"]).params["port"] == 0
    with pytest.raises(click.UsageError):
        parse(["serve", "--no-such-flag"])


def test_compose_haproxy_uses_the_tested_config():
    compose = yaml.safe_load(COMPOSE.read_text())
    haproxy = compose["services"]["haproxy"]
    volume = haproxy["volumes"][0].split(":")[0]
    assert (ROOT / volume).resolve() == HAPROXY_CFG
    assert set(haproxy["environment"]) == {"HAPROXY_BIND", "REPLICA1", "REPLICA2", "REPLICA3"}
    assert compose["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]


def test_dockerfile_runs_the_combiner_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["combiner"]' in text and "USER combiner" in text
    assert "HEALTHCHECK" in text


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_the_config():
    env = {
        **os.environ,
        "HAPROXY_BIND": "127.0.0.1:12080",
        "REPLICA1": "127.0.0.1:1",
        "REPLICA2": "127.0.0.1:2",
        "REPLICA3": "127.0.0.1:3",
    }
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def health_check_bytes() -> str:
    """HTTP/2 bytes of one grpc.health.v1.Health/Check call with an empty request."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big")
            + bytes([kind, flags])
            + stream.to_bytes(4, "big")
            + payload
        )

    def literal(name_index: int, value: str) -> bytes:  # HPACK: literal, indexed name
        return bytes([0x40 | name_index, len(value)]) + value.encode()

    headers = (
        bytes([0x83, 0x86])  # :method POST, :scheme http
        + literal(4, "/grpc.health.v1.Health/Check")  # :path
        + literal(1, "localhost")  # :authority
        + literal(31, "application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    body = b"\x00" + (0).to_bytes(4, "big")  # uncompressed, empty HealthCheckRequest
    return (preface + frame(4, 0, 0, b"") + frame(1, 4, 1, headers) + frame(0, 1, 1, body)).hex()


def test_haproxy_health_check_bytes_are_a_grpc_health_call():
    line = next(ln for ln in HAPROXY_CFG.read_text().splitlines() if "tcp-check send-binary" in ln)
    assert line.split()[-1] == health_check_bytes()
