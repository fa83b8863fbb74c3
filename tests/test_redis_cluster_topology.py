"""tests/redis_cluster.py makes a real Redis Cluster: redis-py's RedisCluster writes to every
primary, a replica takes over from a killed primary, and a reshard moves slots and keys."""

from __future__ import annotations

import shutil

import pytest
from redis.cluster import RedisCluster
from redis.exceptions import MovedError

from tests.redis_cluster import ClusterTopology, myself

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server or redis-cli missing",
)


def cluster_client(topology: ClusterTopology) -> RedisCluster:
    return RedisCluster(
        host="127.0.0.1", port=topology.nodes[0].port, decode_responses=True, socket_timeout=2
    )


def keys_by_primary(topology: ClusterTopology, count: int = 60) -> dict[int, list[str]]:
    """{primary port: keys whose slot it owns}, over key0..key{count-1}."""
    owner = {}
    for node in topology.primaries():
        for slot in myself(node)["slots"]:
            owner[slot] = node.port
    found: dict[int, list[str]] = {}
    for i in range(count):
        key = f"key{i}"
        found.setdefault(owner[ClusterTopology.slot_of(key)], []).append(key)
    return found


def test_three_primaries_take_writes_on_every_primary():
    with ClusterTopology(primaries=3) as topology:
        assert len(topology.primaries()) == 3
        assert topology.url == f"redis://127.0.0.1:{topology.nodes[0].port}"
        assert topology.urls[0] == topology.url and len(topology.urls) == 3
        by_primary = keys_by_primary(topology)
        assert len(by_primary) == 3  # the keys spread over all three
        client = cluster_client(topology)
        try:
            for keys in by_primary.values():
                for key in keys:
                    assert client.set(key, f"v-{key}")
            for port, keys in by_primary.items():
                # each key is stored on the primary that owns its slot, nowhere else
                direct = topology.node_at(port).client()
                try:
                    assert direct.mget(keys[:1]) == [f"v-{keys[0]}"]
                    assert topology.primary_for_slot(topology.slot_of(keys[0])).port == port
                    assert all(client.get(k) == f"v-{k}" for k in keys)
                finally:
                    direct.close()
        finally:
            client.close()


def test_a_replica_takes_over_a_killed_primary():
    with ClusterTopology(primaries=3, replicas=1) as topology:
        assert len(topology.nodes) == 6 and len(topology.primaries()) == 3
        key = "before-the-kill"
        slot = topology.slot_of(key)
        old = topology.primary_for_slot(slot)
        client = cluster_client(topology)
        try:
            client.set(key, "1")  # may be lost: replication is asynchronous
            new = topology.kill_primary(old)
            assert not old.running() and new is not old
            assert topology.primary_for_slot(slot) is new
            assert new.call("ROLE")[0] == "master"
            # the same client finds the new owner (MOVED / a refresh) and writes go on
            for i in range(20):
                assert client.set(f"{{{key}}}:after{i}", str(i))
            assert client.get(f"{{{key}}}:after19") == "19"
            direct = new.client()
            try:
                assert direct.get(f"{{{key}}}:after0") == "0"  # it landed on the new primary
            finally:
                direct.close()
        finally:
            client.close()


@pytest.mark.parametrize("how", ["redis-cli", "chosen slots"])
def test_reshard_moves_slots_and_their_keys(how):
    with ClusterTopology(primaries=3) as topology:
        source, target = topology.primaries()[:2]
        before = myself(source)["slots"]
        keys = [f"k{i}" for i in range(2000)]
        client = cluster_client(topology)
        try:
            pipe = client.pipeline()
            for key in keys:
                pipe.set(key, key)
            pipe.execute()

            if how == "redis-cli":
                topology.reshard(source, target, 100)
            else:  # from the middle of its range: not the slots redis-cli would pick
                owned = sorted(before)
                chosen = owned[len(owned) // 2 :][:100]
                topology.move_slots(source, target, chosen)
            moved = before - myself(source)["slots"]
            assert len(moved) == 100 and moved <= myself(target)["slots"]
            if how == "chosen slots":
                assert moved == set(chosen)
            # every node agrees, in CLUSTER SLOTS, that the target owns the moved slots
            for node in topology.nodes:
                for low, high, primary, *_ in node.call("CLUSTER", "SLOTS"):
                    if moved & set(range(low, high + 1)):
                        assert primary[1] == target.port
            in_moved = [k for k in keys if topology.slot_of(k) in moved]
            assert in_moved  # ~12 of 2000 keys hash into 100 slots
            for key in in_moved:
                assert topology.primary_for_slot(topology.slot_of(key)) is target
                assert client.get(key) == key  # redis-py follows the MOVED
            direct = target.client()
            try:
                assert direct.get(in_moved[0]) == in_moved[0]  # the key itself moved
            finally:
                direct.close()
            direct = source.client()
            try:  # and the source sends a client there
                with pytest.raises(MovedError, match=f"127.0.0.1:{target.port}$"):
                    direct.get(in_moved[0])
            finally:
                direct.close()
        finally:
            client.close()
