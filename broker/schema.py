"""The schema version: which layout of keys and values the keys under a prefix were written in.

One string key, ``P:schema`` (broker/keys.py), holds the version as a decimal integer. Every
process checks it when it connects (Broker.start, before anything else touches the prefix):

* absent: it is written with SET NX, so two processes starting at once on a fresh prefix
  agree on one value (each reads back what is stored, in the same round trip). A prefix
  written before this key existed holds version 1 keys (``P:clients`` shows it): refused.
* equal to SCHEMA_VERSION: fine.
* anything else (another version, not an integer, not a string): SchemaMismatch, and the
  process writes nothing else. The way out is to move the deployment to a fresh prefix
  (docs/operations.md, "Moving to a new schema version").

Read-only CLI commands connect the same way, so they refuse a mismatch too, and on a prefix
without the key they write it like any other process (one key; nothing else is written).

The number of partitions (broker/partitions.py) is part of the layout: ``P:partitions`` is
claimed the same way, in the same round trip, and whatever it holds wins over what a process
was started with (a process that asked for another number logs that and follows the
prefix). Version 2 introduced partitions; version 1 keys are refused.
"""

from __future__ import annotations

import re

import redis.exceptions as rex

from broker.errors import SchemaMismatch
from broker.keys import Keys

# Bump on any change of key names, key types or value encodings (a field renamed or
# re-encoded, a hash turned into a stream, ...) that code of the previous version would
# misread, and describe the move in docs/operations.md. Adding a key or a field that old
# code simply ignores needs no bump.
SCHEMA_VERSION = 2

_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}\Z")

MOVE_HINT = (
    "drain this deployment, export the models you keep with `combiner model get ID -o FILE` "
    "(run by the combiner version that wrote them), and import them into a fresh --prefix "
    "with `combiner model put FILE --id ID`; see docs/operations.md "
    "'Moving to a new schema version'"
)


async def claim(redis, keys: Keys, partitions: int) -> int:
    """Check the prefix's schema version, writing it (and ``partitions``) on a fresh prefix;
    returns the partition count in force. One round trip when the prefix is in use, two on
    a fresh one. Raises SchemaMismatch, having written nothing, for keys of another layout:
    another version, a key that holds no version, or (no version key at all) keys that
    version 1 wrote before the key existed."""
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.schema)
    pipe.get(keys.partition_count)
    pipe.exists(keys.version_1_marker)
    found, count, legacy = _replies(keys, await pipe.execute(raise_on_error=False))
    if found is None and legacy:
        raise mismatch(keys, f"no version, and {keys.version_1_marker} of version 1's layout")
    check(keys, found)
    if found is None or count is None:
        pipe = redis.pipeline(transaction=False)
        pipe.set(keys.schema, SCHEMA_VERSION, nx=True)
        pipe.get(keys.schema)
        pipe.set(keys.partition_count, partitions, nx=True)
        pipe.get(keys.partition_count)
        _, found, _, count = _replies(keys, await pipe.execute(raise_on_error=False))
        check(keys, found)  # another version's first connect may have won the race
    if count is None:  # deleted in between (a FLUSHDB): nothing to misread
        return partitions
    try:
        return int(count)
    except ValueError:
        raise mismatch(keys, f"{keys.partition_count} = {count[:40]!r}") from None


def _replies(keys: Keys, replies: list) -> list:
    for reply in replies:
        if isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE"):
            raise mismatch(keys, "a key that is not a string")
        if isinstance(reply, Exception):
            raise reply  # anything else (LOADING, NOPERM, ...): as from any other call
    return replies


def check(keys: Keys, found: bytes | None) -> None:
    """Raise SchemaMismatch unless found (what P:schema holds) is this code's version."""
    if found is None:  # deleted between the SET NX and the GET (a FLUSHDB): nothing to misread
        return
    value = found.decode(errors="replace") if isinstance(found, bytes) else str(found)
    if not _VERSION_RE.match(value):
        raise mismatch(keys, f"{value[:40]!r}, which is not a schema version")
    if int(value) != SCHEMA_VERSION:
        raise mismatch(keys, f"schema version {int(value)}")


def mismatch(keys: Keys, found: str) -> SchemaMismatch:
    return SchemaMismatch(
        f"the Redis keys under prefix {keys.prefix!r} are not of this combiner's schema "
        f"version: {keys.schema} holds {found}, this combiner expects schema version "
        f"{SCHEMA_VERSION} and will not run against them. To move them: {MOVE_HINT}"
    )
