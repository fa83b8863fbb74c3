"""Coalesce concurrent callers' Redis commands into one pipeline round trip.

An unpipelined round trip costs about as much as the whole budget of a 4,000 RPS process
(docs/architecture.md contract 5). Each caller hands a ``build(pipe)`` function that queues its
commands and returns a parser for their replies; callers arriving in the same event-loop
turn, or while earlier batches are in flight, share one MULTI/EXEC. MULTI/EXEC makes a
batch all-or-nothing when the connection drops, so no RPC is half-written.

On a Redis Cluster a transaction cannot span slots, so a batch goes as a plain pipeline
(``atomic=False``; redis-py sends one per node). Each caller's commands are then applied
one by one: every hot path's write is one script, or commands that are harmless twice, so
a batch retried after a dropped connection may store a message twice (at least once, as
after a client's own retry) but never half of a script.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import redis.exceptions as rex
from redis.asyncio.cluster import ClusterPipeline, PipelineCommand

from broker.errors import BrokerUnavailable
from broker.retry import RetryPolicy, transient
from broker.scripts import Scripts

Build = Callable[[Any], Callable[[list], Any] | None]


class Batcher:
    def __init__(
        self,
        redis,
        scripts: Scripts,
        policy: RetryPolicy,
        # One pipeline in flight: RPCs arriving meanwhile share the next one. Measured here,
        # 1 gives more RPS and fewer round trips per RPC than 2 or 4.
        max_inflight: int = 1,
        max_batch: int = 1000,
        window: float = 0.0,
        atomic: bool = True,
    ) -> None:
        self._redis = redis
        self._atomic = atomic
        self._scripts = scripts
        self._policy = policy
        self._max_batch = max_batch
        # Seconds the first caller of a batch waits for others to join it: fewer, fuller
        # pipelines (less CPU per RPC) for that much latency. Adaptive: only after a batch
        # that had company; a lone caller (an idle replica) goes at once, and under load
        # callers pile up behind the pipeline in flight, which turns the window back on.
        self._window = window
        self._last_batch = 0
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: list[tuple[Build, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        # Every call's deadline, in arrival order (one max_seconds for all, so also in
        # deadline order), and the one timer that enforces the earliest: cheaper per call
        # than an asyncio.timeout each (a timer handle pushed and cancelled per RPC).
        self._deadlines: collections.deque[tuple[float, asyncio.Future]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.round_trips = 0  # pipelines sent, for metrics and benchmarks
        self.calls = 0

    async def submit(self, build: Build) -> Any:
        fut = self._enqueue(build)
        if len(self._pending) == 1:
            if self._window and self._last_batch > 1:
                asyncio.get_running_loop().call_later(self._window, self._spawn)
            else:
                self._spawn()
        return await fut

    def submit_many(self, builds: list[Build]) -> list[asyncio.Future]:
        """Queue many calls at once, with no coroutine per call and no window to wait
        for (the batch is already here); await the returned futures."""
        futures = [self._enqueue(build) for build in builds]
        if self._pending:
            self._spawn()
        return futures

    def _enqueue(self, build: Build) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((build, fut))
        self.calls += 1
        # The caller's own deadline (docs/operations.md "Redis time per call"): queued
        # behind a pipeline that hangs, it must not wait for that one's deadline and then
        # its own. Its future fails with BrokerUnavailable then; a failed or cancelled
        # future is skipped when the next pipeline is built.
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():  # answered: forget (amortised O(1))
            deadlines.popleft()
        deadlines.append((loop.time() + self._policy.max_seconds, fut))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadlines[0][0], self._expire)
        if len(self._pending) % self._max_batch == 0:
            self._spawn()
        return fut

    def _expire(self) -> None:
        """Fail every call past its deadline; re-arm for the next one still waiting."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now, deadlines = loop.time(), self._deadlines
        while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
            _, fut = deadlines.popleft()
            if not fut.done():
                fut.set_exception(
                    BrokerUnavailable(f"redis did not answer within {self._policy.max_seconds:g}s")
                )
        if deadlines:
            self._watchdog = loop.call_at(deadlines[0][0], self._expire)

    async def flush(self) -> None:
        """Wait until every submitted call has been sent (before closing the client)."""
        while self._pending or self._tasks:
            if self._pending and not self._tasks:
                self._spawn()  # a batch still inside its window
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self) -> None:
        task = asyncio.create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        async with self._slots:
            # Take the batch only once a slot is free: callers pile up meanwhile.
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._last_batch = len(batch)
            if self._pending:
                self._spawn()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[Build, asyncio.Future]]) -> None:
        try:
            leftovers = await self._send(self._build(batch))
            if leftovers:  # NOSCRIPT: Redis lost its script cache; load and run those again
                await self._policy.run(self._scripts.load, self._redis)
                leftovers = await self._send(self._build(leftovers))
            for _, fut in leftovers:
                if not fut.done():
                    fut.set_exception(RuntimeError("lua scripts missing after reload"))
        except BaseException as exc:  # BrokerUnavailable, or cancellation
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _build(self, batch):
        """Queue each caller's commands once. A retry after a connection error re-sends
        them rather than building again: builds have side effects (the presence throttle
        remembers a queued write, so a second build would silently drop it)."""
        pipe = self._redis.pipeline(transaction=self._atomic)
        spans = []
        for build, fut in batch:
            if fut.done():
                continue
            queue = _queue(pipe)
            start = len(queue)
            try:
                parse = build(pipe)
            except Exception as exc:
                del queue[start:]
                fut.set_exception(exc)
                continue
            spans.append((build, fut, start, len(queue), parse))
        return [_command(c) for c in _queue(pipe)], spans

    async def _send(self, built) -> list:
        """Execute built with the bounded retries; returns the callers that met NOSCRIPT."""
        state = [built, []]
        await self._policy.run(self._execute, state)
        return state[1]

    async def _execute(self, state: list) -> None:
        """Send state[0] (commands, spans) once; callers that met NOSCRIPT join state[1].
        On a Cluster, a node that goes away fails only its own commands (the reply holds
        the error; the other nodes' commands were applied): state[0] becomes the affected
        callers' commands alone and the error is raised, so the retry re-sends those and
        nothing twice."""
        commands, spans = state[0]
        if not spans:
            return
        pipe = self._redis.pipeline(transaction=self._atomic)
        # redis-py may pop per-command options while parsing: each attempt gets copies
        for args, options in commands:
            pipe.execute_command(*args, **dict(options))
        self.round_trips += 1
        try:
            results = await pipe.execute(raise_on_error=False)
        finally:
            await pipe.reset()
        retry_scripts, resend, trouble = state[1], [], None
        for span in spans:
            build, fut, start, end, parse = span
            if fut.done():  # the caller went away (e.g. its RPC was cancelled) meanwhile
                continue
            mine = results[start:end]
            if any(isinstance(r, rex.NoScriptError) for r in mine):
                retry_scripts.append((build, fut))
                continue
            failed = next((r for r in mine if isinstance(r, Exception) and transient(r)), None)
            if failed is not None:
                resend.append(span)
                trouble = failed
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                fut.set_exception(error)
                continue
            try:
                fut.set_result(parse(mine) if callable(parse) else mine)
            except Exception as exc:
                fut.set_exception(exc)
        if resend:
            state[0] = _only(commands, resend)
            raise trouble


def _only(commands: list, spans: list) -> tuple[list, list]:
    """The commands of these callers alone, and their spans in that shorter list."""
    out, kept = [], []
    for build, fut, start, end, parse in spans:
        kept.append((build, fut, len(out), len(out) + end - start, parse))
        out += commands[start:end]
    return out, kept


def _queue(pipe) -> list:
    """The list of commands a pipeline has queued (redis-py keeps it elsewhere in its
    cluster pipeline, as PipelineCommand objects)."""
    if isinstance(pipe, ClusterPipeline):
        return pipe._execution_strategy._command_queue
    return pipe.command_stack


def _command(queued) -> tuple[tuple, dict]:
    """(args, options) of one queued command."""
    if isinstance(queued, PipelineCommand):
        return queued.args, queued.kwargs
    return queued
