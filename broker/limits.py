"""Size limits on what clients and operators send, in one place (docs/operations.md,
"Input limits"). The broker checks them before it writes anything, for every caller: the
servicers, `combiner task push`, the workers. A value over its limit raises InvalidInput,
which the RPC answers with INVALID_ARGUMENT (the 1.0.0 client does not retry it).

Sizes are bytes of UTF-8. The 1.0.0 client sends uuid4 ids (36 bytes), small JSON in an
update's `meta` and a validation's `data` (a dict of metrics), and short status texts, so
these leave room for far larger real use and still keep one message's Redis footprint
bounded. Model ids have a stricter rule of their own (broker/models.py: they are file names).
"""

from __future__ import annotations

from broker.errors import InvalidInput

ID_BYTES = 256  # client, correlation, model, session and round ids; the client's name
LABEL_BYTES = 256  # short names: report status, status type, metric/attribute/telemetry keys
TEXT_BYTES = 64 * 1024  # status text, attribute values, Announce parameters
DATA_BYTES = 1024 * 1024  # result data, update meta and config, report response, task data

# Limits of the string fields of stored messages and tasks, by field name.
FIELD_BYTES = {
    "correlation_id": ID_BYTES,
    "model_id": ID_BYTES,
    "model_update_id": ID_BYTES,
    "session_id": ID_BYTES,
    "round_id": ID_BYTES,
    "type": LABEL_BYTES,
    "log_level": LABEL_BYTES,
    "step": LABEL_BYTES,
    "timestamp": LABEL_BYTES,
    "status": TEXT_BYTES,
    "data": DATA_BYTES,
    "meta": DATA_BYTES,
    "config": DATA_BYTES,
    "result": DATA_BYTES,
    "result_meta": DATA_BYTES,
}
# Nested maps (metrics, attributes, telemetries): keys are labels, string values text.
MAP_KEY_BYTES = LABEL_BYTES
MAP_VALUE_BYTES = TEXT_BYTES


def fits(value: str, limit: int) -> bool:
    """Whether value is at most limit bytes in UTF-8. A character takes at most 4 bytes, so
    the usual short value is decided without encoding it (hot paths: polls, telemetry)."""
    n = len(value)
    if 4 * n <= limit:
        return True
    if n > limit:
        return False
    return len(value.encode("utf-8", "surrogatepass")) <= limit


def check(what: str, value: str, limit: int) -> None:
    if not fits(value, limit):
        raise InvalidInput(f"{what} is longer than {limit} bytes (UTF-8)")


def check_ids(**ids: str) -> None:
    """Each keyword's value as an id: check_ids(client_id=..., correlation_id=...)."""
    for what, value in ids.items():
        check(what.replace("_", " "), value, ID_BYTES)


def check_fields(fields: dict) -> None:
    """Every string field by FIELD_BYTES (unlisted ones as free text), nested maps by key
    and value. Numbers and bytes pass (the gRPC message limit bounds them)."""
    for name, value in fields.items():
        if isinstance(value, str):
            check(name.replace("_", " "), value, FIELD_BYTES.get(name, TEXT_BYTES))
        elif isinstance(value, dict):
            for k, v in value.items():
                check(f"a {name} key", str(k), MAP_KEY_BYTES)
                if isinstance(v, str):
                    check(f"the value of {name} {str(k)[:40]!r}", v, MAP_VALUE_BYTES)
