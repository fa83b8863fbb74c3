"""The committed stubs are exactly what proto/generate.py makes from proto/scaleout.proto."""

from __future__ import annotations

import importlib.util
import pathlib

from combiner.pb import scaleout_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    load_generator().generate(tmp_path)
    for name in ("scaleout_pb2.py", "scaleout_pb2_grpc.py", "scaleout_pb2.pyi"):
        fresh = (tmp_path / "combiner" / "pb" / name).read_text()
        committed = (ROOT / "combiner" / "pb" / name).read_text()
        assert fresh == committed, f"combiner/pb/{name} is stale: run python proto/generate.py"


def test_wire_numbers_of_key_messages():
    """Spot checks against docs/protocol.md §0 (the e2e suite compares the full descriptor)."""
    fields = {f.name: f.number for f in pb.DESCRIPTOR.message_types_by_name["TaskRequest"].fields}
    assert fields == {
        "client_id": 1,
        "model_id": 3,
        "data": 4,
        "correlation_id": 5,
        "timestamp": 6,
        "session_id": 8,
        "round_id": 10,
        "type": 11,
        "status": 12,
    }
    assert pb.DESCRIPTOR.package == "scaleout"
    assert pb.DESCRIPTOR.message_types_by_name["ModelRequest"].fields[0].number == 3
    assert [s.name for s in pb.DESCRIPTOR.services_by_name.values()] == [
        "CombinerClient",
        "ModelService",
    ]
