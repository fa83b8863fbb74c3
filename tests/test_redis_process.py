"""The one redis-server launcher (broker/redis_process.py) and the embedded Redis built on it:
a real server that answers, stops by PID and leaves no process; restarts on the same port and
data; never blocks the event loop; fails fast and clearly on a taken port or a bad option."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time

import pytest
import redis

from broker.embedded import EmbeddedRedis
from broker.redis_process import RedisProcess, RedisStartError, answers

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def gone(pid: int) -> bool:
    """No such process (our children are reaped by stop/kill, so not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_starts_answers_and_stops_by_pid(tmp_path):
    with RedisProcess(tmp_path / "data") as server:
        pid = server.pid
        assert answers(server.url)
        assert redis.Redis.from_url(server.url).info("server")["process_id"] == pid
    assert gone(pid) and not answers(server.url)
    assert (tmp_path / "data" / "redis.log").exists()  # a given data folder is kept


def test_a_temporary_data_folder_is_removed_on_close():
    with RedisProcess() as server:
        folder = server.dir
        assert folder.is_dir()
    assert not folder.exists()


def test_restart_after_sigkill_keeps_port_and_appendonly_data(tmp_path):
    server = RedisProcess(tmp_path, appendonly=True, appendfsync="always").start()
    try:
        redis.Redis.from_url(server.url).set("k", "v")
        pid, port = server.pid, server.port
        server.kill()
        assert gone(pid)
        server.start()
        assert server.port == port and server.pid != pid
        assert redis.Redis.from_url(server.url).get("k") == b"v"  # replayed from the AOF
    finally:
        server.close()
    assert gone(server.pid)


def test_extra_options_reach_the_server(tmp_path):
    with RedisProcess(tmp_path, options={"maxmemory": "12345678"}) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory") == {"maxmemory": "12345678"}


def test_a_taken_port_is_a_clear_error_not_a_reuse(tmp_path):
    with RedisProcess(tmp_path / "a") as first:
        second = RedisProcess(tmp_path / "b", port=first.port, start_timeout=30)
        began = time.monotonic()
        with pytest.raises(RedisStartError, match=r"(?i)address already in use"):
            second.start()
        assert time.monotonic() - began < 10  # it exits at once: no wait for the deadline
        assert gone(second.pid)
        assert answers(first.url)


def test_a_bad_option_is_a_clear_error(tmp_path):
    server = RedisProcess(tmp_path, options={"no-such-directive": "1"}, start_timeout=30)
    began = time.monotonic()
    with pytest.raises(RedisStartError, match="no-such-directive"):
        server.start()
    assert time.monotonic() - began < 10
    assert gone(server.pid)


def slow_readiness(monkeypatch, seconds: float) -> None:
    """Make the server look not ready for a while, so a blocked loop would show."""
    real = RedisProcess._is_ours
    until = time.monotonic() + seconds

    def is_ours(self, client):
        return time.monotonic() > until and real(self, client)

    monkeypatch.setattr(RedisProcess, "_is_ours", is_ours)


async def test_async_with_does_not_block_the_event_loop(tmp_path, monkeypatch):
    slow_readiness(monkeypatch, 0.5)
    wakeups = []

    async def tick():
        while True:
            wakeups.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    began = time.monotonic()
    try:
        async with RedisProcess(tmp_path) as server:
            assert time.monotonic() - began >= 0.5
            assert answers(server.url)
            pid = server.pid
    finally:
        ticker.cancel()
    gaps = [b - a for a, b in itertools.pairwise(wakeups)]
    assert len(wakeups) > 10 and max(gaps) < 0.25, max(gaps)
    assert gone(pid)


async def test_cancelled_while_starting_leaves_no_process(tmp_path, monkeypatch):
    slow_readiness(monkeypatch, 0.5)
    server = RedisProcess(tmp_path)

    async def use():
        async with server:
            await asyncio.Event().wait()

    task = asyncio.create_task(use())
    deadline = time.monotonic() + 10
    while server.pid is None:  # the child exists, still "starting"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(server.pid)


async def test_embedded_redis_is_shared_through_its_state_folder(tmp_path):
    async with EmbeddedRedis(tmp_path) as url:
        url_file = tmp_path / "redis" / "redis.url"
        assert answers(url) and url_file.read_text().strip() == url
        async with EmbeddedRedis(tmp_path) as again:  # a second command reuses it...
            assert again == url
        assert answers(url)  # ...and does not stop what it did not start
    assert not answers(url) and not url_file.exists()
    assert any((tmp_path / "redis").rglob("*.aof"))


def test_embedded_redis_start_and_stop_stay(tmp_path):
    embedded = EmbeddedRedis(tmp_path)
    url = embedded.start()
    pid = embedded.process.pid
    assert answers(url)
    embedded.stop()
    assert gone(pid) and not (tmp_path / "redis" / "redis.url").exists()
