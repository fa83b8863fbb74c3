"""User server functions (the APIClient's ``start_session(server_functions=...)``): the
source text of a class like the ancestor's ``ServerFunctions(ServerFunctionsBase)``, which
may choose each round's clients (client_selection), add settings to their training tasks
(client_settings) and aggregate the round's updates itself (aggregate).

This is code from whoever holds an admin token, so it runs only on workers started with
``--allow-server-functions``, and never in the worker's process: each session a worker
drives gets a child process (``python -I -m workers.server_functions``) with an empty
environment (no Redis URL, no credentials), a temporary working folder, an address-space
limit, and a time limit on every call (the child is killed when it runs over). It sees what
its functions are given: client ids, models as numpy arrays, the clients' training metadata.
It is not a security boundary against hostile code: the child can still open files and
sockets the worker's user can. docs/api.md says so.

Wire format on the child's stdin/stdout: frames of a 4-byte big-endian length and a msgpack
map; models travel as npz bytes (workers/fedavg.py). The user's ``print`` goes to stderr,
which the worker logs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import msgpack
import numpy as np

from workers.fedavg import load_npz, save_npz

log = logging.getLogger("workers.server_functions")

METHODS = ("client_selection", "client_settings", "aggregate")
# A worker that opted in says so in its record (roles: {"server_functions": "allowed"}), so
# replicas accept sessions with server_functions only while such a worker is alive.
SERVER_FUNCTIONS_ROLE = "server_functions"
MAX_FRAME = 1 << 31
MAX_SETTINGS = 64 * 1024  # bytes of JSON client_settings may add to a task


class ServerFunctionsError(Exception):
    """The user's code failed, answered something unusable, or ran out of time."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 60.0  # seconds per call (the first includes starting the child)
    memory_mb: int = 2048  # the child's address space


# --- the worker's side -----------------------------------------------------------------------


