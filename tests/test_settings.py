"""Every setting with a default is a flag with a COMBINER_* variable on the command that uses
it, and one function (settings_from_flags) turns a command's flags into its settings."""

from __future__ import annotations

import dataclasses
import inspect
import os

import click
import pytest
import redis

from broker.context import Settings
from broker.keys import Keys
from combiner.cli import SERVE_FLAGS, WORKER_FLAGS, main, open_broker, settings_from_flags
from combiner.cli_docs import _commands
from combiner.server import ServeOptions
from tests.test_cli import clean_env, run
from workers.runner import Worker

# Flag defaults that differ from their field's on purpose.
DELIBERATE = {
    # In production a drain waits for the load balancer's health checks to move traffic
    # away; the in-process replicas of the tests have no load balancer to wait for.
    ("serve", "drain_delay"): (2.0, 0.0),
}


def command(*path: str) -> click.Command:
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def broker_commands() -> list[tuple[str, click.Command]]:
    """Every command that opens a broker (all but the demo, which runs its own processes, and
    openapi, which only reads the route table)."""
    found = [(" ".join(p), c) for p, c in _commands(main, []) if p not in (["demo"], ["openapi"])]
    assert {"serve", "worker", "task push", "status", "model put"} <= {p for p, _ in found}
    return found


def assert_flag(cmd: click.Command, name: str, default, where: str) -> None:
    params = {p.name: p for p in cmd.params}
    assert name in params, f"{where}: no flag for {name}"
    param = params[name]
    assert isinstance(param, click.Option), (where, name)
    assert param.envvar == "COMBINER_" + name.upper(), (where, name, param.envvar)
    assert param.default == default, (where, name, param.default, default)


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_every_broker_setting_is_a_flag_of_every_command_that_opens_a_broker():
    for where, cmd in broker_commands():
        for name, default in field_defaults(Settings).items():
            assert_flag(cmd, name, default, where)


def test_every_serve_option_is_a_flag_of_serve():
    for name, default in field_defaults(ServeOptions).items():
        flag, _ = SERVE_FLAGS.get(name, (name, None))
        if name == "model_cache_bytes":
            default >>= 20  # the flag is in MiB
        default = DELIBERATE.get(("serve", name), (default,))[0]
        assert_flag(command("serve"), flag, default, "serve")


def test_every_worker_option_is_a_flag_of_worker():
    defaults = {
        name: p.default
        for name, p in inspect.signature(Worker).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert set(defaults) == set(WORKER_FLAGS)
    for name, default in defaults.items():
        assert_flag(command("worker"), name, default, "worker")


def flags_of(monkeypatch, path: tuple[str, ...], args: list[str], env: dict[str, str]) -> dict:
    """The keyword arguments click hands the command, given args and environment."""
    for key in [k for k in os.environ if k.startswith("COMBINER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cmd = command(*path)
    ctx = cmd.make_context(" ".join(path), list(args))
    kw = dict(ctx.params)
    kw.pop("log_level"), kw.pop("log_format")
    return kw


def test_environment_variables_become_settings(monkeypatch):
    kw = flags_of(
        monkeypatch,
        ("serve",),
        ["--port", "0"],
        {
            "COMBINER_STREAM_MAXLEN": "123",
            "COMBINER_TASK_TTL": "77",
            "COMBINER_UPLOAD_TTL": "66",
            "COMBINER_OFFLINE_AFTER": "9.5",
            "COMBINER_PRESENCE_EVERY": "0.25",
            "COMBINER_BATCH_WINDOW": "0",
            "COMBINER_REUSE_PORT": "1",
            "COMBINER_MODEL_CACHE_MB": "3",
            "COMBINER_DRAIN_DELAY": "0.5",
            "COMBINER_REPLICA_ID": "r-env",
            "COMBINER_MODEL_STORE": "disk",
            "COMBINER_STATE_DIR": "/tmp/somewhere",
        },
    )
    cfg = settings_from_flags(kw)
    assert kw == {}  # serve has no arguments of its own: every flag was a setting
    assert cfg.broker == Settings(
        stream_maxlen=123,
        task_ttl=77,
        upload_ttl=66,
        offline_after=9.5,
        presence_every=0.25,
        batch_window=0.0,
    )
    assert cfg.serve == ServeOptions(
        port=0, reuse_port=True, model_cache_bytes=3 << 20, drain_delay=0.5
    )
    assert (cfg.replica_id, cfg.model_dir) == ("r-env", "/tmp/somewhere/models")
    assert cfg.worker is None


def test_worker_flags_become_worker_options(monkeypatch):
    kw = flags_of(
        monkeypatch,
        ("worker",),
        ["--lease-ttl", "3", "--worker-id", "w-flag"],
        {"COMBINER_CLAIM_AFTER": "2.5", "COMBINER_OFFLINE_AFTER": "4", "COMBINER_PREFIX": "p"},
    )
    cfg = settings_from_flags(kw)
    assert kw == {}
    assert cfg.worker == {
        "worker_id": "w-flag",
        "lease_ttl": 3.0,
        "poll_every": 0.5,
        "claim_after": 2.5,
        "allow_server_functions": False,
        "server_functions_timeout": 60.0,
        "server_functions_memory_mb": 2048,
    }
    assert (cfg.broker.offline_after, cfg.broker.prefix, cfg.serve) == (4.0, "p", None)


def test_a_command_keeps_its_own_arguments(monkeypatch):
    kw = flags_of(monkeypatch, ("task", "show"), ["abc", "--json"], {})
    cfg = settings_from_flags(kw)
    assert kw == {"correlation_id": "abc", "as_json": True}
    assert cfg.broker == Settings() and cfg.model_dir is None


async def test_stream_maxlen_from_the_environment_caps_the_streams(monkeypatch, redis_url, prefix):
    kw = flags_of(
        monkeypatch,
        ("status",),
        [],
        {"COMBINER_REDIS_URL": redis_url, "COMBINER_PREFIX": prefix, "COMBINER_STREAM_MAXLEN": "5"},
    )
    cfg = settings_from_flags(kw)
    async with open_broker(cfg) as broker:
        for i in range(400):
            await broker.inbound.add("metrics", f"c{i % 7}", {"step": str(i)})
        length = await broker._ctx.call(broker._redis.xlen, broker._keys.inbound("metrics"))
    # MAXLEN ~ trims whole stream nodes (100 entries by default), so "about 5"
    assert length < 200, length


def test_task_ttl_from_the_environment_sets_the_task_expiry(redis_url, prefix):
    env = clean_env(COMBINER_REDIS_URL=redis_url, COMBINER_PREFIX=prefix, COMBINER_TASK_TTL="1234")
    push = run("task", "push", "--client", "ttl-client", "--type", "Fedn_Validation", env=env)
    assert push.returncode == 0, push.stderr
    corr = push.stdout.strip()
    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.ttl(Keys(prefix).taskref(corr, 0))
    finally:
        client.close()
    assert 1200 < ttl <= 1234, ttl


@pytest.mark.parametrize("flag", ["--stream-maxlen", "--task-ttl", "--upload-ttl"])
def test_a_bad_setting_fails_clearly(flag):
    proc = run("status", flag, "0", "--redis-url", "redis://127.0.0.1:1/0")
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr
