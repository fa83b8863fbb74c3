"""A closed-loop load generator on the published client's own grpcio and stubs.

Run by the scaleout==1.0.0 venv's Python, isolated from this repository (``python -I``),
so the figures it gives do not depend on our client code, our stubs or our grpcio:

    .cache/scaleout-venv/bin/python -I bench/refload.py SPEC_JSON

It imports only the standard library, grpc and ``scaleoututil.grpc`` (the stubs the real
client calls with). The protocol is bench/client.py's ``unary`` kind: it prints
``{"event": "ready"}`` once its channels are up, waits for ``{"cmd": "go", "t0": T}`` on
stdin, runs ``clients`` coroutines (one client id each) over ``channels`` channels from
wall-clock T, counts the calls that start and end inside the window (after ``warmup``, for
``duration`` seconds) and prints ``{"event": "result", ...}``. ``tokens`` (optional) is a
JSON file mapping each client id to its access token, minted by the suite.
"""

import asyncio
import json
import random
import sys
import time

import grpc
from google.protobuf import timestamp_pb2
from scaleoututil.grpc import scaleout_pb2 as pb
from scaleoututil.grpc import scaleout_pb2_grpc as pb_grpc

MAX_LATENCIES = 50_000


def emit(event, **data):
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def request_for(method, client_id):
    """What the 1.0.0 client sends: an idle report, or a telemetry message of 3 values."""
    if method == "PollAndReport":
        return pb.ActivityReport(node_id=client_id)
    if method == "SendTelemetryMessage":
        ts = timestamp_pb2.Timestamp()
        ts.GetCurrentTime()
        return pb.TelemetryMessage(
            client_id=client_id,
            telemetries=[
                pb.TelemetryElem(key="cpu_percent", value=37.5),
                pb.TelemetryElem(key="memory_percent", value=61.2),
                pb.TelemetryElem(key="gpu_percent", value=0.0),
            ],
            timestamp=ts,
        )
    raise SystemExit(f"refload: no request for {method}")


async def main(spec):
    options = [("grpc.use_local_subchannel_pool", 1)]
    if spec.get("round_robin"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    chans = [
        grpc.aio.insecure_channel(spec["target"], options=options)
        for _ in range(spec.get("channels", 4))
    ]
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), 30)
    stubs = [pb_grpc.CombinerClientStub(c) for c in chans]
    tokens = spec.get("tokens") or {}

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("ready")
    cmd = json.loads(await reader.readline())
    if cmd.get("cmd") != "go":
        return
    t0 = float(cmd["t0"])
    start, end = t0 + spec["warmup"], t0 + spec["warmup"] + spec["duration"]
    method = spec["method"]
    counters = {"rpcs": 0, "errors": 0, "all_rpcs": 0}
    error_codes = {}
    latencies = []
    seen = 0
    rng = random.Random(0)

    async def one_client(i):
        nonlocal seen
        cid = f"{spec.get('client_prefix', 'r')}{i}"
        md = [("client", cid), ("client-id", cid), ("name", cid)]
        if cid in tokens:
            md.append(("authorization", f"Bearer {tokens[cid]}"))
        call = getattr(stubs[i % len(stubs)], method)
        request = request_for(method, cid)
        perf, wall = time.perf_counter, time.time
        while (t := wall()) < end:
            a = perf()
            try:
                await call(request, metadata=md)
            except grpc.aio.AioRpcError as exc:
                counters["errors"] += 1
                code = exc.code().name
                error_codes[code] = error_codes.get(code, 0) + 1
                await asyncio.sleep(0.01)
                continue
            b = perf()
            counters["all_rpcs"] += 1
            if t >= start and wall() <= end:
                counters["rpcs"] += 1
                seen += 1
                if len(latencies) < MAX_LATENCIES:
                    latencies.append(b - a)
                elif (j := rng.randrange(seen)) < MAX_LATENCIES:
                    latencies[j] = b - a

    await asyncio.sleep(max(0.0, t0 - time.time()))
    await asyncio.gather(*(one_client(i) for i in range(spec["clients"])))
    for c in chans:
        await c.close()
    emit(
        "result",
        **counters,
        seconds=end - start,
        latencies_us=[int(x * 1e6) for x in latencies],
        error_codes=error_codes,
        grpcio=grpc.__version__,
    )


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("tokens"):  # a file: its map replaces the name
        with open(spec["tokens"]) as f:
            spec["tokens"] = json.load(f)
    asyncio.run(main(spec))
