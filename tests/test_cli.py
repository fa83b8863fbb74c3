"""The real `combiner` command line, run as subprocesses against a real Redis
(docs/configuration.md): clear errors without tracebacks, nothing written on bad input,
COMBINER_* environment variables, and the embedded Redis under --state-dir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import click
import pytest
import redis

from broker.embedded import free_port
from broker.keys import Keys
from combiner.cli import main as cli_main
from tests.services import SCAN_COUNT

_SCRIPT = pathlib.Path(sys.executable).with_name("combiner")
COMBINER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "combiner"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMBINER_")}
    env.update(extra)
    return env


def run(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMBINER, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=120,
    )


def assert_clean_failure(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("Error:") or "Error:" in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def keys_under(rdb, prefix: str) -> list[str]:
    """The prefix's keys but its schema marks (broker/schema.py), which every command
    writes when it connects to a fresh prefix, before it looks at its input."""
    marks = {f"{prefix}:schema".encode(), f"{prefix}:partitions".encode()}
    keys = rdb.scan_iter(match=f"{prefix}:*", count=SCAN_COUNT)
    return sorted(k.decode() for k in keys if k not in marks)


# --- help ------------------------------------------------------------------------------------


def command_paths(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from command_paths(sub, (*path, name))


def test_help_works_for_every_command_and_subcommand():
    paths = list(command_paths(cli_main))
    assert ("model", "put") in paths and ("task", "show") in paths
    with ThreadPoolExecutor(8) as pool:
        procs = list(pool.map(lambda p: run(*p, "--help"), paths))
    for path, proc in zip(paths, procs, strict=True):
        assert proc.returncode == 0, (path, proc.stderr)
        assert proc.stdout.startswith("Usage:"), (path, proc.stdout)
        assert proc.stderr == "", (path, proc.stderr)
    # every flag names its environment variable
    push_help = procs[paths.index(("task", "push"))].stdout
    assert "COMBINER_REDIS_URL" in push_help and "COMBINER_PREFIX" in push_help


# --- models ----------------------------------------------------------------------------------


def test_model_put_prints_an_id_and_get_gives_the_same_bytes(at, tmp_path, rdb, prefix):
    data = os.urandom(2 * 1024 * 1024 + 333)
    source = tmp_path / "model.npz"
    source.write_bytes(data)
    put = run("model", "put", str(source), *at)
    assert put.returncode == 0, put.stderr
    model_id = put.stdout.strip()
    assert model_id and "\n" not in model_id

    target = tmp_path / "out.npz"
    got = run("model", "get", model_id, "-o", str(target), *at)
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == data
    assert got.stdout == ""  # the message goes to stderr, stdout stays clean

    # under a chosen id too
    put = run("model", "put", str(source), "--id", "chosen-1", *at)
    assert (put.returncode, put.stdout.strip()) == (0, "chosen-1")
    assert rdb.hget(Keys(prefix).model("chosen-1"), "state") == b"ok"


def test_model_get_unknown_fails_clearly(at, tmp_path):
    target = tmp_path / "never.npz"
    proc = run("model", "get", "unknown", "-o", str(target), *at)
    assert_clean_failure(proc, "unknown")
    assert not target.exists()


def test_model_put_unsafe_id_fails_clearly(at, tmp_path, rdb, prefix):
    source = tmp_path / "m"
    source.write_bytes(b"abc")
    proc = run("model", "put", str(source), "--id", "../evil", *at)
    assert_clean_failure(proc, "model id")
    assert keys_under(rdb, prefix) == []
    assert not (tmp_path.parent / "evil").exists()


# --- tasks -----------------------------------------------------------------------------------


def test_task_push_prints_an_id_and_show_reports_it_queued(at, rdb, prefix):
    push = run(
        "task", "push", "--client", "c1", "--type", "Fedn_ModelUpdate",
        "--data", '{"client_settings": {"lr": 0.1}}', "--session", "s1", "--round", "2", *at,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    corr = push.stdout.strip()
    assert corr

    show = run("task", "show", corr, "--json", *at)
    assert show.returncode == 0, show.stderr
    view = json.loads(show.stdout)
    assert view["correlation_id"] == corr and view["state"] == "queued"
    assert view["client_id"] == "c1" and view["type"] == "Fedn_ModelUpdate"
    assert (view["session_id"], view["round_id"], view["attempts"]) == ("s1", "2", 0)
    assert rdb.llen(Keys(prefix).queue("c1")) == 1

    table = run("task", "show", corr, *at)  # the human-readable form works as well
    assert table.returncode == 0 and corr in table.stdout and "queued" in table.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--type", "Fedn_Training"],
        ["--type", "Custom_"],
        ["--type", ""],
        ["--type", "Fedn_ModelUpdate", "--data", "[1, 2]"],
        ["--type", "Fedn_ModelUpdate", "--data", "not json"],
        ["--type", "Fedn_ModelUpdate", "--data", '"a string"'],
        ["--type", "Custom_x", "--data", "{broken"],
        ["--type", "Fedn_Validation", "--model", "not-stored"],
    ],
    ids=["bad-type", "custom-without-name", "empty-type", "data-list", "data-not-json",
         "data-string", "custom-bad-json", "unknown-model"],
)  # fmt: skip
def test_task_push_bad_input_fails_clearly_and_queues_nothing(at, rdb, prefix, args):
    proc = run("task", "push", "--client", "c1", *args, *at)
    assert_clean_failure(proc)
    assert keys_under(rdb, prefix) == []


def test_task_show_unknown_fails_clearly(at):
    proc = run("task", "show", "no-such-task", "--json", *at)
    assert_clean_failure(proc, "no-such-task")


def test_unreachable_redis_fails_clearly():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = run("task", "show", "x", "--redis-url", url)
    assert_clean_failure(proc)
    assert "redis" in proc.stderr.lower()


def test_environment_variables_are_honoured(redis_url, prefix, rdb):
    env = clean_env(COMBINER_REDIS_URL=redis_url, COMBINER_PREFIX=prefix)
    push = run("task", "push", "--client", "env-client", "--type", "Fedn_Validation", env=env)
    assert push.returncode == 0, push.stderr
    corr = push.stdout.strip()
    assert rdb.exists(Keys(prefix).taskref(corr, 0))
    show = run("task", "show", corr, "--json", env=env)
    assert json.loads(show.stdout)["client_id"] == "env-client"
    # a flag wins over the environment
    other = run("task", "show", corr, "--prefix", prefix + "x", env=env)
    assert_clean_failure(other)


# --- embedded Redis --------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path):
    state = tmp_path / "state"
    yield state
    # never leave a server behind, whatever the test did
    url_file = state / "redis" / "redis.url"
    if url_file.exists():
        try:
            client = redis.Redis.from_url(url_file.read_text().strip(), socket_timeout=2)
            client.shutdown(nosave=True)
        except redis.RedisError:
            pass


def test_embedded_redis_keeps_tasks_between_short_commands(state_dir, tmp_path):
    # No --redis-url: each short command starts a private redis-server under --state-dir
    # and stops it when it exits; the AOF carries the data to the next command's server.
    push = run(
        "task", "push", "--client", "c1", "--type", "Fedn_Validation",
        "--state-dir", str(state_dir), cwd=tmp_path,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    corr = push.stdout.strip()

    redis_dir = state_dir / "redis"
    assert not (redis_dir / "redis.url").exists()  # the server stopped with the command
    assert "ready to exit" in (redis_dir / "redis.log").read_text()
    assert any(redis_dir.rglob("*.aof"))  # persisted

    show = run("task", "show", corr, "--json", "--state-dir", str(state_dir), cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    view = json.loads(show.stdout)
    assert (view["correlation_id"], view["state"]) == (corr, "queued")
    assert not (redis_dir / "redis.url").exists()
    assert not (tmp_path / ".combiner").exists()  # only the given state folder was used


def test_replicated_on_a_cluster_without_replicas_reads_and_refuses_writes(cluster_url, prefix):
    """--durability replicated on a Cluster whose primaries have no replica: a command that
    only reads works (with a warning), one that writes fails with one 'Error:' line."""
    at = ["--redis-url", cluster_url, "--prefix", prefix, "--durability", "replicated"]
    proc = run("status", *at, "--durability-timeout", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "0 connected replica(s), 1 needed" in proc.stderr
    proc = run("task", "push", "--client", "c1", "--type", "Custom_x", *at,
               "--durability-timeout", "0.1")  # fmt: skip
    assert_clean_failure(proc, "not confirmed by a Redis replica within 100 ms")


def test_a_sentinel_url_is_no_cluster(prefix):
    sentinel = ["--redis-url", "redis+sentinel://127.0.0.1:1/m", "--prefix", prefix]
    proc = run("status", *sentinel, "--redis-cluster")
    assert_clean_failure(proc, "names a Sentinel master, not a Cluster")


def test_a_cluster_url_may_name_several_nodes_of_which_the_first_is_down(cluster_url, prefix):
    live = cluster_url.split("://", 1)[1].split("/", 1)[0]
    several = f"redis://127.0.0.1:{free_port()},{live}/0"  # nobody listens on the first
    proc = run("task", "push", "--client", "c1", "--type", "Custom_x",
               "--redis-url", several, "--prefix", prefix)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run("task", "show", proc.stdout.strip(), "--json", "--redis-url", several,
               "--prefix", prefix)  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "queued", proc.stderr


def test_several_hosts_are_refused_for_a_redis_that_is_no_cluster(redis_url, prefix):
    live = redis_url.split("://", 1)[1].split("/", 1)[0]
    proc = run("status", "--redis-url", f"redis://{live},{live}/0", "--prefix", prefix)
    assert_clean_failure(proc, "names several hosts", "is not in a Cluster")
