"""auth: PollAndReport at saturation on one replica that checks tokens against one started
with --insecure, same load generator, interleaved runs; the ratio is what token checking
costs (issue 12: target >= 0.9x).

Each client id polls with its own access token, minted by the load generator with a key
file the suite made and published to the token-checking deployment's prefix (as a replica
with --http-port publishes its own), so every replica-side step is the real one: bearer
parsing, the per-token cache, the revocation check, the client-id binding.
"""

from __future__ import annotations

from bench.scenarios.unary import pick_median, summary
from bench.suite import Bench, cost_rows, row
from combiner.signing import SigningKey


async def run(bench: Bench) -> dict:
    cfg = bench.cfg
    key_file = bench.workdir / "bench-signing-key.pem"
    key = SigningKey.load_or_create(key_file)
    off, on = await bench.deploy(("auth-off", 1, "--insecure"), ("auth-on", 1))
    broker = await bench.broker(on.prefix)
    await broker.credentials.publish_key(key.kid, key.public_pem)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(cfg.reps):  # interleaved, so slow phases of a noisy machine hit both
        runs["off"].append(summary(await bench.unary(off, "PollAndReport", client_prefix="a-")))
        result = await bench.unary(
            on, "PollAndReport", client_prefix="a-", signing_key=str(key_file)
        )
        runs["on"].append(summary(result))
    refused = [r["error_codes"] for r in runs["on"] if r["errors"]]
    if refused:  # a token path that refuses would look fast: its errors are not RPCs
        raise RuntimeError(f"polls with tokens failed: {refused}")
    s_off, s_on = pick_median(runs["off"]), pick_median(runs["on"])
    case = "R=1 idle, tokens checked"
    base = "--insecure (same run)"
    rows = [
        row(case, "RPS", "1/s", s_on["rps"], base, s_off["rps"], key="auth/rps"),
        row(case, "p50", "ms", s_on["p50_ms"], base, s_off["p50_ms"], "lower"),
        row(case, "p99", "ms", s_on["p99_ms"], base, s_off["p99_ms"], "lower"),
        # CPU/RPC against the insecure replica (not the bare server) here
        {**cost_rows(case, s_on, s_off, key="auth")[0], "baseline": base},
    ]
    for dep in (off, on):
        await bench.clear(dep.prefix)
    return {
        "rows": rows,
        "details": {
            "clients": cfg.clients,
            "errors": {k: [r["error_codes"] for r in v] for k, v in runs.items()},
            "runs": runs,
        },
    }
