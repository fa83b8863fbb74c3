"""percore: calls per core, measured from outside (issue 15).

The load generator is bench/refload.py in the real client's venv (its grpcio, its stubs),
so no figure depends on our own client code. At each concurrency in ``percore_clients``
(64 and 200 coroutines on 4 channels), for idle PollAndReport and SendTelemetryMessage,
runs are interleaved over:

* bare grpc.aio servers (bench/bare.py: same services and server options, empty
  handlers), one on our own venv's grpcio and one per version in ``percore_grpcio``
  (bench/venvs.py); the **fastest** of them (by RPS) is the baseline;
* one replica with ``--insecure`` (tokens off), and one checking tokens (each client id
  with its own access token, minted here with a key published to that deployment).

Reported: RPS, server CPU per RPC **including Redis's** (µs of user+system CPU of the
replica and redis-server over the window, against the bare server's), calls per core
(10^6 / that), Redis round trips per RPC, and tokens on against off. The median of at least
three interleaved runs counts (one at --smoke size).
"""

from __future__ import annotations

import json

import google.protobuf as protobuf
import grpc

from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, row
from bench.venvs import bare_command, installed, refload_command
from combiner.server import ServeOptions, grpc_options
from combiner.signing import SigningKey

METHODS = ("PollAndReport", "SendTelemetryMessage")
LABEL = {"PollAndReport": "poll", "SendTelemetryMessage": "telemetry"}


def cpu_us(s: dict) -> float:
    """Server CPU per RPC with Redis's (a bare server has none)."""
    return s["cpu_us_per_rpc_servers"] + s.get("cpu_us_per_rpc_redis", 0.0)


async def bare_servers(bench: Bench) -> dict[str, object]:
    """grpcio version -> a bare deployment on it (ours first)."""
    (own,) = await bench.deploy(("bare", 0))
    servers = {grpc.__version__: own}
    options = grpc_options(ServeOptions())
    for version in bench.cfg.percore_grpcio:
        if version not in servers:
            python, *args = bare_command(version, options)
            servers[version] = await bench.deploy_bare(f"bare-grpcio-{version}", python, args)
    return servers


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    loadgen = refload_command()
    bares = await bare_servers(bench)
    key = SigningKey.load_or_create(bench.workdir / "percore-signing-key.pem")
    off, on = await bench.deploy(("percore-off", 1, "--insecure"), ("percore-on", 1))
    await (await bench.broker(on.prefix)).credentials.publish_key(key.kid, key.public_pem)
    tokens_file = bench.workdir / "percore-tokens.json"
    tokens = {f"r{i}": key.mint(f"r{i}", "client", f"bench-r{i}", 3600).token
              for i in range(max(cfg.percore_clients))}  # fmt: skip
    tokens_file.write_text(json.dumps(tokens))

    targets = {f"bare {v}": dep for v, dep in bares.items()} | {"off": off, "on": on}
    rows, details = [], {"grpcio": {}, "runs": {}}
    for version in bares:
        own = {"grpcio": grpc.__version__, "protobuf": protobuf.__version__}
        details["grpcio"][version] = own if version == grpc.__version__ else installed(version)
    for clients in cfg.percore_clients:
        for method in METHODS:
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            # interleaved, so slow phases hit every server; at least 3, so the median is one
            for _ in range(max(cfg.reps, 3) if cfg.mode != "smoke" else 1):
                for name, dep in targets.items():
                    spec = {
                        "kind": "refload",
                        "target": dep.target,
                        "method": method,
                        "clients": clients,
                        "channels": cfg.channels,
                        "warmup": cfg.warmup,
                        "duration": cfg.duration,
                        **({"tokens": str(tokens_file)} if name == "on" else {}),
                    }
                    result = await bench.timed(spec, dep, loadgen)
                    if result["errors"]:  # failing calls would look fast: not a figure
                        raise RuntimeError(f"{name} {method}: {result['error_codes']}")
                    runs[name].append(summary(result))
            best = {name: pick_median(r) for name, r in runs.items()}
            fastest = max((n for n in best if n.startswith("bare")), key=lambda n: best[n]["rps"])
            base, base_name = best[fastest], f"fastest bare ({fastest.split()[1]})"
            case = f"{LABEL[method]} x{clients}"
            k = f"{LABEL[method]}/{clients}"
            for name in best:
                if name.startswith("bare"):
                    s = best[name]
                    rows += [
                        row(f"{case} bare grpcio {name.split()[1]}", "RPS", "1/s", s["rps"],
                            base_name, base["rps"]),
                        row(f"{case} bare grpcio {name.split()[1]}", "server CPU/RPC", "µs",
                            cpu_us(s), base_name, cpu_us(base), "lower"),
                    ]  # fmt: skip
            s, t = best["off"], best["on"]
            rows += [
                row(case, "RPS", "1/s", s["rps"], base_name, base["rps"], key=f"{k}/rps"),
                row(case, "server+Redis CPU/RPC", "µs", cpu_us(s), base_name, cpu_us(base),
                    "lower", key=f"{k}/cpu", replica_us=s["cpu_us_per_rpc_servers"],
                    redis_us=s["cpu_us_per_rpc_redis"]),
                row(case, "calls per core", "1/s", 1e6 / cpu_us(s), base_name,
                    1e6 / cpu_us(base)),
                row(case, "Redis round trips/RPC", "", s["redis"]["round_trips_per_rpc"],
                    "unbatched (1/RPC)", 1.0, "lower", key=f"{k}/round_trips"),
                row(f"{case}, tokens checked", "RPS", "1/s", t["rps"], "tokens off (same run)",
                    s["rps"], key=f"{k}/tokens"),
                row(f"{case}, tokens checked", "server+Redis CPU/RPC", "µs", cpu_us(t),
                    "tokens off (same run)", cpu_us(s), "lower"),
            ]  # fmt: skip
            details["runs"][k] = runs
    for dep in (off, on):
        await bench.clear(dep.prefix)
    return {"rows": rows, "details": details}
