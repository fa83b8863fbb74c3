"""Wire compatibility: our `scaleout` proto against the real client's, descriptor to descriptor.

The real scaleout 1.0.0 client runs in its own venv (docs/protocol.md §0: its descriptor cannot
share a process with ours), so its FileDescriptorProto is dumped there as JSON and compared
here, message by message, field by field, with combiner.pb.scaleout_pb2.DESCRIPTOR.
"""

from __future__ import annotations

import subprocess

import pytest
from google.protobuf import descriptor_pb2, json_format

from combiner.pb import scaleout_pb2
from tests.e2e.harness import clean_env

pytestmark = pytest.mark.e2e

DUMP = (
    "from google.protobuf import descriptor_pb2, json_format\n"
    "from scaleoututil.grpc import scaleout_pb2\n"
    "fdp = descriptor_pb2.FileDescriptorProto()\n"
    "scaleout_pb2.DESCRIPTOR.CopyToProto(fdp)\n"
    "print(json_format.MessageToJson(fdp))\n"
)

FIELD_ATTRS = ("number", "label", "type", "type_name", "oneof_index", "proto3_optional")
# The messages of docs/protocol.md §0's wire table.
SECTION_0 = {
    "Response", "Status", "ModelUpdate", "ModelValidation", "ModelPrediction", "ModelMetric",
    "MetricElem", "TelemetryElem", "AttributeElem", "AttributeMessage", "TelemetryMessage",
    "TaskRequest", "ActivityReport", "Heartbeat", "ClientAvailableMessage",
    "ClientAnnounceRequest", "ModelRequest", "FileChunk", "ModelResponse",
}  # fmt: skip
METHOD_ATTRS = ("input_type", "output_type", "client_streaming", "server_streaming")


def real_client_descriptor(client_python) -> descriptor_pb2.FileDescriptorProto:
    done = subprocess.run(
        [str(client_python), "-I", "-c", DUMP],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(python_vars=False),
    )
    assert done.returncode == 0, f"dumping the client's descriptor failed:\n{done.stderr}"
    return json_format.Parse(done.stdout, descriptor_pb2.FileDescriptorProto())


def our_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    scaleout_pb2.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def field_view(field) -> dict:
    view = {"name": field.name}
    for attr in FIELD_ATTRS:
        view[attr] = getattr(field, attr) if field.HasField(attr) else None
    return view


def enum_view(enum) -> dict:
    return {v.name: v.number for v in enum.value}


def messages(protos, scope: str = "") -> dict[str, dict]:
    """Every message, nested ones too, by full name: fields in declaration order, oneofs,
    nested enums."""
    out = {}
    for msg in protos:
        name = f"{scope}.{msg.name}" if scope else msg.name
        out[name] = {
            "fields": [field_view(f) for f in msg.field],
            "oneofs": [o.name for o in msg.oneof_decl],
            "enums": {e.name: enum_view(e) for e in msg.enum_type},
        }
        out.update(messages(msg.nested_type, name))
    return out


def services(fdp) -> dict[str, list[dict]]:
    return {
        s.name: [{"name": m.name, **{a: getattr(m, a) for a in METHOD_ATTRS}} for m in s.method]
        for s in fdp.service
    }


@pytest.fixture(scope="module")
def theirs(client_python):
    return real_client_descriptor(client_python)


@pytest.fixture(scope="module")
def ours():
    return our_descriptor()


def test_file_level(theirs, ours):
    assert theirs.name == "scaleoututil/grpc/scaleout.proto"  # docs/protocol.md §0
    assert ours.package == theirs.package == "scaleout"
    assert ours.syntax == theirs.syntax
    assert list(ours.dependency) == list(theirs.dependency)


def test_every_message_and_field(theirs, ours):
    want, got = messages(theirs.message_type), messages(ours.message_type)
    assert sorted(got) == sorted(want), "message names differ"
    for name, msg in want.items():
        assert got[name]["fields"] == msg["fields"], f"fields of message {name} differ"
        assert got[name]["oneofs"] == msg["oneofs"], f"oneofs of message {name} differ"
        assert got[name]["enums"] == msg["enums"], f"nested enums of message {name} differ"
    assert set(want) >= SECTION_0  # the comparison did cover the messages of §0


def test_every_enum(theirs, ours):
    want = {e.name: enum_view(e) for e in theirs.enum_type}
    assert {e.name: enum_view(e) for e in ours.enum_type} == want
    assert want["LogLevel"] == {
        "NONE": 0,
        "INFO": 1,
        "DEBUG": 2,
        "WARNING": 3,
        "ERROR": 4,
        "AUDIT": 5,
    }


def test_every_service_method(theirs, ours):
    want = services(theirs)
    assert services(ours) == want
    assert set(want) == {"CombinerClient", "ModelService"}
    streaming = {
        (s, m["name"]): (m["client_streaming"], m["server_streaming"])
        for s, methods in want.items()
        for m in methods
    }
    assert streaming[("ModelService", "Upload")] == (True, False)
    assert streaming[("ModelService", "Download")] == (False, True)
    assert streaming[("CombinerClient", "TaskStream")] == (False, True)
