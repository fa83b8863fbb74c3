"""The command pool's connection: redis-py's asyncio Connection with commands packed in C and
a write deadline that never swallows a cancellation.

redis-py's synchronous client packs commands with hiredis; its asyncio client does it in
Python, argument by argument, and on a replica's hot pipelines (a dozen arguments per Lua
call, a few calls per pipeline) that was about a third of redis-py's CPU. hiredis (already
a dependency: it parses the replies) packs the same bytes in one C call. Large binary
arguments (model chunks) keep redis-py's path, which sends them without copying.
"""

from __future__ import annotations

import asyncio

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Below this an argument is copied into one buffer; redis-py sends larger ones on their own.
_COPY_BELOW = 6000


class HiredisPacking:
    """A mixin for redis.asyncio connection classes (TCP, TLS, unix socket)."""

    def pack_command(self, *args) -> list[bytes]:
        if any(
            isinstance(a, memoryview)
            or (isinstance(a, (bytes, bytearray)) and len(a) >= _COPY_BELOW)
            for a in args
        ):
            return super().pack_command(*args)
        if isinstance(args[0], str) and " " in args[0]:  # 'CONFIG GET' and the like
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


class CancelSafeSend:
    """A mixin: redis-py writes every command inside ``asyncio.wait_for(..., socket_timeout)``,
    and on Python 3.11 wait_for returns normally when its caller is cancelled in the loop turn
    the write finishes (fixed in 3.12). Measured here under load, about one cancelled Redis
    call in ten carried on as if never cancelled, so a task stopped with cancel() kept
    running (a replica's upkeep loop then hung its stop for ever). Same deadline, with
    asyncio.timeout, which cannot lose a cancellation."""

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        timeout, self.socket_timeout = self.socket_timeout, None  # no wait_for inside
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


def with_hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    bases = (CancelSafeSend, HiredisPacking, connection_class)
    return type(f"Hiredis{connection_class.__name__}", bases, {})
