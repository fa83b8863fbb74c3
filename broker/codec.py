"""msgpack for nested or binary stream fields; everything scalar stays a plain string."""

from __future__ import annotations

import msgpack


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)
