"""The load generator: one child process per load (``python -m bench.client``).

It takes one JSON spec as its argument, then talks JSON lines: events and the
result on stdout (``{"event": ...}``), commands from the parent on stdin
(``{"cmd": "grow", "to": N}``, ``{"cmd": "stop"}``). Kinds:

* ``unary``: a closed loop. ``clients`` coroutines (one client id each) spread over
  ``channels`` grpc.aio channels call one unary RPC as fast as they can. Only calls that
  start and end inside the measured window (after ``warmup``, for ``duration`` seconds,
  from the wall-clock ``t0`` the parent sends with ``go``) count. With ``redis_url`` the
  process snapshots Redis ``INFO`` at the window's edges. A client handed a task by
  PollAndReport works on it for ``busy_polls`` polls (reporting RUNNING, as a training
  client does), then reports it COMPLETED (and that reply may carry the next task).
* ``xadd``: raw pipelined XADD with redis.asyncio, ``batch`` entries per pipeline.
* ``streams``: open ``clients`` TaskStreams (``per_channel`` on each channel, at most
  ``open_rate`` a second); ``fanout`` records when each stream's first task arrives;
  ``hold`` keeps them open until ``stop``. Streams the server ended are counted by status.
* ``pollers``: ``clients`` clients each polling every ``interval`` seconds until ``stop``.
  ``{"cmd": "measure", "t0": T, "seconds": S}`` opens a measured window from wall-clock
  ``T`` (default: now) for ``S`` seconds; when it closes, a ``measured`` event carries
  the polls that started and ended inside it, their latencies (sampled as in ``unary``)
  and the errors.
* ``transfer``: time Upload / Download of ``size`` bytes, ``reps`` times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc

MAX_LATENCIES = 50_000  # per process; a uniform sample beyond that


def emit(event: str, **data) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def channel(spec: dict) -> grpc.aio.Channel:
    options = [
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 60_000),
        # a channel of its own: no sharing of connections (subchannels) between channels
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if spec.get("round_robin"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.aio.insecure_channel(spec["target"], options=options)


def metadata(client_id: str) -> tuple:
    return (("client", client_id), ("client-id", client_id), ("name", client_id))


def now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def request_for(method: str, client_id: str):
    """A realistic message of each kind, like the 1.0.0 client sends."""
    if method == "PollAndReport":
        return pb.ActivityReport(node_id=client_id)
    if method == "SendModelMetric":
        return pb.ModelMetric(
            client_id=client_id,
            metrics=[
                pb.MetricElem(key="training_loss", value=0.4213),
                pb.MetricElem(key="training_accuracy", value=0.8731),
            ],
            step=wrappers_pb2.UInt32Value(value=17),
            model_id="m-bench",
            round_id="1",
            session_id="s-bench",
            timestamp=now_ts(),
        )
    if method == "SendTelemetryMessage":
        return pb.TelemetryMessage(
            client_id=client_id,
            telemetries=[
                pb.TelemetryElem(key="cpu_percent", value=37.5),
                pb.TelemetryElem(key="memory_percent", value=61.2),
                pb.TelemetryElem(key="gpu_percent", value=0.0),
            ],
            timestamp=now_ts(),
        )
    if method == "SendStatus":
        return pb.Status(
            client_id=client_id,
            status="Received model update request of type MODEL_UPDATE",
            log_level=pb.LogLevel.Value("INFO"),
            type="MODEL_UPDATE",
            timestamp=now_ts(),
        )
    if method == "SendHeartbeat":
        return pb.Heartbeat(client_id=client_id)
    raise ValueError(f"no request for {method}")


async def redis_snapshot(client) -> dict:
    stats = await client.info("stats")
    cmds = await client.info("commandstats")
    return {
        "time": time.time(),
        "total_reads_processed": int(stats.get("total_reads_processed", 0)),
        "total_commands_processed": int(stats.get("total_commands_processed", 0)),
        "commandstats": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()},
    }


class Commands:
    """Lines from the parent on stdin."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader) -> None:
        while line := await reader.readline():
            if line.strip():
                await self.queue.put(json.loads(line))
        await self.queue.put({"cmd": "stop"})  # the parent went away

    async def next(self) -> dict:
        return await self.queue.get()


# --- unary closed loop -------------------------------------------------------------------


async def go(commands: Commands) -> float:
    """Say we are ready; the parent answers with the shared start time t0."""
    emit("ready")
    cmd = await commands.next()
    if cmd["cmd"] != "go":
        raise SystemExit(0)
    return float(cmd["t0"])


