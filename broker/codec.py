"""msgpack for nested or binary stream fields; everything scalar stays a plain string."""

from __future__ import annotations

import msgpack


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


# Stream fields that hold msgpack (nested maps); every other field is a UTF-8 string.
PACKED_FIELDS = ("metrics", "attributes", "telemetries")


def decode_entry(fields: dict) -> dict:
    """A stream entry as Python values: msgpack fields unpacked, the rest as str."""
    out = {}
    for key, value in fields.items():
        key = key.decode() if isinstance(key, bytes) else key
        if key in PACKED_FIELDS and isinstance(value, bytes):
            try:
                out[key] = unpack(value)
                continue
            except Exception:
                pass
        out[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return out
