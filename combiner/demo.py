"""`combiner demo`: the whole system on one machine.

An embedded Redis, R replicas and a worker as child processes, and N reference clients
that train a small linear model with numpy on their own synthetic data. The replicas check
tokens (no --insecure) and serve their HTTP side; the demo creates one refresh token per
client (as `combiner token create` does), and each client joins the way the 1.0.0 client
does in API mode: refresh, POST /api/v1/clients/add, then gRPC with its access token. The
clients use a round-robin channel over all replicas, so every RPC may land on any replica;
half-way through, one replica is restarted and the clients carry on.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker import Settings, connect
from broker.embedded import EmbeddedRedis, free_port
from broker.records import RoundStatus, SessionStatus
from combiner.processes import Child
from combiner.refclient import ReferenceClient
from combiner.views import rounds_done, session_active, session_view, status_view
from workers.fedavg import save_npz

FEATURES = 8
TRUE_W = np.linspace(-1.0, 1.0, FEATURES).astype(np.float32)


def make_client_data(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Each client holds a different amount of noisy samples of the same linear law."""
    rng = np.random.default_rng(1000 + index)
    n = 40 + 20 * index
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = x @ TRUE_W + np.float32(0.5) + rng.normal(scale=0.1, size=n).astype(np.float32)
    return x, y


def make_learner(index: int, epochs: int = 20, lr: float = 0.05):
    x, y = make_client_data(index)

    def train(arrays, settings):
        w, b = arrays[0].copy(), arrays[1].copy()
        for _ in range(epochs):  # full-batch gradient descent on mean squared error
            err = x @ w + b - y
            w -= np.float32(lr) * (x.T @ err) / len(y)
            b -= np.float32(lr) * err.mean(keepdims=True)
        return [w, b], len(y)

    def validate(arrays):
        err = x @ arrays[0] + arrays[1] - y
        return {"mse": float(np.mean(err**2)), "num_examples": len(y)}

    return train, validate


