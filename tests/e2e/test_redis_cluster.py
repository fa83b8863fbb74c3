"""Redis Cluster under a training session with the real 1.0.0 client (issue 14): kill -9
of a primary, and a reshard of 1,000 slots, each while round 2 of 3 is collecting.

The deployment: a real Redis Cluster (tests/redis_cluster.py: 3 primaries, one replica each,
cluster-node-timeout 1 s) and tests/cluster.py's Cluster on it (two `combiner serve`
replicas, one `combiner worker`, HAProxy with deploy/haproxy.cfg), every process given one
node's redis:// URL: they detect the cluster themselves and take 16 partitions
(broker/partitions.py). Three 1.0.0 clients (tests/e2e/client_driver.py) attach to HAProxy
only; they poll, or stream (SendHeartbeat + TaskStream, which die on one UNAVAILABLE).

The first client is held in its round-2 training call until the fault is under way, so its
upload, its SendModelUpdate and the worker's aggregation of round 2 meet it. A MetricSender
(tests/e2e/test_sentinel_failover.py) calls SendModelMetric through HAProxy across the
fault: nothing may be answered UNAVAILABLE. A reshard moves keys with MIGRATE, so every
metric answered OK must be stored afterwards; a kill -9 under --durability local may lose
what the dead primary had not replicated yet (counted and printed, not asserted), under
--durability replicated nothing (asserted).

What is checked at the end, as for Sentinel: the session completed with the exact weighted
mean; every client, replica, the worker and HAProxy still run; no client log has what the
1.0.0 client dies of; no replica or worker log has a traceback or a CROSSSLOT error; each
task was handed out once and completed (for streaming clients, round 3's tasks reached
their streams through the wake-ups after the fault); each update and round model is stored.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from redis.cluster import RedisCluster

from broker.keys import Keys
from broker.partitions import DEFAULT_CLUSTER
from tests.cluster import Cluster
from tests.e2e.harness import E2E, release
from tests.e2e.test_cluster import (
    LogFile,
    all_alive,
    assert_delivered_once,
    assert_survived,
    assert_trained,
    attach_logs,
    finished,
    start_clients,
    start_session,
    wait_held,
)
from tests.e2e.test_sentinel_failover import (
    MetricSender,
    assert_no_tracebacks,
    assert_updates_stored,
    combiner_logs,
    redis_trouble,
)
from tests.e2e.test_training import seed_arrays
from tests.redis_cluster import ClusterTopology, myself
from tests.services import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing"),
]

ROUNDS = 3
FAULT_IN = 2  # the round that is collecting when the fault comes
RESHARD_SLOTS = 1000


@pytest.fixture
def durability():
    return "local"


@pytest.fixture
def system(request, prefix, tmp_path, client_python, durability):
    """A Redis Cluster, a combiner Cluster on it and an E2E for the real clients; every
    process's log is attached on failure. --durability replicated gets two replicas per
    primary (the promoted one keeps one to confirm to) and a session lease longer than a
    resync's stall, as for Sentinel (tests/e2e/test_sentinel_failover.py)."""
    args = ("--durability", durability)
    worker_args = (*args, "--lease-ttl", "15") if durability == "replicated" else args
    topology = ClusterTopology(primaries=3, replicas=2 if durability == "replicated" else 1)
    cluster = None
    nodes = [LogFile(f"redis node (port {n.port})", n.log_path) for n in topology.nodes]
    attach_logs(request, tmp_path, ("replica1", "replica2", "worker1", "haproxy"), *nodes)
    e2e = None
    try:
        topology.start()
        # Every process, and every CLI call of the test, starts from a node that is never
        # killed: a replica (a killed primary's replica is promoted, and stays up).
        url = next(n for n in topology.nodes if n not in topology.primaries()).url
        cluster = Cluster(
            tmp_path, prefix, replicas=2, workers=1, redis_url=url,
            replica_args=args, worker_args=worker_args,
        ).start()  # fmt: skip
        e2e = E2E(request, url, prefix, tmp_path, client_python)
        yield topology, cluster, e2e
    finally:
        if e2e is not None:
            e2e.stop()  # clients first: they must not outlive the replicas (§3.2)
        if cluster is not None:
            cluster.stop()
        topology.close()


def stored_steps(topology: ClusterTopology, prefix: str, client_id: str) -> set[int]:
    """The sender's metric steps in the client's partition's inbound stream, wherever its
    slot lives now."""
    keys = Keys(prefix, DEFAULT_CLUSTER)
    client = RedisCluster.from_url(next(n for n in topology.live()).url, socket_timeout=5)
    try:
        entries = client.xrange(keys.inbound("metrics", keys.partition_of(client_id)))
    finally:
        client.close()
    return {
        int(fields[b"step"])
        for _, fields in entries
        if fields.get(b"client_id") == client_id.encode()
        and int(fields.get(b"step") or 0) >= MetricSender.FIRST_STEP
    }


def assert_no_crossslot(cluster) -> None:
    for name, text in combiner_logs(cluster).items():
        assert "CROSSSLOT" not in text, f"CROSSSLOT in the log of {name}:\n{text[-6000:]}"


def partition_owners(topology: ClusterTopology, prefix: str) -> dict[int, int]:
    """Partition -> the port of the primary that owns its slot now."""
    keys = Keys(prefix, DEFAULT_CLUSTER)
    return {
        p: topology.primary_for_slot(topology.slot_of(keys.clients(p))).port
        for p in keys.all_partitions
    }


