"""The `combiner` command line (docs/configuration.md). Every flag also reads COMBINER_<FLAG>."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import pathlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import click

from broker import DEFAULT_CLUSTER, MAX_PARTITIONS, Broker, BrokerError, Settings, connect
from broker.embedded import EmbeddedRedis
from broker.records import SessionStatus
from combiner import __version__, logs
from combiner.render import print_session, print_status, print_task
from combiner.views import task_view

if TYPE_CHECKING:
    from combiner.server import ServeOptions


def option(*decls, **kwargs):
    """A click option that also reads COMBINER_<LONG_NAME> from the environment."""
    long = next(d for d in decls if d.startswith("--")).split("/")[0]
    kwargs.setdefault("envvar", "COMBINER_" + long[2:].replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    if "default" in kwargs and "show_default" not in kwargs:
        kwargs["show_default"] = True
    return click.option(*decls, **kwargs)


def redis_options(fn):
    """Where Redis is, how to log, and the broker's settings: shared by every command that
    touches Redis, so a COMBINER_* variable means the same to every process."""
    decorators = [
        option(
            "--redis-url",
            default=None,
            help="Redis to use, e.g. redis://127.0.0.1:6379/0, any node of a Redis Cluster "
            "(or several: redis://HOST:PORT,HOST:PORT/0), or "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER. Default: an embedded "
            "redis-server child process with its data under --state-dir.",
        ),
        option(
            "--redis-cluster",
            is_flag=True,
            default=False,
            help="Treat --redis-url as a node of a Redis Cluster (default: asked of the "
            "server when connecting).",
        ),
        option(
            "--partitions",
            default=Settings.partitions,
            type=click.IntRange(0, MAX_PARTITIONS),
            help="Partitions of the per-client keys, each one Redis Cluster slot (0: 1 on a "
            f"standalone Redis or Sentinel, {DEFAULT_CLUSTER} on a Cluster). Only a fresh "
            "--prefix takes it; a used one keeps the number it was started with.",
        ),
        option(
            "--state-dir",
            default=".combiner",
            type=click.Path(file_okay=False),
            help="Folder for the embedded Redis and the default disk model store.",
        ),
        option("--prefix", default=Settings.prefix, help="Prefix of every Redis key."),
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
        option(
            "--stream-maxlen",
            default=Settings.stream_maxlen,
            type=click.IntRange(1),
            help="Entries each inbound stream keeps (MAXLEN ~): older ones are trimmed.",
        ),
        option(
            "--task-ttl",
            default=Settings.task_ttl,
            type=click.IntRange(1),
            help="Seconds task records, and a finished session's per-round records, are kept.",
        ),
        option(
            "--upload-ttl",
            default=Settings.upload_ttl,
            type=click.IntRange(1),
            help="Seconds an unfinished model upload is kept before it expires.",
        ),
        option(
            "--offline-after",
            default=Settings.offline_after,
            type=click.FloatRange(0.5),
            help="A client is offline after this many seconds without any RPC.",
        ),
        option(
            "--presence-every",
            default=Settings.presence_every,
            type=click.FloatRange(0),
            help="Seconds between a replica's writes of one client's last-seen time (its "
            "RPCs in between only count in memory): fewer writes, coarser last-seen.",
        ),
        option(
            "--batch-window",
            default=Settings.batch_window,
            type=click.FloatRange(0, 0.1),
            help="Seconds an RPC waits for concurrent RPCs to share its Redis pipeline: fewer "
            "round trips and less CPU per RPC under load, for that much added latency. Only "
            "after a pipeline that was shared: an RPC on an idle replica does not wait.",
        ),
        option(
            "--durability",
            default=Settings.durability,
            type=click.Choice(["local", "replicated"]),
            help="When a write counts as done: 'local', once the Redis master has it (a "
            "failover may lose the last ones); 'replicated', once --durability-replicas "
            "replicas have it too (WAIT), else the call fails with 'try again'.",
        ),
        option(
            "--durability-replicas",
            default=Settings.durability_replicas,
            type=click.IntRange(1),
            help="With --durability replicated: replicas that must have each write.",
        ),
        option(
            "--durability-timeout",
            default=Settings.durability_timeout,
            type=click.FloatRange(0.001, 3.0),
            help="With --durability replicated: seconds a write waits for its replicas "
            "before the call fails with 'try again' (the write may then be stored twice).",
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


# ServeOptions fields whose flag has another name or unit than the field.
SERVE_FLAGS = {"model_cache_bytes": ("model_cache_mb", lambda mib: mib << 20)}
# Keyword arguments of workers.runner.Worker, each a flag of `combiner worker`.
WORKER_FLAGS = ("worker_id", "lease_ttl", "poll_every", "claim_after", "allow_server_functions",
                "server_functions_timeout", "server_functions_memory_mb")  # fmt: skip


@dataclass
class Config:
    """Everything a command was told, built once from its flags by settings_from_flags()."""

    redis_url: str | None
    state_dir: str
    broker: Settings
    model_dir: str | None = None
    replica_id: str = ""
    redis_cluster: bool = False  # --redis-cluster: no detection
    metrics_port: int | None = None
    serve: ServeOptions | None = None  # commands that serve
    worker: dict | None = None  # keyword arguments of Worker, for `combiner worker`


def settings_from_flags(kw: dict) -> Config:
    """Turn a command's flags into its settings: pops every flag that is a setting from kw,
    leaving the command's own arguments (files, ids, --json, ...)."""
    state_dir = kw.pop("state_dir")
    store, model_dir = kw.pop("model_store", "redis"), kw.pop("model_dir", None)
    if store == "disk":
        model_dir = model_dir or str(pathlib.Path(state_dir) / "models")
    # (a --model-dir without the disk store is used only to read disk-stored models)
    cfg = Config(
        redis_url=kw.pop("redis_url"),
        redis_cluster=kw.pop("redis_cluster"),
        state_dir=state_dir,
        broker=Settings(**{f.name: kw.pop(f.name) for f in fields(Settings)}),
        model_dir=model_dir,
        replica_id=kw.pop("replica_id", ""),
        metrics_port=kw.pop("metrics_port", None),
    )
    if "host" in kw:  # the command serves: it has a flag for every ServeOptions field
        from combiner.server import ServeOptions  # grpc: imported only by commands that serve

        values = {}
        for f in fields(ServeOptions):
            flag, convert = SERVE_FLAGS.get(f.name, (f.name, lambda value: value))
            values[f.name] = convert(kw.pop(flag))
        cfg.serve = ServeOptions(**values)
    if "lease_ttl" in kw:  # the command runs a worker: it has every WORKER_FLAGS flag
        cfg.worker = {name: kw.pop(name) for name in WORKER_FLAGS}
    return cfg