async def run_unary(spec: dict, commands: Commands) -> dict:
    method = spec["method"]
    chans = [channel(spec) for _ in range(spec.get("channels", 4))]
    stubs = [pb_grpc.CombinerClientStub(c) for c in chans]
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), 30)
    prefix = spec.get("client_prefix", "c")
    signing = None
    if spec.get("signing_key"):  # each client polls with its own access token (scenario auth)
        from combiner.signing import SigningKey

        signing = SigningKey.load_or_create(spec["signing_key"])
    t0 = await go(commands)
    start, end = t0 + spec["warmup"], t0 + spec["warmup"] + spec["duration"]
    latencies: list[float] = []
    seen = 0  # calls in the window (for the latency reservoir)
    counters = {"rpcs": 0, "errors": 0, "tasks": 0, "done_reports": 0, "all_rpcs": 0}
    error_codes: dict[str, int] = {}
    rng = random.Random(os.getpid())

    async def one_client(i: int) -> None:
        nonlocal seen
        cid = f"{prefix}{i}"
        md = metadata(cid)
        if signing is not None:
            access = signing.mint(cid, "client", f"bench-{cid}", 3600).token
            md = (*md, ("authorization", f"Bearer {access}"))
        call = getattr(stubs[i % len(stubs)], method)
        idle = request_for(method, cid)
        request = idle
        current, busy, busy_polls = "", 0, spec.get("busy_polls", 0)
        perf = time.perf_counter
        wall = time.time
        while True:
            t = wall()
            if t >= end:
                return
            a = perf()
            try:
                reply = await call(request, metadata=md)
            except grpc.aio.AioRpcError as exc:
                counters["errors"] += 1
                code = exc.code().name
                error_codes[code] = error_codes.get(code, 0) + 1
                await asyncio.sleep(0.01)
                continue
            b = perf()
            counters["all_rpcs"] += 1
            counted = t >= start and wall() <= end
            if counted:
                counters["rpcs"] += 1
                seen += 1
                if len(latencies) < MAX_LATENCIES:
                    latencies.append(b - a)
                else:
                    j = rng.randrange(seen)
                    if j < MAX_LATENCIES:
                        latencies[j] = b - a
            if method == "PollAndReport":
                if request.done and counted:
                    counters["done_reports"] += 1
                if reply.type:  # a new task
                    counters["tasks"] += counted
                    current, busy = reply.correlation_id, busy_polls
                if current and busy > 0:
                    busy -= 1
                    request = pb.ActivityReport(
                        node_id=cid, correlation_id=current, status="RUNNING"
                    )
                elif current:
                    request = pb.ActivityReport(
                        node_id=cid, correlation_id=current, status="COMPLETED", done=True
                    )
                    current = ""
                else:
                    request = idle

    snapshots = {}

    async def snap() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(spec["redis_url"])
        try:
            await asyncio.sleep(max(0.0, start - time.time()))
            snapshots["before"] = await redis_snapshot(client)
            await asyncio.sleep(max(0.0, end - time.time()))
            snapshots["after"] = await redis_snapshot(client)
        finally:
            await client.aclose()

    tasks = [one_client(i) for i in range(spec["clients"])]
    if spec.get("redis_url"):
        tasks.append(snap())
    await asyncio.sleep(max(0.0, t0 - time.time()))
    await asyncio.gather(*tasks)
    for c in chans:
        await c.close()
    return {
        **counters,
        "seconds": end - start,
        "latencies_us": [int(x * 1e6) for x in latencies],
        "error_codes": error_codes,
        "redis": snapshots,
    }


# --- raw XADD ----------------------------------------------------------------------------


async def run_xadd(spec: dict, commands: Commands) -> dict:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(spec["redis_url"])
    await client.ping()
    stream, batch = spec["stream"], spec["batch"]
    fields = spec["fields"]
    t0 = await go(commands)
    start, end = t0 + spec["warmup"], t0 + spec["warmup"] + spec["duration"]
    counted = 0

    async def loop() -> None:
        nonlocal counted
        while True:
            t = time.time()
            if t >= end:
                return
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
            await pipe.execute()
            if t >= start and time.time() <= end:
                counted += batch

    await asyncio.sleep(max(0.0, t0 - time.time()))
    await asyncio.gather(*(loop() for _ in range(spec.get("concurrency", 4))))
    await client.aclose()
    return {"messages": counted, "seconds": end - start}


# --- TaskStreams -------------------------------------------------------------------------


