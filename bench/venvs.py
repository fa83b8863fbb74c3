"""The venvs the suite runs other code in (gitignored under .cache/, made once, reused):

* the published client's (``.cache/scaleout-venv``, scaleout==1.0.0, the one the e2e tests
  use): bench/refload.py loads replicas with its grpcio and its stubs;
* one per grpcio version for the bare baseline (``.cache/bench-grpcio/<version>/``): that
  grpcio, its grpcio-tools (and the protobuf they pull in), and the stubs those tools make
  from proto/scaleout.proto; bench/bare.py runs in it isolated.

``python -m bench.venvs 1.78.0 1.85.4`` makes the grpcio ones ahead of a run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import pathlib
import subprocess
import sys

from bench.procs import ROOT

CACHE = ROOT / ".cache" / "bench-grpcio"
CLIENT_VENV = ROOT / ".cache" / "scaleout-venv"
CLIENT_REQUIREMENT = "scaleout==1.0.0"
REFLOAD = ROOT / "bench" / "refload.py"


def client_python() -> str:
    """The real client venv's Python (made when missing; the lock is the e2e tests' own,
    so a test run and the suite never install it at once)."""
    python = CLIENT_VENV / "bin" / "python"
    check = [str(python), "-I", "-c", "import scaleoututil.grpc.scaleout_pb2_grpc"]
    CLIENT_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(CLIENT_VENV.parent / f".{CLIENT_VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists() or subprocess.run(check, capture_output=True).returncode:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(CLIENT_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 CLIENT_REQUIREMENT],
                check=True,
            )  # fmt: skip
    return str(python)


def refload_command() -> tuple[str, ...]:
    """argv (without the spec) of a load generator on the real client's grpcio and stubs."""
    return (client_python(), "-I", str(REFLOAD))


def python(version: str) -> pathlib.Path:
    return CACHE / version / "bin" / "python"


def stubs(version: str) -> pathlib.Path:
    return CACHE / version / "stubs"


def ensure(version: str) -> pathlib.Path:
    """The venv's Python for grpcio==version, made (with its stubs) when missing."""
    venv = CACHE / version
    stamp = venv / ".ready"
    if stamp.exists():
        return python(version)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python(version)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"grpcio=={version}", f"grpcio-tools=={version}"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [str(python(version)), str(ROOT / "proto" / "generate.py"), str(stubs(version))],
        check=True,
    )
    stamp.write_text(json.dumps(installed(version)))
    return python(version)


def installed(version: str) -> dict:
    """grpcio and protobuf as that venv imports them."""
    out = subprocess.run(
        [str(python(version)), "-I", "-c",
         "import grpc, google.protobuf as p, json; "
         "print(json.dumps({'grpcio': grpc.__version__, 'protobuf': p.__version__}))"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def bare_command(version: str, options: list) -> list[str]:
    """argv of a bare server on that grpcio, with the replica's server options."""
    return [
        str(ensure(version)), "-I", str(ROOT / "bench" / "bare.py"),
        "--host", "127.0.0.1", "--port", "0",
        "--stubs", str(stubs(version)), "--options", json.dumps(options),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="grpcio versions, e.g. 1.78.0")
    for version in parser.parse_args().versions:
        ensure(version)
        print(version, installed(version))


if __name__ == "__main__":
    main()
