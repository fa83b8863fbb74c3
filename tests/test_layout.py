"""The package layout holds: `combiner -> broker <- workers`, and only broker/ knows Redis.

Every module under combiner/ and workers/ is parsed (ast, nothing is imported from them) and
checked against these rules:

- no `import redis` (nor any redis submodule);
- from broker/, only the public surface: names the package root exports (`broker.__all__`),
  the typed records (`broker.records`), the errors (`broker.errors`), the input size limits
  (`broker.limits`: the servicers check what never reaches the broker), and `broker.embedded`
  (the CLI and the demo start an embedded redis-server when no --redis-url is given);
- on a broker object (a name `broker` or an attribute `.broker`), only the Broker's public
  names; on its parts (`broker.tasks.X`), no private name; and nowhere a Broker internal
  (`_redis`, `_ctx`, ...).

And between packages: broker/ imports neither combiner nor workers; workers/ does not import
combiner; combiner/ imports workers only where it runs them or shares their model format:
the CLI (`combiner worker` runs workers.runner; `session start` checks the seed model with
workers.fedavg), the control API (it checks seed models and session settings as the workers
will read them), the demo and its simulated clients (workers.fedavg writes and reads npz).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import broker
from broker import Broker

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"broker.records", "broker.errors", "broker.limits", "broker.embedded"}
ROOT_NAMES = set(broker.__all__)
_instance = Broker(None)  # no Redis needed: only its attribute names are read
BROKER_PUBLIC = {n for n in (*vars(_instance), *dir(Broker)) if not n.startswith("_")}
BROKER_PRIVATE = {n for n in vars(_instance) if n.startswith("_")}
# combiner module -> the workers modules it may import (see the module docstring)
COMBINER_USES_WORKERS = {
    "combiner/cli.py": {"workers.runner", "workers.fedavg"},
    "combiner/api_shapes.py": {"workers.aggregators"},  # session configs are checked up front
    "combiner/control_api.py": {"workers.fedavg", "workers.server_functions"},
    "combiner/demo.py": {"workers.fedavg"},
    "combiner/refclient.py": {"workers.fedavg"},
}


def modules(package: str) -> list[pathlib.Path]:
    return sorted(
        p
        for p in (ROOT / package).rglob("*.py")
        if "pb" not in p.relative_to(ROOT / package).parts[:-1]  # generated stubs
    )


def imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import, also those inside functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def _is_broker(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "broker") or (
        isinstance(node, ast.Attribute) and node.attr == "broker"
    )


def seam_violations(source: str, where: str) -> list[str]:
    """What in one combiner/ or workers/ module reaches past the broker's public names."""
    tree = ast.parse(source)
    bad = []
    for module, names, line in imports(tree):
        top = module.split(".")[0]
        if top == "redis":
            bad.append(f"{where}:{line}: imports {module}")
        elif module == "broker":
            bad += [f"{where}:{line}: broker.{n} is not exported" for n in names
                    if n not in ROOT_NAMES]  # fmt: skip
        elif top == "broker" and module not in PUBLIC_MODULES:
            bad.append(f"{where}:{line}: imports the broker's internal module {module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in BROKER_PRIVATE:
            bad.append(f"{where}:{node.lineno}: uses a Broker internal .{node.attr}")
        elif _is_broker(node.value) and node.attr not in BROKER_PUBLIC:
            bad.append(f"{where}:{node.lineno}: broker.{node.attr} is not public")
        elif (
            isinstance(node.value, ast.Attribute)
            and _is_broker(node.value.value)
            and node.attr.startswith("_")
        ):
            bad.append(f"{where}:{node.lineno}: broker.{node.value.attr}.{node.attr} is private")
    return bad


def package_violations(package: str, path: pathlib.Path) -> list[str]:
    where = str(path.relative_to(ROOT))
    bad = []
    for module, _, line in imports(ast.parse(path.read_text())):
        top = module.split(".")[0]
        if package == "broker" and top in ("combiner", "workers"):
            bad.append(f"{where}:{line}: broker/ imports {module}")
        if package == "workers" and top == "combiner":
            bad.append(f"{where}:{line}: workers/ imports {module}")
        if package == "combiner" and top == "workers":
            if module not in COMBINER_USES_WORKERS.get(where, set()):
                bad.append(f"{where}:{line}: combiner/ imports {module}")
    return bad


@pytest.mark.parametrize("package", ["combiner", "workers"])
def test_only_the_broker_public_surface_is_used(package):
    found = modules(package)
    assert found, f"no modules found under {package}/"
    bad = []
    for path in found:
        bad += seam_violations(path.read_text(), str(path.relative_to(ROOT)))
    assert bad == []


@pytest.mark.parametrize("package", ["broker", "combiner", "workers"])
def test_dependencies_point_one_way(package):
    bad = []
    for path in modules(package):
        bad += package_violations(package, path)
    assert bad == []


def test_redis_lives_only_in_broker():
    users = [
        str(p.relative_to(ROOT))
        for package in ("combiner", "workers")
        for p in modules(package)
        if any(m.split(".")[0] == "redis" for m, _, _ in imports(ast.parse(p.read_text())))
    ]
    assert users == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import redis.asyncio",
        "from redis import exceptions",
        "from broker.consumers import StreamGroup",
        "from broker.codec import pack",
        "from broker import StreamGroup",
        "import broker.keys",
        "def f(broker):\n    return broker.ctx.call(broker.redis.ping)",
        "async def f(self):\n    await self.broker.redis.zrange('k', 0, -1)",
        "def f(self):\n    return self.broker.settings.task_ttl",
        "def f(self):\n    return self.broker.tasks._ctx",
        "def f(b):\n    return b._batcher.calls",
    ],
)
def test_the_checker_catches_what_reaches_past_the_seam(snippet):
    assert seam_violations(snippet, "sample.py") != []


def test_the_checker_lets_the_public_surface_through():
    snippet = (
        "from broker import Broker, BrokerError, Settings, connect\n"
        "from broker.records import TaskState\n"
        "async def f(self, broker):\n"
        "    await broker.replicas.alive()\n"
        "    await self.broker.inbound.lag('records')\n"
        "    return broker.replica_id, self.broker.pipeline_counters.calls\n"
    )
    assert seam_violations(snippet, "sample.py") == []
