"""The order in which poll.lua and stream_take.lua return a task's fields is WIRE_FIELDS
(broker/records.py): read from the scripts, and checked end to end with a distinct value in
every field."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from broker.records import WIRE_FIELDS, Task

pytestmark = pytest.mark.topologies

SCRIPTS = ("poll", "stream_take")


def script(name: str) -> str:
    return (resources.files("broker") / "lua" / f"{name}.lua").read_text()


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_scripts_read_the_task_fields_in_wire_order(name):
    source = script(name)
    reads = re.findall(r"'HMGET',\s*tkey,((?:\s*'[a-z_]+',?)+)\)", source)
    assert len(reads) == 1, f"{name}.lua should read a task's wire fields with one HMGET"
    assert tuple(re.findall(r"'([a-z_]+)'", reads[0])) == WIRE_FIELDS
    if name == "poll":  # {'task', f[1], ..., f[n]}
        returned = re.search(r"return \{'task', ((?:f\[\d+\],?\s*)+)\}", source)
        assert returned, "poll.lua's task reply not found"
        assert re.findall(r"f\[(\d+)\]", returned.group(1)) == [
            str(i) for i in range(1, len(WIRE_FIELDS) + 1)
        ]
    else:  # for i = 1, n do out[#out + 1] = f[i] end
        assert re.search(rf"for i = 1, {len(WIRE_FIELDS)} do out\[#out \+ 1\] = f\[i\] end", source)


async def _push_distinct(broker, client_id: str) -> str:
    return await broker.tasks.push(
        client_id,
        "Custom_wire",
        model_id=f"model-{client_id}",
        data=json.dumps({"for": client_id}),
        session_id=f"session-{client_id}",
        round_id=f"round-{client_id}",
        correlation_id=f"corr-{client_id}",
    )


async def _expected(broker, client_id: str) -> Task:
    stored = await broker.tasks.show(f"corr-{client_id}")
    assert stored["timestamp"]  # set by push; distinct from every other field
    return Task(
        correlation_id=f"corr-{client_id}",
        type="Custom_wire",
        client_id=client_id,
        model_id=f"model-{client_id}",
        data=json.dumps({"for": client_id}),
        session_id=f"session-{client_id}",
        round_id=f"round-{client_id}",
        timestamp=stored["timestamp"],
    )


async def test_poll_hands_out_every_field_in_its_place(broker):
    await _push_distinct(broker, "wire-poll")
    reply = await broker.tasks.poll("wire-poll")
    assert reply.task == await _expected(broker, "wire-poll")


async def test_stream_take_hands_out_every_field_in_its_place(broker):
    await _push_distinct(broker, "wire-stream")
    [task], more = await broker.tasks.take_for_stream("wire-stream")
    assert not more
    assert task == await _expected(broker, "wire-stream")
