"""An embedded Redis: a private ``redis-server`` child process, data under a state folder.

Used when no ``--redis-url`` is given, so a new user needs no setup. Processes that share
a state folder share its server: the first one starts it and writes its URL to
``<state>/redis/redis.url``; later ones find it answering there and reuse it. The server stops
with the process that started it (AOF keeps the data for the next start).
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Does a Redis answer PING at url?"""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


class EmbeddedRedis:
    def __init__(self, state_dir: str | os.PathLike, port: int | None = None) -> None:
        self.state_dir = pathlib.Path(state_dir).resolve() / "redis"
        self.port = port
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        """Start (or reuse) the server; returns its URL."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.state_dir / "redis.url"
        if url_file.exists():
            url = url_file.read_text().strip()
            if answers(url):
                self.url = url
                return url
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no --redis-url given and no redis-server on PATH for the embedded Redis; "
                "install Redis 7 (apt-get install redis-server) or pass --redis-url"
            )
        port = self.port or free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.state_dir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--logfile", str(self.state_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it ourselves
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while not answers(url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.state_dir / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"embedded redis-server did not start:\n{tail}")
            time.sleep(0.05)
        url_file.write_text(url + "\n")
        self.url = url
        atexit.register(self.stop)
        return url

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # redis-server saves and exits on SIGTERM
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        url_file = self.state_dir / "redis.url"
        if url_file.exists() and url_file.read_text().strip() == self.url:
            url_file.unlink()
