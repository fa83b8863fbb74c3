"""msgpack for nested or binary stream fields; everything scalar stays a plain string."""

from __future__ import annotations

import msgpack


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


# Stream fields that hold msgpack (nested maps); every other field is a UTF-8 string.
PACKED_FIELDS = ("metrics", "attributes", "telemetries")


def encode_entry(fields: dict) -> dict:
    """A stream entry as Redis stores it: PACKED_FIELDS msgpack-packed (bytes there count
    as packed already), the rest as given (scalars; redis-py writes them as strings)."""
    out = {}
    for key, value in fields.items():
        if key in PACKED_FIELDS and not isinstance(value, bytes):
            out[key] = pack(value)
        elif isinstance(value, dict | list):
            raise TypeError(f"stream field {key!r} is not one of the msgpack fields")
        else:
            out[key] = value
    return out


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
