"""An embedded Redis: a private ``redis-server`` child process, data under a state folder.

Used when no ``--redis-url`` is given, so a new user needs no setup. Processes that share
a state folder share its server: the first one starts it and writes its URL to
``<state>/redis/redis.url``; later ones find it answering there and reuse it. The server stops
with the process that started it (AOF keeps the data for the next start).

    url = EmbeddedRedis(state_dir).start()        # ... .stop()
    async with EmbeddedRedis(state_dir) as url:   # started off the event loop
        ...
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pathlib

from broker.redis_process import RedisProcess, answers, free_port, in_thread_or_undo

__all__ = ["EmbeddedRedis", "answers", "free_port"]  # free_port: tests import it from here


class EmbeddedRedis:
    def __init__(self, state_dir: str | os.PathLike, port: int | None = None) -> None:
        self.state_dir = pathlib.Path(state_dir).resolve() / "redis"
        self.port = port
        self.server: RedisProcess | None = None  # set only when we started it
        self.url = ""

    @property
    def process(self):
        return self.server.process if self.server else None

    def start(self, timeout: float = 10.0) -> str:
        """Start (or reuse) the server; returns its URL."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.state_dir / "redis.url"
        if url_file.exists():
            url = url_file.read_text().strip()
            if answers(url):
                self.url = url
                return url
        server = RedisProcess(self.state_dir, port=self.port, appendonly=True)
        try:
            server.start(timeout)
        except RuntimeError as exc:
            raise RuntimeError(
                f"no --redis-url given and the embedded Redis did not start: {exc}\n"
                "install Redis 7 (apt-get install redis-server) or pass --redis-url"
            ) from exc
        self.server, self.url = server, server.url
        url_file.write_text(server.url + "\n")
        atexit.register(self.stop)
        return server.url

    def stop(self) -> None:
        """Stop the server if we started it (a reused one belongs to its starter)."""
        server, self.server = self.server, None
        if server is None:
            return
        atexit.unregister(self.stop)
        server.stop()
        url_file = self.state_dir / "redis.url"
        if url_file.exists() and url_file.read_text().strip() == self.url:
            url_file.unlink()

    async def __aenter__(self) -> str:
        return await in_thread_or_undo(self.start, self.stop)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)