async def run_streams(spec: dict, commands: Commands) -> dict:
    per_channel = spec.get("per_channel", 100)
    prefix = spec.get("client_prefix", "s")
    chans: list[grpc.aio.Channel] = []
    stubs: list = []
    calls: list = []
    readers: list[asyncio.Task] = []
    receipts: dict[str, float] = {}
    all_in = asyncio.Event()
    want = 0
    ended = {"eof": 0, "errors": 0}
    errors: dict[str, int] = {}  # why streams ended before we closed them
    calls_closing = False

    async def read(call, cid: str) -> None:
        try:
            async for msg in call:
                if msg.correlation_id and cid not in receipts:
                    receipts[cid] = time.time()
                    if len(receipts) >= want:
                        all_in.set()
            ended["eof"] += 1
        except grpc.aio.AioRpcError as exc:
            ended["errors"] += 1
            if not calls_closing:
                why = f"{exc.code().name}: {exc.details()}"[:200]
                errors[why] = errors.get(why, 0) + 1

    rate = spec.get("open_rate", 0)  # streams opened per second (0: all at once)

    async def open_to(n: int) -> None:
        t = time.monotonic()
        first = len(calls)
        for i in range(first, n):
            if i % per_channel == 0:
                chans.append(channel(spec))
                stubs.append(pb_grpc.CombinerClientStub(chans[-1]))
            cid = f"{prefix}{i}"
            call = stubs[-1].TaskStream(
                pb.ClientAvailableMessage(client_id=cid), metadata=metadata(cid)
            )
            calls.append(call)
            readers.append(asyncio.create_task(read(call, cid)))
            if rate and (i - first) % 50 == 49:  # in steps of 50
                await asyncio.sleep(max(0.0, t + (i - first + 1) / rate - time.monotonic()))

    want = spec["clients"]
    await open_to(spec["clients"])
    emit("opened", n=len(calls))
    result: dict = {}
    while True:
        if spec.get("mode") == "fanout":
            waiter = asyncio.ensure_future(all_in.wait())
            cmd_task = asyncio.ensure_future(commands.next())
            done, _ = await asyncio.wait(
                {waiter, cmd_task}, timeout=spec.get("timeout", 60), return_when="FIRST_COMPLETED"
            )
            waiter.cancel()
            if cmd_task in done:
                cmd = cmd_task.result()
            else:
                cmd_task.cancel()
                cmd = {"cmd": "stop"}
            if cmd["cmd"] == "stop" or waiter in done or not done:
                result = {"receipts": receipts, "opened": len(calls)}
                break
        else:
            cmd = await commands.next()
            if cmd["cmd"] == "grow":
                await open_to(int(cmd["to"]))
                emit("opened", n=len(calls))
                continue
            result = {"opened": len(calls)}
            break
    calls_closing = True
    for call in calls:
        call.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for c in chans:
        await c.close()
    result["ended"] = ended
    result["errors"] = errors
    return result


# --- polling clients at an interval ------------------------------------------------------


