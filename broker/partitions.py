"""Partitions: how the keys that many clients share are split so that no script spans two
Redis Cluster hash slots (docs/redis.md, "Partitions").

A client belongs to one of N partitions (``partition_of``). Its own keys and its partition's
shared keys (the last-seen index, the inbound streams, task references, the wake-up
channel) carry the partition's hash tag, so the poll, push and ingest scripts touch one
slot. N is fixed per prefix when the prefix is first used (broker/schema.py): 1 on a
standalone Redis or Sentinel, where slots do not matter, and DEFAULT_CLUSTER on a Cluster.

The tags are precomputed rather than ``{0}..{N-1}``: those hash to slots chosen by CRC16,
and with 16 partitions on 16 primaries half the primaries got none. Partition i's tag is
the first ``i.j`` (j = 0, 1, ...) whose slot falls in the i-th of N equal slot ranges, so N
partitions spread over the primaries as evenly as the slot ranges do (the same idea as
centrifuge's internal/redispartition).
"""

from __future__ import annotations

import functools
import zlib

from redis.crc import key_slot

SLOTS = 16384
MAX_PARTITIONS = 1024
DEFAULT_CLUSTER = 16


@functools.cache
def tags(n: int) -> tuple[str, ...]:
    """The hash tag (without braces) of each of n partitions."""
    if not 1 <= n <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1..{MAX_PARTITIONS}, got {n}")
    out = []
    for i in range(n):
        low, high = i * SLOTS // n, (i + 1) * SLOTS // n
        j = 0
        while not low <= key_slot(f"{i}.{j}".encode()) < high:
            j += 1
        out.append(f"{i}.{j}")
    return tuple(out)


def partition_of(client_id: str, n: int) -> int:
    """The partition of a client id (stable across processes and versions: CRC32)."""
    if n == 1:
        return 0
    return zlib.crc32(client_id.encode("utf-8", "surrogatepass")) % n