@contextlib.asynccontextmanager
async def open_broker(cfg: Config) -> AsyncIterator[Broker]:
    """The command's Broker, on --redis-url or else on the embedded Redis under --state-dir;
    closed however the command ends, and the embedded Redis stopped with it if this process
    started it (a server another process started under the same folder stays up)."""
    url, embedded = cfg.redis_url, None
    if not url:
        embedded = EmbeddedRedis(cfg.state_dir)
        url = await asyncio.to_thread(embedded.start)
    try:
        async with connect(
            url,
            settings=cfg.broker,
            replica_id=cfg.replica_id,
            model_dir=cfg.model_dir,
            cluster=True if cfg.redis_cluster else None,
        ) as broker:
            yield broker
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


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
    """Run an async command body as fn(config, **its own arguments); broker errors become a
    clear CLI error, not a traceback."""

    @functools.wraps(fn)
    def wrapper(**kw):
        logs.setup(kw.pop("log_level"), kw.pop("log_format"))
        cfg = settings_from_flags(kw)
        try:
            return asyncio.run(fn(cfg, **kw))
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
    "--upload-idle-timeout",
    default=120.0,
    type=click.FloatRange(0.1),
    help="Seconds an Upload may go without a chunk; then it is abandoned (its staged bytes "
    "deleted) and answered FAILED_PRECONDITION, which the client retries.",
)
@option(
    "--max-uploads",
    default=256,
    type=click.IntRange(1),
    help="Uploads in progress on this replica at once; more: RESOURCE_EXHAUSTED. Each "
    "holds about one chunk (1 MiB) of memory.",
)
@option(
    "--max-uploads-per-client",
    default=2,
    type=click.IntRange(1),
    help="Uploads in progress at once per client id; more: RESOURCE_EXHAUSTED (the 1.0.0 "
    "client sends one at a time).",
)
@option(
    "--max-streams-per-client",
    default=4,
    type=click.IntRange(1),
    help="TaskStreams one client id may hold open on this replica; more: FAILED_PRECONDITION "
    "(the 1.0.0 client retries it, so one reconnecting before its old stream is noticed "
    "gone gets in).",
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
@option(
    "--stream-write-timeout",
    default=30.0,
    type=click.FloatRange(0.1),
    help="Seconds a TaskStream message may wait for the client to read; a stream that does "
    "not drain is then ended with FAILED_PRECONDITION and its tasks stay queued for the "
    "client's next stream.",
)
@option(
    "--reuse-port/--no-reuse-port",
    default=False,
    help="Set SO_REUSEPORT, so several serve processes on one host share --port (the "
    "kernel spreads connections over them). Off by default: a second server on a taken "
    "port then fails at start instead of silently taking part of its traffic.",
)
@option(
    "--insecure",
    is_flag=True,
    default=False,
    help="Check no tokens: any caller may act as any client. Loopback development only; "
    "logged as a warning at start.",
)
@option(
    "--http-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve the HTTP side on this port (0: any free port): the token exchange, client "
    "assignment and the control plane the published APIClient drives (docs/api.md). "
    "Default: no HTTP side.",
)
@option(
    "--public-host",
    default="",
    help="Host that /api/v1/clients/add tells clients to dial (e.g. the load balancer's). "
    "Default: --host.",
)
@option(
    "--public-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port that /api/v1/clients/add tells clients to dial; 443 makes the 1.0.0 client "
    "use TLS. Default: this replica's gRPC port.",
)
@option(
    "--signing-key",
    default="",
    help="Ed25519 private key (PEM) that signs access tokens; created if missing, its "
    "public half published to Redis. Default: <state-dir>/signing-key.pem when the HTTP "
    "side is on.",
)
@option(
    "--access-ttl",
    default=3600,
    type=click.IntRange(120, 7 * 86400),
    help="Seconds an access token lives (the 1.0.0 client refreshes 30 s before expiry).",
)
@option(
    "--audience",
    default="scaleout",
    help="The aud claim of access tokens: a deployment accepts only its own.",
)
@option(
    "--tls-cert",
    default="",
    help="PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key). A renewed "
    "file is picked up without a restart.",
)
@option("--tls-key", default="", help="PEM private key of --tls-cert.")
@option(
    "--trust-forwarded-for/--no-trust-forwarded-for",
    default=False,
    help="Blame failed token refreshes on the last X-Forwarded-For address instead of the "
    "peer's. Only behind a proxy that sets it (HAProxy: option forwardfor); otherwise any "
    "caller could pick the address it is blamed as.",
)
@run_async
async def serve(cfg: Config) -> None:
    """Run one front-end replica (gRPC: CombinerClient, ModelService, health, reflection;
    with --http-port also the HTTP side: token exchange and client assignment)."""
    from combiner import tls
    from combiner.server import serve as run_replica

    opts = cfg.serve
    try:  # bad TLS files: a clear error before anything starts
        tls.from_options(opts.tls_cert, opts.tls_key)
    except tls.TLSConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if opts.http_port is not None and not opts.insecure and not opts.signing_key:
        opts.signing_key = str(pathlib.Path(cfg.state_dir) / "signing-key.pem")

    def ready(replica) -> None:
        print(f"listening on {opts.host}:{replica.port}", flush=True)
        if replica.http is not None:
            print(f"http on {opts.host}:{replica.http_port}", flush=True)

    async with open_broker(cfg) as broker:
        start_metrics(cfg.metrics_port, broker)
        try:
            await run_replica(broker, opts, ready=ready)
        except (OSError, ValueError) as exc:  # a taken HTTP port, an unreadable key file
            raise click.ClickException(str(exc)) from exc


@main.group()
def token() -> None:
    """Refresh tokens for clients and operators, and the keys that sign access tokens.

    A client joins with `scaleout client start --api-url http://HOST:HTTP_PORT --token T
    --local-package`; Redis keeps only a hash of each token (docs/security.md).
    """


@token.command("create")
@redis_options
@option("--client", "client_id", required=True, help="Client id the token acts as.")
@option(
    "--role",
    default="client",
    type=click.Choice(["client", "admin"]),
    help="client: a federated-learning client; admin: an operator's API client.",
)
@option(
    "--expires-days",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Days until the refresh token expires (default: never; revoke it instead).",
)
@run_async
async def token_create(cfg: Config, **kw) -> None:
    """Create a refresh token; it is printed once, as the last line of stdout."""
    async with open_broker(cfg) as broker:
        text, record = await broker.credentials.create(
            kw["client_id"], kw["role"], kw["expires_days"]
        )
    expires = f"expires {_when(record.expires)}" if record.expires else "never expires"
    click.echo(
        f"token {record.id} for {record.role} {record.client_id!r} ({expires}); "
        "shown only now, Redis keeps a hash:",
        err=True,
    )
    click.echo(text)


@token.command("list")
@redis_options
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON list.")
@run_async
async def token_list(cfg: Config, **kw) -> None:
    """Every token's id, client, role, status and times (never a token or its hash)."""
    from combiner.render import print_tokens

    async with open_broker(cfg) as broker:
        records = await broker.credentials.list()
    print_tokens([_token_view(r) for r in records], kw["as_json"])


@token.command("revoke")
@redis_options
@click.argument("token_or_id", metavar="[TOKEN]", required=False, default="")
@option("--client", "client_id", default="", help="Revoke every token of this client instead.")
@run_async
async def token_revoke(cfg: Config, **kw) -> None:
    """Revoke TOKEN (its text, or its id from `token list`) or every token of --client.

    Every replica refuses the access tokens made from it within about a second, and ends
    the client's open TaskStreams; refreshing with it fails at once."""
    if bool(kw["token_or_id"]) == bool(kw["client_id"]):
        raise click.UsageError("give a TOKEN (or token id) or --client, not both")
    async with open_broker(cfg) as broker:
        ids = await broker.credentials.revoke(kw["token_or_id"], kw["client_id"])
    click.echo(f"revoked {len(ids)} token(s)", err=True)
    for token_id in ids:
        click.echo(token_id)


@token.command("keys")
@redis_options
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
@run_async
async def token_keys(cfg: Config, **kw) -> None:
    """The signing keys whose access tokens replicas accept (key id: public key)."""
    async with open_broker(cfg) as broker:
        keys = await broker.credentials.public_keys()
    if kw["as_json"]:
        click.echo(json.dumps(keys, indent=2, sort_keys=True))
        return
    if not keys:
        click.echo("no signing keys published (a replica with --http-port publishes its own)")
    for kid in sorted(keys):
        click.echo(kid)


@token.command("retire-key")
@redis_options
@click.argument("kid")
@run_async
async def token_retire_key(cfg: Config, **kw) -> None:
    """Stop accepting access tokens signed with key KID (after rotating to a new key:
    docs/security.md). Clients refresh, and get tokens signed with the new key."""
    async with open_broker(cfg) as broker:
        # looked up first: retiring bumps the counter every replica follows
        known = len(kw["kid"]) <= 64 and await broker.credentials.public_key(kw["kid"])
        if not known or not await broker.credentials.retire_key(kw["kid"]):
            raise click.ClickException(f"no published signing key {kw['kid'][:80]!r}")
    click.echo(f"retired signing key {kw['kid']}", err=True)


def _token_view(record) -> dict:
    """What `token list` shows of a record: never the hash (nor, of course, the token)."""

    def moment(value: str) -> float | None:
        return float(value) if value else None

    return {
        "id": record.id,
        "client_id": record.client_id,
        "role": record.role,
        "status": record.status,
        "created": moment(record.created),
        "expires": moment(record.expires),
        "revoked_at": moment(record.revoked_at),
    }


def _when(unix: str) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(float(unix), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


@main.group()
def model() -> None:
    """Store and fetch models."""


@model.command("put")
@redis_options
@model_store_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@option("--id", "model_id", default="", help="Model id to store under (default: a new uuid4).")
@run_async
async def model_put(cfg: Config, **kw) -> None:
    """Store FILE as a model and print its id."""
    async with open_broker(cfg) as broker:
        data = await asyncio.to_thread(pathlib.Path(kw["file"]).read_bytes)
        model_id = await broker.models.put(data, kw["model_id"])
        click.echo(model_id)


@model.command("get")
@redis_options
@model_store_options
@click.argument("model_id")
@option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write.")
@run_async
async def model_get(cfg: Config, **kw) -> None:
    """Fetch model MODEL_ID into a file."""
    async with open_broker(cfg) as broker:
        data = await broker.models.get(kw["model_id"])
        await asyncio.to_thread(pathlib.Path(kw["output"]).write_bytes, data)
        click.echo(f"{len(data)} bytes written to {kw['output']}", err=True)


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
async def task_push(cfg: Config, **kw) -> None:
    """Queue a task for one client and print its correlation id."""
    async with open_broker(cfg) as broker:
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


@task.command("show")
@redis_options
@click.argument("correlation_id")
@option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
@run_async
async def task_show(cfg: Config, **kw) -> None:
    """Show a task's state, the client's report and the result it produced."""
    async with open_broker(cfg) as broker:
        record = await broker.tasks.show(kw["correlation_id"])
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
@metrics_option
@option(
    "--poll-every",
    default=0.5,
    type=click.FloatRange(0.05),
    help="Seconds between the coordinator's looks at a round's progress.",
)
@option(
    "--claim-after",
    default=30.0,
    type=click.FloatRange(0.1),
    help="Seconds a stream entry may stay unacknowledged by the worker that read it "
    "(it died, say) before another worker's record keeping takes it over.",
)
@option(
    "--allow-server-functions",
    is_flag=True,
    default=False,
    help="Drive sessions that bring their own Python (the APIClient's server_functions): "
    "it runs in a child process with no credentials, a time and a memory limit, but it is "
    "code from whoever holds an admin token (docs/api.md). Off: such sessions are left to "
    "workers that allow them, and replicas refuse new ones while none runs.",
)
@option(
    "--server-functions-timeout",
    default=60.0,
    type=click.FloatRange(0.1),
    help="Seconds one server function call may take before its process is killed and the "
    "round fails.",
)
@option(
    "--server-functions-memory-mb",
    default=2048,
    type=click.IntRange(128),
    help="Address-space limit of the server functions process, MiB.",
)
@run_async
async def worker(cfg: Config) -> None:
    """Run one worker: session coordinator with FedAvg, records, liveness (safe to run several)."""
    from workers.runner import run_worker

    async with open_broker(cfg) as broker:
        start_metrics(cfg.metrics_port, broker)
        await run_worker(broker, **cfg.worker)


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
async def session_start(cfg: Config, **kw) -> None:
    """Queue a training session (a worker drives it); print its id, or its record with --wait."""
    from workers.fedavg import BadUpdate, load_npz

    if kw["max_clients"] < kw["min_clients"]:
        raise click.BadParameter("--max-clients must be >= --min-clients")
    data = await asyncio.to_thread(pathlib.Path(kw["seed_model"]).read_bytes)
    try:
        load_npz(data)
    except BadUpdate as exc:
        raise click.BadParameter(f"--seed-model: {exc}") from exc
    async with open_broker(cfg) as broker:
        seed_id = await broker.models.put(data)
        await broker.catalog.add_model(seed_id, name=pathlib.Path(kw["seed_model"]).name)
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
async def session_show(cfg: Config, **kw) -> None:
    """Rounds, participants, updates, model ids and validations of a session."""
    from combiner.views import session_view

    async with open_broker(cfg) as broker:
        view = await session_view(broker, kw["session_id"])
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
async def status(cfg: Config, **kw) -> None:
    """The Redis underneath (its masters and their replicas), replicas, clients online,
    stream lengths and consumer lag, current session."""
    from combiner.views import client_view, status_view

    async with open_broker(cfg) as broker:
        if kw["client_id"]:
            view = await client_view(broker, kw["client_id"])
        else:
            view = await status_view(broker)
    print_status(view, kw["as_json"] or bool(kw["client_id"]))


@main.command()
def openapi() -> None:
    """Print the OpenAPI description of a replica's HTTP side: what every replica serves at
    GET /api/openapi.json (docs/openapi.json holds a copy). Needs no Redis."""

    async def describe() -> dict:
        from combiner.server import Replica, ServeOptions

        # a replica that is never started: only its route table is read
        return Replica(Broker(None), ServeOptions(http_port=0)).http.openapi()

    click.echo(json.dumps(asyncio.run(describe()), indent=2))


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
