"""One module per scenario; each has ``async def run(bench) -> dict`` returning
``{"rows": [...], "details": {...}}`` (rows: figures with their same-run baselines)."""

from bench.scenarios import (
    auth,
    cluster,
    durability,
    fanout,
    ingest,
    memory,
    percore,
    poll,
    pollers,
    round,
    transfer,
)

SCENARIOS = {
    "poll": poll.run,
    "auth": auth.run,
    "percore": percore.run,
    "ingest": ingest.run,
    "durability": durability.run,
    "cluster": cluster.run,
    "fanout": fanout.run,
    "transfer": transfer.run,
    "memory": memory.run,
    "pollers": pollers.run,
    "round": round.run,
}
