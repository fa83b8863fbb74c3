"""Announce against a real replica and Redis (docs/protocol.md §2, §4.1, §13.2)."""

from __future__ import annotations

import json

import pytest

from combiner import __version__
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta
from tests.services import inbound_entries

pytestmark = pytest.mark.topologies


async def announce(stubs, kind: str, parameters: str = "", client_id: str = "c1"):
    request = pb.ClientAnnounceRequest(client_id=client_id, type=kind, parameters=parameters)
    return await stubs.combiner.Announce(request, metadata=meta(client_id, "Carla"))


async def presence_events(broker) -> list[tuple[str, str]]:
    out = []
    for _, fields in await inbound_entries(broker, "presence"):
        out.append((fields[b"client_id"].decode(), fields[b"event"].decode()))
    return out


async def test_version_check_accepts_the_1x_client(stubs, broker):
    reply = await announce(stubs, "VersionCheck", json.dumps({"client-version": "1.0.0"}))
    params = json.loads(reply.parameters)
    assert params == {"success": True, "version": __version__}
    assert "c1" in await broker.presence.online()


async def test_version_check_refuses_another_major_version(stubs):
    reply = await announce(stubs, "VersionCheck", json.dumps({"client-version": "2.0.0"}))
    params = json.loads(reply.parameters)
    assert params["success"] is False and params["version"] == __version__
    assert "2.0.0" in reply.response  # the client logs this


async def test_version_check_with_bad_parameters_is_ok_but_unsuccessful(stubs):
    for parameters in ("{not json", "[1, 2]", '"1.0.0"', "", json.dumps({"other": 1})):
        reply = await announce(stubs, "VersionCheck", parameters)  # OK status, no exception
        assert json.loads(reply.parameters)["success"] is False, parameters


async def test_connect_marks_online_and_disconnect_offline_at_once(stubs, broker):
    await announce(stubs, "Connect")
    assert await broker.presence.online() == ["c1"]
    record = await broker.presence.client("c1")
    assert record["status"] == "online" and record["name"] == "Carla"
    assert record["connected_at"]

    await announce(stubs, "Disconnect")
    assert await broker.presence.online() == []  # at once, not after offline_after
    record = await broker.presence.client("c1")
    assert record["status"] == "offline" and record["disconnected_at"]
    assert await presence_events(broker) == [("c1", "connect"), ("c1", "disconnect")]

    # a later contact brings the client back
    await stubs.combiner.PollAndReport(pb.ActivityReport(node_id="c1"), metadata=meta("c1"))
    assert await broker.presence.online() == ["c1"]


async def test_disconnect_only_affects_that_client(stubs, broker):
    await announce(stubs, "Connect", client_id="a")
    await announce(stubs, "Connect", client_id="b")
    await announce(stubs, "Disconnect", client_id="a")
    assert await broker.presence.online() == ["b"]


async def test_unknown_type_is_ok_and_empty(stubs, broker):
    for kind in ("Reconnect", "", "connect"):
        assert await announce(stubs, kind) == pb.Response()
    assert await presence_events(broker) == []
