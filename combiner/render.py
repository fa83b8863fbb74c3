"""How the CLI prints the views of combiner/views.py: one JSON object, or tables (rich)."""

from __future__ import annotations

import json

import click


def _console():
    from rich.console import Console

    return Console()


def print_task(view: dict, as_json: bool) -> None:
    """`task show`: the task_view, as JSON or as a two-column table."""
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in view.items():
        if isinstance(value, dict | list):
            value = json.dumps(value)
        table.add_row(key, "" if value is None else str(value))
    _console().print(table)


def print_session(view: dict, as_json: bool) -> None:
    """`session show` and `session start --wait`: the session_view."""
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    from rich.table import Table

    console = _console()
    console.print(
        f"session [bold]{view['session_id']}[/]: {view['status']}"
        + (f" ({view['error']})" if view["error"] else "")
        + f"\nglobal model: {view['model_id']}"
    )
    table = Table("round", "status", "clients", "updates", "validations", "model")
    for r in view["rounds"]:
        table.add_row(
            r["round_id"],
            r["status"] + (f": {r['reason']}" if r["reason"] else ""),
            str(len(r["clients"])),
            str(r["updates"]),
            str(r["validations"]),
            r["model_id"],
        )
    console.print(table)


def print_status(view: dict, as_json: bool) -> None:
    """`status`: the status_view (or, as JSON, a client_view)."""
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    from rich.table import Table

    console = _console()
    redis = view["redis"]
    console.print(
        f"redis: {redis['topology']}, {redis['partitions']} partition(s), schema "
        f"{redis['schema']}, durability {redis['durability']}"
    )
    if redis["masters"] is None:
        console.print(f"  masters not shown: {redis['error']}")
    else:
        title = "primary" if redis["topology"] == "cluster" else "master"
        table = Table(title, "role", "version", "replicas")
        for m in redis["masters"]:
            table.add_row(m["address"], m["role"], m["version"], str(m["replicas"]))
        console.print(table)
    table = Table("replica", "address", "streams", "clients")
    for r in view["replicas"]:
        table.add_row(r["id"], r["address"], str(r["streams"]), str(r["clients"]))
    console.print(table)
    table = Table("worker", "pid", "roles")
    for w in view["workers"]:
        roles = ", ".join(f"{role} {health}" for role, health in sorted(w["roles"].items()))
        table.add_row(w["id"], w["pid"], roles)
    console.print(table)
    clients = view["clients"]
    console.print(f"clients: {len(clients['online'])} online, {len(clients['offline'])} offline")
    table = Table("stream", "length", "pending", "lag")
    for kind, info in view["streams"].items():
        table.add_row(kind, str(info["length"]), str(info["pending"]), str(info["lag"]))
    console.print(table)
    cur = view["current_session"]
    console.print(
        f"current session: {cur['session_id']} round {cur['round']}/{cur['rounds']} "
        f"({cur['status']})"
        if cur
        else "no session running"
    )


def _time(unix: float | None) -> str:
    if unix is None:
        return ""
    import datetime

    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


def print_tokens(tokens: list[dict], as_json: bool) -> None:
    """`token list`: id, client, role, status and times of each token (no hash, no token)."""
    if as_json:
        click.echo(json.dumps(tokens, indent=2))
        return
    from rich.table import Table

    table = Table()
    table.add_column("id", no_wrap=True)  # what `token revoke` takes: never cut
    table.add_column("client", overflow="fold")
    for name in ("role", "status", "created (UTC)", "expires", "revoked"):
        table.add_column(name)
    for t in tokens:
        table.add_row(
            t["id"],
            t["client_id"],
            t["role"],
            t["status"],
            _time(t["created"]),
            _time(t["expires"]) or "never",
            _time(t["revoked_at"]),
        )
    _console().print(table)
