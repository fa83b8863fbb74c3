"""Sizes of each run mode: full (the default), --quick (a few minutes), --smoke (seconds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MiB = 1024 * 1024


@dataclass
class Config:
    mode: str
    # closed-loop unary loads (poll, ingest)
    warmup: float
    duration: float
    reps: int  # interleaved repetitions (bare, R=1, R=2, bare, ...); the median counts
    clients: int  # concurrent client coroutines, one client id each
    channels: int  # grpc.aio channels they share
    task_fraction: float  # poll with tasks: about this share of polls gets a task
    ingest_replicas: tuple[int, ...]
    xadd_batch: int
    # fanout
    fanout_clients: int
    fanout_replicas: tuple[int, ...]
    streams_per_channel: int
    open_rate: int  # TaskStreams opened per second (clients arriving, not all at once)
    # transfer
    transfer_sizes: tuple[int, ...]
    transfer_reps: int
    # memory
    memory_streams: int
    memory_pollers: int
    poll_interval: float
    pollers_per_channel: int
    settle: float  # seconds a replica gets to settle before its RSS is read
    # pollers: many clients polling at an interval over 2 replicas, latency of each poll
    pollers_clients: int
    pollers_interval: float
    pollers_window: float  # seconds measured once every client is polling
    pollers_procs: int  # load generator processes the clients are split over
    # percore: load from the real client's venv at these concurrencies; bare baselines on
    # our grpcio and on these versions (bench/venvs.py)
    percore_clients: tuple[int, ...]
    percore_grpcio: tuple[str, ...]
    # round
    round_clients: int
    round_model_bytes: int
    # durability: SendModelMetric with --durability local vs replicated (a Redis replica
    # started for it), this many interleaved pairs of runs
    durability_reps: int
    # cluster: PollAndReport and SendModelMetric on `cluster_replicas` replicas over a Redis
    # Cluster of 1 and of 3 primaries (started for it), this many interleaved rounds
    cluster_replicas: int = 4
    cluster_reps: int = 3
    # targets that only make sense at full size
    full_size: dict = field(default_factory=dict)

    def asdict(self) -> dict:
        return asdict(self)


FULL = Config(
    mode="full",
    warmup=2.0,
    duration=8.0,
    reps=2,
    clients=200,
    channels=4,
    task_fraction=0.1,
    ingest_replicas=(1, 2),
    xadd_batch=100,
    fanout_clients=5000,
    fanout_replicas=(1, 2),
    streams_per_channel=100,
    open_rate=1000,
    transfer_sizes=(10 * MiB, 100 * MiB),
    transfer_reps=3,
    memory_streams=5000,
    memory_pollers=2000,
    poll_interval=5.0,
    pollers_per_channel=10,
    settle=2.0,
    pollers_clients=10_000,
    pollers_interval=5.0,
    pollers_window=15.0,
    pollers_procs=4,
    percore_clients=(64, 200),
    percore_grpcio=("1.71.2", "1.74.0", "1.80.1", "1.85.4"),
    round_clients=100,
    round_model_bytes=10 * MiB,
    durability_reps=3,
    cluster_replicas=4,
    cluster_reps=3,
)

QUICK = Config(
    mode="quick",
    warmup=1.0,
    duration=3.0,
    reps=2,
    clients=200,
    channels=4,
    task_fraction=0.1,
    ingest_replicas=(1,),
    xadd_batch=100,
    fanout_clients=1000,
    fanout_replicas=(2,),
    streams_per_channel=100,
    open_rate=1000,
    transfer_sizes=(10 * MiB,),
    transfer_reps=5,
    memory_streams=1000,
    memory_pollers=500,
    poll_interval=2.0,
    pollers_per_channel=10,
    settle=1.5,
    pollers_clients=2000,
    pollers_interval=5.0,
    pollers_window=10.0,
    pollers_procs=2,
    percore_clients=(64, 200),
    percore_grpcio=("1.74.0", "1.85.4"),
    round_clients=20,
    round_model_bytes=10 * MiB,
    durability_reps=3,
    cluster_replicas=4,
    cluster_reps=3,
)

SMOKE = Config(
    mode="smoke",
    warmup=0.3,
    duration=1.0,
    reps=1,
    clients=20,
    channels=2,
    task_fraction=0.1,
    ingest_replicas=(1,),
    xadd_batch=100,
    fanout_clients=50,
    fanout_replicas=(2,),
    streams_per_channel=10,
    open_rate=1000,
    transfer_sizes=(1 * MiB,),
    transfer_reps=1,
    memory_streams=100,
    memory_pollers=40,
    poll_interval=0.5,
    pollers_per_channel=10,
    settle=0.3,
    pollers_clients=40,
    pollers_interval=0.5,
    pollers_window=1.0,
    pollers_procs=1,
    percore_clients=(20,),
    percore_grpcio=("1.74.0",),  # one other venv, so the path is exercised
    round_clients=3,
    round_model_bytes=MiB // 4,
    durability_reps=1,
    cluster_replicas=2,  # smoke: the path, not the figures
    cluster_reps=1,
)

# Full-size figures some targets are stated for.
TARGET_STREAMS = 5000
TARGET_FANOUT = 5000
TARGET_POLLERS = 10_000
TARGET_POLL_INTERVAL = 5.0
