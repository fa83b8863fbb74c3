"""The `combiner` command line (ARCHITECTURE.md). Every flag also reads COMBINER_<FLAG>."""

from __future__ import annotations

import asyncio
import functools
import json
import pathlib
import sys

import click

from broker import Broker, BrokerError, Settings, connect
from broker.embedded import EmbeddedRedis
from broker.records import SessionStatus
from combiner import __version__, logs
from combiner.render import print_session, print_status, print_task
from combiner.views import task_view


def option(*decls, **kwargs):
    """A click option that also reads COMBINER_<LONG_NAME> from the environment."""
    long = next(d for d in decls if d.startswith("--")).split("/")[0]
    kwargs.setdefault("envvar", "COMBINER_" + long[2:].replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    if "default" in kwargs and "show_default" not in kwargs:
        kwargs["show_default"] = True
    return click.option(*decls, **kwargs)


def redis_options(fn):
    """Where Redis is, and how to log: shared by every command that touches Redis."""
    decorators = [
        option(
            "--redis-url",
            default=None,
            help="Redis to use, e.g. redis://127.0.0.1:6379/0. Default: an embedded "
            "redis-server child process with its data under --state-dir.",
        ),
        option(
            "--state-dir",
            default=".combiner",
            type=click.Path(file_okay=False),
            help="Folder for the embedded Redis and the default disk model store.",
        ),
        option("--prefix", default="so", help="Prefix of every Redis key."),
        option(
            "--log-level",
            default="info",
            type=click.Choice(["debug", "info", "warning", "error"]),
            help="Log verbosity.",
        ),
        option(
            "--log-format",
            default="text",
            type=click.Choice(["text", "json"]),
            help="Log lines as text or as JSON objects.",
        ),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def model_store_options(fn):
    fn = option(
        "--model-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Folder of the disk model store (shared by all replicas). "
        "Default with --model-store disk: <state-dir>/models.",
    )(fn)
    return option(
        "--model-store",
        default="redis",
        type=click.Choice(["redis", "disk"]),
        help="Where new models' bytes go: chunks in Redis, or files on a shared disk.",
    )(fn)


def resolve_model_dir(kw) -> str | None:
    store, model_dir = kw.pop("model_store", "redis"), kw.pop("model_dir", None)
    if store == "disk":
        return model_dir or str(pathlib.Path(kw["state_dir"]) / "models")
    return model_dir  # given without disk store: used only to read disk-stored models


async def open_broker(kw, **extra) -> tuple[Broker, EmbeddedRedis | None]:
    url, embedded = kw["redis_url"], None
    if not url:
        embedded = EmbeddedRedis(kw["state_dir"])
        url = await asyncio.to_thread(embedded.start)
    settings = Settings(prefix=kw["prefix"])
    if kw.get("batch_window") is not None:
        settings.batch_window = kw["batch_window"]
    if kw.get("offline_after_setting"):
        settings.offline_after = kw["offline_after_setting"]
    broker = await connect(url, settings=settings, **extra)
    return broker, embedded


metrics_option = option(
    "--metrics-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (default: off).",
)


def start_metrics(port: int | None, broker: Broker) -> None:
    if port:
        from combiner import metrics

        metrics.track_batcher(broker.pipeline_counters)
        metrics.serve_metrics(port)


def run_async(fn):
    """Run an async command body; broker errors become a clear CLI error, not a traceback."""

    @functools.wraps(fn)
    def wrapper(**kw):
        logs.setup(kw.pop("log_level", "info"), kw.pop("log_format", "text"))
        try:
            return asyncio.run(fn(**kw))
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="combiner")
def main() -> None:
    """A horizontally scaled federated-learning combiner over Redis.

    Stateless gRPC replicas speak the scaleout protocol (the published scaleout 1.0.0
    client works against them); all state lives in Redis, so clients may use any replica.
    """


@main.command()
@redis_options
@model_store_options
@option("--host", default="127.0.0.1", help="Address to listen on.")
@option("--port", default=12080, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@option("--replica-id", default="", help="Name of this replica (default: host-pid-random).")
@option(
    "--max-model-bytes",
    default=1 << 30,
    type=click.IntRange(1),
    help="Largest model an Upload may carry (bigger: RESOURCE_EXHAUSTED).",
)
@option(
    "--model-cache-mb",
    default=256,
    type=click.IntRange(0),
    help="MiB of memory for models this replica serves often (the global model of a "
    "round): read from the store once, then every Download streams from memory. Models "
    "over half of it are streamed from the store. 0: off.",
)
@option(
    "--drain-timeout",
    default=10.0,
    type=click.FloatRange(0),
    help="On SIGTERM, seconds in-flight calls may take to finish.",
)
@metrics_option
@option(
    "--batch-window",
    default=0.002,
    type=click.FloatRange(0, 0.1),
    help="Seconds an RPC waits for concurrent RPCs to share its Redis pipeline: fewer "
    "round trips and less CPU per RPC under load, for that much added latency.",
)
@option(
    "--drain-delay",
    default=2.0,
    type=click.FloatRange(0),
    help="On SIGTERM, seconds to keep serving after reporting NOT_SERVING, so the load "
    "balancer's health checks move traffic away first.",
)
@option(
    "--stream-keepalive",
    default=15.0,
    type=click.FloatRange(0.1),
    help="Seconds between keepalive messages on an idle TaskStream.",
)
@run_async
async def serve(**kw) -> None:
    """Run one front-end replica (gRPC: CombinerClient, ModelService, health, reflection)."""
    from combiner.server import ServeOptions
    from combiner.server import serve as run_replica

    model_dir = resolve_model_dir(kw)
    broker, embedded = await open_broker(kw, replica_id=kw["replica_id"], model_dir=model_dir)
    start_metrics(kw["metrics_port"], broker)
    opts = ServeOptions(
        host=kw["host"],
        port=kw["port"],
        max_model_bytes=kw["max_model_bytes"],
        model_cache_bytes=kw["model_cache_mb"] << 20,
        drain_timeout=kw["drain_timeout"],
        drain_delay=kw["drain_delay"],
        stream_keepalive=kw["stream_keepalive"],
    )
    try:
        await run_replica(
            broker, opts, ready=lambda port: print(f"listening on {opts.host}:{port}", flush=True)
        )
    finally:
        if embedded:
            embedded.stop()


@main.group()
def model() -> None:
    """Store and fetch models."""


@model.command("put")
@redis_options
@model_store_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@option("--id", "model_id", default="", help="Model id to store under (default: a new uuid4).")
@run_async
async def model_put(**kw) -> None:
    """Store FILE as a model and print its id."""
    broker, _ = await open_broker(kw, model_dir=resolve_model_dir(kw))
    try:
        data = await asyncio.to_thread(pathlib.Path(kw["file"]).read_bytes)
        model_id = await broker.models.put(data, kw["model_id"])
        click.echo(model_id)
    finally:
        await broker.close()


@model.command("get")
@redis_options
@model_store_options
@click.argument("model_id")
@option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write.")
@run_async
async def model_get(**kw) -> None:
    """Fetch model MODEL_ID into a file."""
    broker, _ = await open_broker(kw, model_dir=resolve_model_dir(kw))
    try:
        data = await broker.models.get(kw["model_id"])
        await asyncio.to_thread(pathlib.Path(kw["output"]).write_bytes, data)
        click.echo(f"{len(data)} bytes written to {kw['output']}", err=True)
    finally:
        await broker.close()


@main.group()
def task() -> None:
    """Queue tasks for clients and inspect them."""


@task.command("push")
@redis_options
@option("--client", "client_id", required=True, help="Client id to queue the task for.")
@option(
    "--type",
    "task_type",
    required=True,
    help="Fedn_ModelUpdate, Fedn_Validation, Fedn_Prediction or Custom_<name>.",
)
@option("--model", "model_id", default="", help="Model id the client should download.")
@option("--data", default="", help="Task data: a JSON object (client_settings for training).")
@option("--session", "session_id", default="", help="Session id echoed back by the client.")
@option("--round", "round_id", default="", help="Round id echoed back by the client.")
@run_async
async def task_push(**kw) -> None:
    """Queue a task for one client and print its correlation id."""
    broker, _ = await open_broker(kw)
    try:
        if kw["model_id"]:
            await broker.models.ready_meta(kw["model_id"])
        corr = await broker.tasks.push(
            kw["client_id"],
            kw["task_type"],
            model_id=kw["model_id"],
            data=kw["data"],
            session_id=kw["session_id"],
            round_id=kw["round_id"],
        )
        click.echo(corr)
    finally:
        await broker.close()


@task.command("show")
@redis_options
@click.argument("correlation_id")
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
@run_async
async def task_show(**kw) -> None:
    """Show a task's state, the client's report and the result it produced."""
    broker, _ = await open_broker(kw)
    try:
        record = await broker.tasks.show(kw["correlation_id"])
    finally:
        await broker.close()
    if not record:
        raise click.ClickException(f"no task {kw['correlation_id']!r}")
    print_task(task_view(record), kw["as_json"])


@main.command()
@redis_options
@model_store_options
@option("--worker-id", default="", help="Name of this worker (default: host-pid-random).")
@option(
    "--lease-ttl",
    default=10.0,
    type=click.FloatRange(0.5),
    help="Seconds a session lease lasts unless renewed; a dead worker's sessions are "
    "taken over after this.",
)
@option(
    "--offline-after",
    default=30.0,
    type=click.FloatRange(0.5),
    help="A client is offline after this many seconds without any RPC.",
)
@metrics_option
@option(
    "--poll-every",
    default=0.5,
    type=click.FloatRange(0.05),
    help="Seconds between the coordinator's looks at a round's progress.",
)
@run_async
async def worker(**kw) -> None:
    """Run one worker: session coordinator with FedAvg, records, liveness (safe to run several)."""
    from workers.runner import run_worker

    kw["offline_after_setting"] = kw.pop("offline_after")
    broker, embedded = await open_broker(kw, model_dir=resolve_model_dir(kw))
    start_metrics(kw["metrics_port"], broker)
    try:
        await run_worker(
            broker,
            worker_id=kw["worker_id"],
            lease_ttl=kw["lease_ttl"],
            poll_every=kw["poll_every"],
        )
    finally:
        if embedded:
            embedded.stop()


@main.group()
def session() -> None:
    """Run federated training sessions and inspect them."""


@session.command("start")
@redis_options
@model_store_options
@option(
    "--seed-model",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The initial global model: an npz with arrays named 0..n-1.",
)
@option("--rounds", required=True, type=click.IntRange(1), help="Number of rounds.")
@option("--min-clients", default=1, type=click.IntRange(1), help="Clients needed to start a round.")
@option("--max-clients", default=100, type=click.IntRange(1), help="Most clients in a round.")
@option(
    "--round-timeout",
    default=180.0,
    type=click.FloatRange(0.1),
    help="Seconds a round waits for updates (and, after it, for validations).",
)
@option(
    "--client-wait",
    default=None,
    type=click.FloatRange(0),
    help="Seconds a round waits for --min-clients to be online (default: --round-timeout).",
)
@option(
    "--validate/--no-validate",
    default=True,
    help="Validate each round's new model on the round's clients.",
)
@option("--wait", is_flag=True, default=False, help="Wait until the session ends.")
@option("--json", "as_json", is_flag=True, default=False, help="Print JSON (with --wait).")
@run_async
async def session_start(**kw) -> None:
    """Queue a training session (a worker drives it); print its id, or its record with --wait."""
    from workers.fedavg import BadUpdate, load_npz

    if kw["max_clients"] < kw["min_clients"]:
        raise click.BadParameter("--max-clients must be >= --min-clients")
    data = await asyncio.to_thread(pathlib.Path(kw["seed_model"]).read_bytes)
    try:
        load_npz(data)
    except BadUpdate as exc:
        raise click.BadParameter(f"--seed-model: {exc}") from exc
    broker, _ = await open_broker(kw, model_dir=resolve_model_dir(kw))
    try:
        seed_id = await broker.models.put(data)
        config = {
            "rounds": kw["rounds"],
            "min_clients": kw["min_clients"],
            "max_clients": kw["max_clients"],
            "round_timeout": kw["round_timeout"],
            "client_wait": kw["client_wait"],
            "validate": kw["validate"],
        }
        session_id = await broker.sessions.create(config, seed_id)
        if not kw["wait"]:
            click.echo(session_id)
            return
        click.echo(f"session {session_id} queued; waiting for a worker", err=True)
        view = await wait_for_session(broker, session_id, quiet=kw["as_json"])
    finally:
        await broker.close()
    print_session(view, kw["as_json"])
    if view["status"] != SessionStatus.COMPLETED:
        sys.exit(1)


async def wait_for_session(broker: Broker, session_id: str, quiet: bool) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from combiner.views import rounds_done, session_active, session_view

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        disable=quiet or not sys.stderr.isatty(),
        console=None,
    ) as progress:
        view = await session_view(broker, session_id)
        bar = progress.add_task(f"session {session_id[:8]}", total=view["config"]["rounds"])
        while session_active(view):
            await asyncio.sleep(0.5)
            view = await session_view(broker, session_id)
            progress.update(bar, completed=rounds_done(view))
    return view


@session.command("show")
@redis_options
@click.argument("session_id")
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
@run_async
async def session_show(**kw) -> None:
    """Rounds, participants, updates, model ids and validations of a session."""
    from combiner.views import session_view

    broker, _ = await open_broker(kw)
    try:
        view = await session_view(broker, kw["session_id"])
    finally:
        await broker.close()
    print_session(view, kw["as_json"])


@main.command()
@redis_options
@option(
    "--client",
    "client_id",
    default="",
    help="Show one client instead: its record and latest statuses, telemetry, metrics.",
)
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
@run_async
async def status(**kw) -> None:
    """Replicas, clients online, stream lengths and consumer lag, current session."""
    from combiner.views import client_view, status_view

    broker, _ = await open_broker(kw)
    try:
        if kw["client_id"]:
            view = await client_view(broker, kw["client_id"])
        else:
            view = await status_view(broker)
    finally:
        await broker.close()
    print_status(view, kw["as_json"] or bool(kw["client_id"]))


@main.command()
@option("--redis-url", default=None, help="Redis to use (default: an embedded redis-server).")
@option(
    "--state-dir",
    default=".combiner",
    type=click.Path(file_okay=False),
    help="Folder for the embedded Redis, logs and the final model.",
)
@option("--clients", default=8, type=click.IntRange(1, 1000), help="Simulated clients.")
@option("--replicas", default=2, type=click.IntRange(1, 16), help="Front-end replicas.")
@option("--rounds", default=5, type=click.IntRange(1), help="FedAvg rounds.")
@option("--round-timeout", default=60.0, type=click.FloatRange(1), help="Seconds per round.")
@option(
    "--restart/--no-restart",
    default=True,
    help="Restart one replica half-way through (with more than one replica).",
)
@option("--json", "as_json", is_flag=True, default=False, help="Also print the summary as JSON.")
def demo(**kw) -> None:
    """The whole system on one machine: Redis, replicas, a worker and simulated clients
    training a small model together with FedAvg."""
    from rich.console import Console

    from combiner.demo import run_demo

    logs.setup("warning")
    as_json = kw.pop("as_json")
    console = Console(stderr=as_json)  # keep stdout for the JSON
    try:
        summary = asyncio.run(run_demo(console, **kw))
    except KeyboardInterrupt:
        console.print("interrupted; everything the demo started is stopped")
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if summary["session"]["status"] != "completed":
        sys.exit(1)