async def run_demo(
    console: Console,
    clients: int,
    replicas: int,
    rounds: int,
    redis_url: str | None,
    state_dir: str,
    round_timeout: float,
    restart: bool = True,
) -> dict:
    state = pathlib.Path(state_dir)
    logs = state / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    embedded = None
    if not redis_url:
        embedded = EmbeddedRedis(state)
        redis_url = await asyncio.to_thread(embedded.start)
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    common = ["--redis-url", redis_url, "--prefix", prefix, "--log-level", "info"]
    children: list[Child] = []
    stop = asyncio.Event()
    client_tasks: list[asyncio.Task] = []
    broker = None
    try:
        console.print(f"[bold]redis[/] {redis_url} (key prefix {prefix})")
        # One key file for all replicas: any of them mints tokens every replica accepts.
        signing_key = str(state / "demo-signing-key.pem")
        servers, api_urls = [], []
        for i in range(replicas):
            http_port = free_port()
            child = Child(
                ["serve", "--port", "0", "--replica-id", f"replica-{i + 1}",
                 "--http-port", str(http_port), "--signing-key", signing_key, *common],
                str(logs / f"replica-{i + 1}.log"),
            )  # fmt: skip
            await asyncio.to_thread(child.start, True)
            servers.append(child)
            children.append(child)
            api_urls.append(f"http://127.0.0.1:{http_port}")
            console.print(
                f"[bold]replica-{i + 1}[/] listening on 127.0.0.1:{child.port} "
                f"(HTTP side {api_urls[-1]})"
            )
        worker = Child(
            ["worker", "--offline-after", "10", "--poll-every", "0.2", *common],
            str(logs / "worker.log"),
        )
        await asyncio.to_thread(worker.start)
        children.append(worker)
        console.print(f"[bold]worker[/] started (logs in {logs})")

        broker = await connect(redis_url, settings=Settings(prefix=prefix))
        target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        refs = []
        for i in range(clients):
            train, validate = make_learner(i)
            # what `combiner token create --client client-N` does; the text is shown once
            token, _ = await broker.credentials.create(f"client-{i + 1}")
            refs.append(
                ReferenceClient(
                    target,
                    f"client-{i + 1}",
                    mode="stream" if i % 4 == 3 else "poll",
                    poll_interval=0.5,
                    train=train,
                    validate=validate,
                    round_robin=True,
                    api_url=api_urls[i % replicas],
                    token=token,
                )
            )
        client_tasks = [asyncio.create_task(r.run(stop)) for r in refs]
        console.print(
            f"[bold]{clients} clients[/] started "
            f"({sum(r.mode == 'poll' for r in refs)} polling, "
            f"{sum(r.mode == 'stream' for r in refs)} streaming), round-robin over "
            f"{replicas} replicas, each with its own token"
        )

        seed = [np.zeros(FEATURES, dtype=np.float32), np.zeros(1, dtype=np.float32)]
        seed_id = await broker.models.put(save_npz(seed))
        config = {
            "rounds": rounds,
            "min_clients": clients,
            "max_clients": clients,
            "round_timeout": round_timeout,
            "client_wait": 60.0,
            "validate": True,
        }
        session_id = await broker.sessions.create(config, seed_id)
        console.print(f"[bold]session[/] {session_id}: {rounds} rounds of FedAvg")
        started = time.monotonic()
        restarted = False
        with Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.fields[phase]:<28}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bars: dict[str, int] = {}
            while True:
                for task in client_tasks:
                    if task.done() and task.exception():
                        raise RuntimeError(f"a client stopped: {task.exception()!r}")
                view = await session_view(broker, session_id)
                for r in view["rounds"]:
                    rid = r["round_id"]
                    if rid not in bars:
                        bars[rid] = progress.add_task(
                            f"round {rid}", total=clients, phase="waiting for clients"
                        )
                    got = await _updates_so_far(broker, session_id, rid)
                    phase = {
                        RoundStatus.WAITING: "waiting for clients",
                        RoundStatus.COLLECTING: f"training: {got}/{len(r['clients'])} updates",
                        RoundStatus.AGGREGATING: "aggregating",
                        RoundStatus.VALIDATING: "validating",
                        RoundStatus.DONE: f"done: {r['updates']} updates, "
                        f"{r['validations']} validations",
                        RoundStatus.FAILED: f"failed: {r['reason']}",
                    }.get(r["status"], r["status"])
                    progress.update(bars[rid], completed=got, phase=phase)
                if not session_active(view):
                    break
                done_rounds = rounds_done(view)
                if restart and not restarted and replicas > 1 and done_rounds >= rounds // 2:
                    restarted = True
                    victim = servers[0]
                    progress.console.print(
                        f"[yellow]restarting replica-1 (port {victim.port}) mid-session[/]"
                    )
                    await asyncio.to_thread(victim.stop)
                    victim.args = [a if a != "0" else str(victim.port) for a in victim.args]
                    await asyncio.to_thread(victim.start, True)
                    progress.console.print("[yellow]replica-1 is back; clients carried on[/]")
                await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        status = await status_view(broker)
        messages = sum(s["length"] for s in status["streams"].values())
        final = state / "demo-final-model.npz"
        if view["status"] == SessionStatus.COMPLETED:
            await asyncio.to_thread(final.write_bytes, await broker.models.get(view["model_id"]))
        summary = {
            "session": view,
            "elapsed_seconds": round(elapsed, 2),
            "messages": messages,
            "messages_per_second": round(messages / elapsed, 1) if elapsed else 0.0,
            "final_model_file": str(final) if view["status"] == SessionStatus.COMPLETED else "",
            "prefix": prefix,
            "redis_url": redis_url,
            "embedded": embedded is not None,
            "state_dir": str(state),
            "replica_restarted": restarted,
            "tokens": True,
            "client_failures": sum(r.counters.failed for r in refs),
        }
        _print_summary(console, summary)
        return summary
    finally:
        stop.set()
        if client_tasks:
            await asyncio.wait(client_tasks, timeout=5)
            for task in client_tasks:
                task.cancel()
        if broker is not None:
            await broker.close()
        for child in reversed(children):
            await asyncio.to_thread(child.stop, 5)
        if embedded is not None:
            embedded.stop()


async def _updates_so_far(broker, session_id: str, round_id: str) -> int:
    tasks = await broker.sessions.round_tasks(session_id, round_id, "tasks")
    records = await broker.tasks.records(tasks)
    return sum(1 for r in records.values() if r.get("model_update_id"))


def _print_summary(console: Console, summary: dict) -> None:
    view = summary["session"]
    table = Table(title=f"session {view['session_id']}: {view['status']}")
    for col in ("round", "status", "clients", "updates", "validations", "mean val. MSE"):
        table.add_column(col)
    for r in view["rounds"]:
        mses = [
            v["data"]["mse"]
            for v in r["validation_results"]
            if isinstance(v["data"], dict) and "mse" in v["data"]
        ]
        table.add_row(
            r["round_id"],
            r["status"],
            str(len(r["clients"])),
            str(r["updates"]),
            str(r["validations"]),
            f"{np.mean(mses):.4f}" if mses else "-",
        )
    console.print(table)
    console.print(
        f"{summary['messages']} client messages in {summary['elapsed_seconds']} s "
        f"({summary['messages_per_second']} msg/s)"
    )
    console.print(f"final global model: [bold]{view['model_id']}[/]")
    if summary["final_model_file"]:
        console.print(f"  written to {summary['final_model_file']}")
    where = (
        f"--state-dir {summary['state_dir']}"
        if summary["embedded"]
        else (f"--redis-url {summary['redis_url']}")
    )
    console.print(
        f"  in Redis: combiner model get {view['model_id']} -o final.npz "
        f"{where} --prefix {summary['prefix']}"
    )