class Sandbox:
    """One child process running one session's server functions; blocking calls (the
    coordinator runs them in a thread). The instance lives as long as the worker drives the
    session, so the user's object keeps its state across rounds (not across a takeover)."""

    def __init__(self, source: str, limits: Limits) -> None:
        self.limits = limits
        self._folder = tempfile.TemporaryDirectory(prefix="server-functions-")
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "workers.server_functions", str(limits.memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self._folder.name,
            env={"PATH": os.defpath, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        )
        self._stderr = threading.Thread(target=self._log_stderr, daemon=True)
        self._stderr.start()
        self.implements: set[str] = set(self.call("init", source=source)["implements"])

    def _log_stderr(self) -> None:
        for line in self._proc.stderr:
            log.info("server functions: %s", line.decode(errors="replace").rstrip()[:2000])

    def call(self, op: str, **payload) -> dict:
        """One request and its answer; ServerFunctionsError if the child fails or is killed
        for running over the time limit (then this sandbox is closed)."""
        killer = threading.Timer(self.limits.timeout, self._proc.kill)
        killer.start()
        try:
            write_frame(self._proc.stdin, {"op": op, **payload})
            answer = read_frame(self._proc.stdout)
        except (OSError, EOFError, ValueError) as exc:
            timed_out = not killer.is_alive()
            self.close()
            if timed_out:
                raise ServerFunctionsError(
                    f"{op} ran over its {self.limits.timeout:g} s limit and was stopped"
                ) from None
            raise ServerFunctionsError(f"{op}: the server functions process ended: {exc}") from None
        finally:
            killer.cancel()
        if "error" in answer:
            raise ServerFunctionsError(f"{op}: {answer['error']}")
        return answer

    def client_selection(self, client_ids: list[str]) -> list[str]:
        picked = self.call("client_selection", client_ids=client_ids)["result"]
        offered = set(client_ids)
        if (
            not isinstance(picked, list)
            or not picked
            or not all(isinstance(c, str) and c in offered for c in picked)
        ):
            raise ServerFunctionsError(
                "client_selection must return a non-empty list of the client ids it was given"
            )
        return sorted(set(picked))

    def client_settings(self, model: list[np.ndarray]) -> dict:
        settings = self.call("client_settings", model=save_npz(model))["result"]
        if not isinstance(settings, dict):
            raise ServerFunctionsError("client_settings must return a dict")
        try:
            text = json.dumps(settings)
        except (TypeError, ValueError) as exc:
            raise ServerFunctionsError(f"client_settings: not JSON ({exc})") from None
        if len(text) > MAX_SETTINGS:
            raise ServerFunctionsError(f"client_settings: over {MAX_SETTINGS} bytes as JSON")
        return settings

    def aggregate(
        self, previous: list[np.ndarray], updates: dict[str, tuple[bytes, dict]]
    ) -> list[np.ndarray]:
        """updates: client id -> (its model as npz bytes, its training metadata)."""
        answer = self.call(
            "aggregate",
            previous=save_npz(previous),
            updates={c: [data, meta] for c, (data, meta) in updates.items()},
        )
        try:
            result = load_npz(answer["result"])
        except Exception as exc:
            raise ServerFunctionsError(f"aggregate: not a model ({exc})") from None
        if [a.shape for a in result] != [a.shape for a in previous]:
            raise ServerFunctionsError(
                "aggregate must return arrays of the previous global model's shapes"
            )
        if not all(a.dtype.kind in "fiu" and np.isfinite(a).all() for a in result):
            raise ServerFunctionsError("aggregate must return finite numbers")
        return [a.astype(p.dtype, copy=False) for a, p in zip(result, previous, strict=True)]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            pipe.close()
        self._folder.cleanup()


def write_frame(stream, message: dict) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def read_frame(stream) -> dict:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError("no answer")
    (size,) = struct.unpack(">I", head)
    if size >= MAX_FRAME:
        raise ValueError("frame too large")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("a cut answer")
    return msgpack.unpackb(data, raw=False)


# --- the child's side ------------------------------------------------------------------------


def _namespace() -> dict:
    """What the user's class may use without importing, as the ancestor provides it
    (scaleoututil.serverfunctions.allowed_import): numpy as np, random, typing's names,
    ServerFunctionsBase and RoundType."""
    import enum
    import random
    import typing

    class RoundType(enum.Enum):
        TRAINING = "training"
        VALIDATION = "validation"
        PREDICTION = "prediction"

    class ServerFunctionsBase:
        def client_selection(self, client_ids, round_type):
            return None

        def client_settings(self, global_model):
            return None

        def aggregate(self, previous_global, client_updates):
            return None

    names = {n: getattr(typing, n) for n in ("Any", "Callable", "Dict", "List", "Optional",
                                             "Tuple")}  # fmt: skip
    return {"np": np, "random": random, "RoundType": RoundType,
            "ServerFunctionsBase": ServerFunctionsBase, "__name__": "server_functions",
            **names}  # fmt: skip


def _load(source: str):
    namespace = _namespace()
    exec(compile(source, "<server_functions>", "exec"), namespace)
    base = namespace["ServerFunctionsBase"]
    found = namespace.get("ServerFunctions")
    if not (isinstance(found, type) and issubclass(found, base)):
        found = next(
            (v for v in namespace.values()
             if isinstance(v, type) and issubclass(v, base) and v is not base),
            None,
        )  # fmt: skip
    if found is None:
        raise ValueError("the source defines no subclass of ServerFunctionsBase")
    instance = found()
    implements = [m for m in METHODS if getattr(found, m) is not getattr(base, m)]
    return instance, implements, namespace["RoundType"]


def child_main(memory_mb: int) -> None:
    import resource

    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's print() goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    instance = round_type = None
    while True:
        try:
            request = read_frame(requests)
        except EOFError:
            return
        op = request.get("op")
        try:
            if op == "init":
                instance, implements, round_type = _load(request["source"])
                answer = {"implements": implements}
            elif op == "client_selection":
                args = [request["client_ids"], round_type.TRAINING]
                # the ancestor's older signature has no round_type
                takes = len(inspect.signature(instance.client_selection).parameters)
                picked = instance.client_selection(*args[: max(1, takes)])
                answer = {"result": list(picked) if picked is not None else None}
            elif op == "client_settings":
                answer = {"result": instance.client_settings(load_npz(request["model"]))}
            elif op == "aggregate":
                updates = {c: (load_npz(data), meta) for c, (data, meta) in
                           request["updates"].items()}  # fmt: skip
                result = instance.aggregate(load_npz(request["previous"]), updates)
                answer = {"result": save_npz([np.asarray(a) for a in result])}
            else:
                answer = {"error": f"unknown request {op!r}"}
            write_frame(answers, answer)
        except MemoryError:
            write_frame(answers, {"error": f"ran out of its {memory_mb} MiB of memory"})
        except Exception as exc:
            try:
                write_frame(answers, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            except (TypeError, ValueError):
                write_frame(answers, {"error": "unreadable error"})


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