async def run_pollers(spec: dict, commands: Commands) -> dict:
    per_channel = spec.get("per_channel", 100)
    interval = spec["interval"]
    prefix = spec.get("client_prefix", "p")
    chans: list[grpc.aio.Channel] = []
    stubs: list = []
    tasks: list[asyncio.Task] = []
    polls: list[int] = []
    stop = asyncio.Event()
    errors = 0
    # the measured window (wall clock) and what it saw
    window = {"start": float("inf"), "end": float("-inf")}
    latencies: list[float] = []
    measured = {"polls": 0, "errors": 0, "seen": 0}
    error_codes: dict[str, int] = {}
    rng = random.Random(os.getpid())

    def record(latency: float) -> None:
        measured["polls"] += 1
        measured["seen"] += 1
        if len(latencies) < MAX_LATENCIES:
            latencies.append(latency)
        else:
            j = rng.randrange(measured["seen"])
            if j < MAX_LATENCIES:
                latencies[j] = latency

    async def client(i: int, stub) -> None:
        nonlocal errors
        cid = f"{prefix}{i}"
        md = metadata(cid)
        request = pb.ActivityReport(node_id=cid)
        perf, wall = time.perf_counter, time.time
        await asyncio.sleep(random.random() * interval)
        while not stop.is_set():
            t = wall()
            a = perf()
            try:
                await stub.PollAndReport(request, metadata=md)
                b = perf()
                polls[i] += 1
                if t >= window["start"] and wall() <= window["end"]:
                    record(b - a)
            except grpc.aio.AioRpcError as exc:
                errors += 1
                if window["start"] <= t <= window["end"]:
                    measured["errors"] += 1
                    code = exc.code().name
                    error_codes[code] = error_codes.get(code, 0) + 1
            # A plain sleep (a timer): wait_for(stop.wait()) would make a task per poll, load
            # generator CPU the servers' polls then wait for. Stop cancels the sleepers.
            await asyncio.sleep(interval)

    def open_to(n: int) -> None:
        for i in range(len(tasks), n):
            if i % per_channel == 0:
                chans.append(channel(spec))
                stubs.append(pb_grpc.CombinerClientStub(chans[-1]))
            polls.append(0)
            tasks.append(asyncio.create_task(client(i, stubs[-1])))

    async def report_when_polled(n: int) -> None:
        """Tell the parent once each of the first n clients has polled twice."""
        while sum(1 for p in polls[:n] if p >= 2) < n:  # noqa: ASYNC110 (a plain counter)
            await asyncio.sleep(0.1)
        emit("polling", n=n)

    async def measure(start: float, seconds: float) -> None:
        """Open the window; when it closes, report what it saw."""
        latencies.clear()
        measured.update(polls=0, errors=0, seen=0)
        error_codes.clear()
        window.update(start=start, end=start + seconds)
        await asyncio.sleep(max(0.0, window["end"] - time.time()) + 0.01)
        emit(
            "measured",
            polls=measured["polls"],
            errors=measured["errors"],
            error_codes=dict(error_codes),
            seconds=seconds,
            latencies_us=[int(x * 1e6) for x in latencies],
        )

    reporters = set()
    open_to(spec["clients"])
    reporters.add(asyncio.create_task(report_when_polled(len(tasks))))
    while True:
        cmd = await commands.next()
        if cmd["cmd"] == "grow":
            open_to(int(cmd["to"]))
            reporters.add(asyncio.create_task(report_when_polled(len(tasks))))
            continue
        if cmd["cmd"] == "measure":
            start = float(cmd.get("t0") or time.time())
            reporters.add(asyncio.create_task(measure(start, float(cmd["seconds"]))))
            continue
        break
    for reporter in reporters:
        reporter.cancel()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in chans:
        await c.close()
    return {"clients": len(tasks), "polls": sum(polls), "errors": errors}


# --- model transfer ----------------------------------------------------------------------


async def run_transfer(spec: dict) -> dict:
    chan = channel(spec)
    await asyncio.wait_for(chan.channel_ready(), 30)
    stub = pb_grpc.ModelServiceStub(chan)
    size, chunk = spec["size"], spec.get("chunk", 1024 * 1024)
    md = metadata("xfer")
    times = []
    ids = []
    if spec["op"] == "upload":
        data = os.urandom(size)
        checksum = hashlib.sha256(data).hexdigest()
        pieces = [pb.FileChunk(data=data[i : i + chunk]) for i in range(0, size, chunk)]
        for rep in range(spec["reps"]):
            model_id = f"{spec['model_prefix']}-{rep}"
            meta = (*md, ("model-id", model_id), ("checksum", checksum))
            t = time.perf_counter()
            reply = await stub.Upload(iter(pieces), metadata=meta)
            times.append(time.perf_counter() - t)
            if reply.status != pb.ModelStatus.OK:
                raise RuntimeError(f"upload refused: {reply.message}")
            ids.append(model_id)
    else:
        # One untimed Download first: it opens the HTTP/2 flow-control window to its full
        # size on this new connection, and on a replica fills the model cache (the uncached
        # path is measured on a replica with the cache off).
        for rep in range(spec["reps"] + 1):
            t = time.perf_counter()
            got = 0
            call = stub.Download(pb.ModelRequest(model_id=spec["model_id"]), metadata=md)
            async for piece in call:
                got += len(piece.data)
            if rep:
                times.append(time.perf_counter() - t)
            if got != size:
                raise RuntimeError(f"downloaded {got} bytes, expected {size}")
    await chan.close()
    return {"times": times, "size": size, "ids": ids}


async def main() -> None:
    spec = json.loads(sys.argv[1])
    kind = spec["kind"]
    commands = Commands()
    await commands.start()
    if kind == "unary":
        result = await run_unary(spec, commands)
    elif kind == "xadd":
        result = await run_xadd(spec, commands)
    elif kind == "streams":
        result = await run_streams(spec, commands)
    elif kind == "pollers":
        result = await run_pollers(spec, commands)
    elif kind == "transfer":
        result = await run_transfer(spec)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    emit("result", **result)


if __name__ == "__main__":
    asyncio.run(main())