def run_session_through(system, mode: str, fault):
    """Clients, a session, round 2 collecting, a MetricSender; then fault() (which returns
    a description) with the held client released during it; then every end check.
    Returns the sender and the steps it lost."""
    topology, cluster, e2e = system
    check = all_alive(cluster, e2e)
    hold = e2e.tmp / "hold"
    hold.mkdir()
    clients = start_clients(cluster, e2e, mode, hold, held=str(FAULT_IN))
    e2e.wait_online(clients)
    seed = seed_arrays()
    session = start_session(e2e, seed, rounds=ROUNDS)
    sid = session.session_id
    wait_held(e2e, sid, clients[0], call=FAULT_IN)
    trouble_before = redis_trouble(cluster)

    # as the held client: its partition's primary is the one killed, so the metrics meet
    # the fault (any other client's partition may live on another primary)
    sender = MetricSender(cluster.target, clients[0].client_id)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 20, 30, what="metrics acknowledged before the fault")
    what = fault(lambda: release(hold, FAULT_IN), check)
    acked = len(sender.acked)
    wait_for(lambda: len(sender.acked) >= acked + 20, 60, what="metrics acknowledged after it")
    sender.stop()
    lost = sorted(set(sender.acked) - stored_steps(topology, e2e.prefix, sender.client_id))
    assert "UNAVAILABLE" not in sender.refused, sender.refused

    view = finished(session, check)
    check()  # every client, both replicas, the worker and HAProxy still run
    assert_trained(e2e, view, seed, clients, rounds=ROUNDS)
    tasks, _ = assert_delivered_once(e2e, sid, clients, via=mode, rounds=ROUNDS)
    assert assert_updates_stored(e2e, view, clients) == ROUNDS * len(clients)
    for r in view["rounds"]:  # each round's model is stored
        e2e.cli.model_get(r["model_id"], e2e.tmp / f"out-{r['round_id']}.npz")
    assert_survived(clients)
    assert_no_tracebacks(cluster)
    assert_no_crossslot(cluster)
    trouble = redis_trouble(cluster)
    print(
        f"{what}; {len(tasks)} tasks delivered once; retried Redis calls per process "
        f"{ {k: trouble[k] - trouble_before.get(k, 0) for k in trouble} }; SendModelMetric: "
        f"{len(sender.acked)} answered OK, {len(lost)} of them lost, refused {sender.refused}"
    )
    return sender, lost


@pytest.mark.parametrize(
    ("mode", "durability"), [("poll", "local"), ("stream", "local"), ("stream", "replicated")]
)
def test_kill_9_of_a_cluster_primary_mid_session(system, mode, durability):
    """SIGKILL the primary that holds the held client's partition: its replica takes over,
    the session completes exactly, nothing died; with --durability replicated no
    SendModelMetric answered OK is missing."""
    topology, _, e2e = system

    def kill(release_held, check):
        keys = Keys(e2e.prefix, DEFAULT_CLUSTER)
        held = e2e.clients[0].client_id
        victim = topology.primary_for_slot(topology.slot_of(keys.client(held)))
        started = time.monotonic()
        done: list = []
        killer = threading.Thread(target=lambda: done.append(topology.kill_primary(victim)))
        killer.start()
        release_held()  # its update goes out while its partition has no primary
        while killer.is_alive():
            check()
            killer.join(0.1)
        assert done, "no replica took over"
        took = time.monotonic() - started
        return (
            f"{durability}: primary {victim.port} killed, {done[0].port} took over in {took:.2f} s"
        )

    _, lost = run_session_through(system, mode, kill)
    if durability == "replicated":
        assert lost == []


@pytest.mark.parametrize("mode", ["poll", "stream"])
def test_reshard_of_1000_slots_mid_session(system, mode):
    """Move 1,000 slots between primaries while round 2 is collecting, among them the slot
    of the held client's partition (its keys, its queue and its wake-up channel; the
    metrics go there too): the session completes exactly and no acknowledged metric is
    lost."""
    topology, _, e2e = system
    owners_before = partition_owners(topology, e2e.prefix)
    keys = Keys(e2e.prefix, DEFAULT_CLUSTER)

    def reshard(release_held, check):
        held = keys.partition_of(e2e.clients[0].client_id)
        slot = topology.slot_of(keys.clients(held))
        source = topology.primary_for_slot(slot)
        target = next(p for p in topology.primaries() if p is not source)
        owned = sorted(myself(source)["slots"])
        at = max(0, min(owned.index(slot) - RESHARD_SLOTS // 2, len(owned) - RESHARD_SLOTS))
        slots = owned[at:][:RESHARD_SLOTS]  # 1,000 of the source's slots, that one among them
        failed: list[BaseException] = []

        def move():
            try:
                topology.move_slots(source, target, slots)
            except BaseException as exc:  # said below, not lost with the thread
                failed.append(exc)

        started = time.monotonic()
        mover = threading.Thread(target=move, daemon=True)
        mover.start()
        release_held()
        while mover.is_alive():
            check()
            mover.join(0.1)
        took = time.monotonic() - started
        assert not failed, failed
        moved = [
            p for p, port in partition_owners(topology, e2e.prefix).items()
            if port != owners_before[p]
        ]  # fmt: skip
        assert held in moved, f"the held client's partition {held} did not move: {moved}"
        return f"{RESHARD_SLOTS} slots resharded in {took:.2f} s, partitions {moved} moved"

    _, lost = run_session_through(system, mode, reshard)
    assert lost == []  # MIGRATE moves keys whole: a reshard loses nothing acknowledged
