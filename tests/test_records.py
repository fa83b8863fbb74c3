"""Typed records (broker/records.py): one hash layout each, states that are the stored
strings, and the same list of final task states as poll.lua."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from broker.records import (
    FINAL_TASK_STATES,
    ReplicaRecord,
    RoundRecord,
    RoundStatus,
    SessionRecord,
    SessionStatus,
    TaskRecord,
    TaskState,
)


def test_states_are_the_strings_redis_holds():
    assert TaskState.QUEUED == "queued" and f"{SessionStatus.RUNNING}" == "running"
    assert {"completed", "lost"} <= FINAL_TASK_STATES and "running" not in FINAL_TASK_STATES
    assert RoundStatus("aggregating") is RoundStatus.AGGREGATING


def test_final_task_states_match_poll_lua():
    source = (resources.files("broker") / "lua" / "poll.lua").read_text()
    final = re.search(r"local final = \{([^}]*)\}", source).group(1)
    assert set(re.findall(r"(\w+) = true", final)) == {str(s) for s in FINAL_TASK_STATES}


def test_session_record_round_trips_its_hash():
    record = SessionRecord(
        id="s", status=SessionStatus.RUNNING, config={"rounds": 3}, model_id="m", current_round="2"
    )
    raw = record.to_hash()
    assert raw["config"] == '{"rounds": 3}' and raw["status"] == "running"
    assert all(isinstance(v, str) for v in raw.values())
    again = SessionRecord.from_hash(raw)
    assert again == record and again.active and again.rounds == 3 and again.round_number == 2


def test_records_ignore_unknown_fields_and_refuse_to_write_them():
    rnd = RoundRecord.from_hash({"status": "done", "clients": '["a", "b"]', "someday": "x"})
    assert rnd.client_ids == ["a", "b"] and rnd.update_count == 0
    assert RoundRecord.partial_hash(status=RoundStatus.DONE, updates=2) == {
        "status": "done",
        "updates": "2",
    }
    with pytest.raises(ValueError, match="no field"):
        RoundRecord.partial_hash(stauts="done")


def test_task_and_replica_records():
    task = TaskRecord.from_hash({"state": "queued", "attempts": "2"})
    assert not task.settled and task.attempt_count == 2
    assert TaskRecord.from_hash({"state": "running", "result_at": "1.0"}).settled
    assert TaskRecord.from_hash({"state": "timeout"}).settled
    replica = ReplicaRecord.from_hash({"id": "r", "streams": "4", "clients": "7"})
    assert (replica.stream_count, replica.client_count) == (4, 7)
