"""The session coordinator: drives sessions round by round (docs/protocol.md §8).

One worker drives a session at a time, holding a lease in Redis that it renews; if it
dies, the lease expires and another worker takes over. Every step writes its progress to
the round record before moving on, and every step is idempotent (correlation ids are
derived from session, round and client; the round's output model is set once), so the
new driver resumes where the last one stopped and reaches the same result.

A round: wait (bounded) for at least min_clients online clients; select up to
max_clients; push one Fedn_ModelUpdate per client; collect until every task has settled
(an update was kept, the task ended, or its client went offline) or the round times out;
FedAvg the kept updates; store the new global model; then, if validating, push
Fedn_Validation tasks for it and collect their results the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid

from broker import Broker, BrokerError, BrokerUnavailable, Conflict
from broker.records import RoundRecord, RoundStatus, SessionStatus, TaskRecord
from workers.aggregators import make_aggregator
from workers.fedavg import BadUpdate, StreamingMean, load_npz, release_large_buffers, save_npz
from workers.metrics import ROUND_SECONDS, ROUNDS
from workers.server_functions import Limits, Sandbox, ServerFunctionsError

log = logging.getLogger("workers.coordinator")

_NS = uuid.UUID("6f1c2a57-3f0e-4c52-9a51-2c3f7d1b9e10")


def correlation_id(session_id: str, round_id: str, kind: str, client_id: str) -> str:
    """The same task gets the same id on every attempt to push it (resume after a crash)."""
    return str(uuid.uuid5(_NS, f"{session_id}/{round_id}/{kind}/{client_id}"))


class RoundFailed(Exception):
    pass


class LeaseLost(Exception):
    pass


DEFAULTS = {
    "rounds": 1,
    "aggregator": "fedavg",  # workers/aggregators.py
    "aggregator_kwargs": {},
    "buffer_size": -1,  # > 0: the round's training ends once this many updates were kept
    "delete_models_storage": False,  # delete the round's client updates once aggregated
    "min_clients": 1,
    "max_clients": 100,
    "round_timeout": 180.0,
    "client_wait": None,  # seconds to wait for min_clients; default: round_timeout
    "validate": True,
    "client_settings": {},
}


def update_weight(result_meta: str) -> float | None:
    """An update's FedAvg weight, meta.training_metadata.num_examples (docs/protocol.md §4.6),
    or None when the meta does not give one. A client's meta is hostile input: JSON nested
    too deeply to parse (RecursionError) must reject the update, not stop the worker."""
    try:
        return float(json.loads(result_meta or "{}")["training_metadata"]["num_examples"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


class UserAggregate:
    """The session's own aggregate() (workers/server_functions.py): it is given every update
    at once, so they are held until result(); each is decoded first, so one client's bad
    update is rejected alone instead of failing the user's code."""

    def __init__(self, sandbox: Sandbox, previous: list) -> None:
        self.sandbox, self.previous = sandbox, previous
        self.updates: dict[str, tuple[bytes, dict]] = {}

    def add_update(self, client: str, data: bytes, result_meta: str) -> None:
        arrays = load_npz(data)
        if [a.shape for a in arrays] != [a.shape for a in self.previous]:
            raise BadUpdate("its arrays do not have the global model's shapes")
        meta = json.loads(result_meta or "{}").get("training_metadata", {})
        self.updates[client] = (bytes(data), meta if isinstance(meta, dict) else {})

    def result(self) -> list:
        return self.sandbox.aggregate(self.previous, self.updates)


class Coordinator:
    def __init__(
        self,
        broker: Broker,
        worker_id: str,
        lease_ttl: float = 10.0,
        poll_every: float = 0.5,
        server_functions: Limits | None = None,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self.poll_every = poll_every
        # None: this worker leaves sessions with server_functions to workers that opted in
        self.server_functions = server_functions
        self._sandboxes: dict[str, Sandbox] = {}  # session id -> its running user code
        self._declined: set[str] = set()
        release_large_buffers()  # aggregation handles model-sized buffers one after another

    async def run(self, stop: asyncio.Event) -> None:
        """Look for sessions to drive until stop is set."""
        while not stop.is_set():
            try:
                for session_id in await self.broker.sessions.active():
                    if stop.is_set():
                        break
                    if await self.broker.sessions.lease(
                        session_id, self.worker_id, "take", self.lease_ttl
                    ):
                        await self.drive_with_lease(session_id)
            except BrokerError as exc:
                log.warning("coordinator: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_every * 2):
                    await stop.wait()

    async def drive_with_lease(self, session_id: str) -> None:
        sessions = self.broker.sessions
        # The list of active sessions may be stale: the session may have ended (and its
        # lease been released) since. Then there is nothing to drive and no driver to log.
        record = await sessions.get(session_id)
        if record is None or not record.active:
            await sessions.lease(session_id, self.worker_id, "release", self.lease_ttl)
            return
        if record.config.get("server_functions") and self.server_functions is None:
            await sessions.lease(session_id, self.worker_id, "release", self.lease_ttl)
            if session_id not in self._declined:
                self._declined.add(session_id)
                log.warning("session %s has server_functions: left to a worker started with "
                            "--allow-server-functions", session_id)  # fmt: skip
            return
        await sessions.log_driver(session_id, self.worker_id)
        log.info("driving session %s", session_id)
        drive = asyncio.create_task(self.drive(session_id))

        async def renew():
            while not drive.done():
                await asyncio.sleep(self.lease_ttl / 3)
                try:
                    held = await sessions.lease(session_id, self.worker_id, "renew", self.lease_ttl)
                except BrokerError:
                    continue  # try again; the lease outlives a short Redis hiccup
                if not held:
                    log.error("lost the lease on session %s; stopping", session_id)
                    drive.cancel()
                    return

        renewer = asyncio.create_task(renew())
        try:
            await drive
        except asyncio.CancelledError:
            if not renewer.done():
                raise  # we are being stopped, not fenced off
        except BrokerError as exc:
            log.warning("session %s paused: %s", session_id, exc)
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await sessions.lease(session_id, self.worker_id, "release", self.lease_ttl)

    # --- a session -------------------------------------------------------------------------

    async def drive(self, session_id: str) -> None:
        sessions = self.broker.sessions
        record = await sessions.get(session_id)
        if record is None or not record.active:
            return
        cfg = {**DEFAULTS, **record.config}
        if record.status == SessionStatus.QUEUED:
            await sessions.update(
                session_id, status=SessionStatus.RUNNING, started_at=f"{time.time():.3f}"
            )
        model_id = record.model_id
        r = record.round_number
        try:
            if cfg.get("server_functions"):
                await self._start_sandbox(session_id, cfg["server_functions"])
            while r <= int(cfg["rounds"]) and not await self._stopped(session_id):
                model_id = await self.run_round(session_id, str(r), model_id, cfg)
                r += 1
                await sessions.update(session_id, current_round=r, model_id=model_id)
        except RoundFailed as exc:
            log.error("session %s failed: %s", session_id, exc)
            await sessions.update(
                session_id,
                status=SessionStatus.FAILED,
                error=str(exc),
                finished_at=f"{time.time():.3f}",
            )
        else:
            if await self._stopped(session_id):  # control/stop: it keeps its status
                log.info("session %s stopped after round %d", session_id, r - 1)
            else:
                log.info("session %s completed; final model %s", session_id, model_id)
                await sessions.update(
                    session_id, status=SessionStatus.COMPLETED, finished_at=f"{time.time():.3f}"
                )
        finally:
            sandbox = self._sandboxes.pop(session_id, None)
            if sandbox is not None:
                await asyncio.to_thread(sandbox.close)
        await sessions.expire_session(session_id, int(cfg["rounds"]))

    async def _start_sandbox(self, session_id: str, source: str) -> None:
        try:
            sandbox = await asyncio.to_thread(Sandbox, source, self.server_functions)
        except ServerFunctionsError as exc:
            raise RoundFailed(f"server_functions: {exc}") from None
        self._sandboxes[session_id] = sandbox
        log.info("session %s: server functions %s", session_id, sorted(sandbox.implements))

    async def _user(self, session_id: str, round_id: str, method: str, *args):
        """The session's server function `method` on args, or None if it has none."""
        sandbox = self._sandboxes.get(session_id)
        if sandbox is None or method not in sandbox.implements:
            return None
        try:
            return await asyncio.to_thread(getattr(sandbox, method), *args)
        except ServerFunctionsError as exc:
            await self._fail(session_id, round_id, f"server_functions: {exc}")

    async def _stopped(self, session_id: str) -> bool:
        record = await self.broker.sessions.get(session_id)
        return record is None or record.status == SessionStatus.STOPPED

    # --- a round ---------------------------------------------------------------------------

    async def run_round(self, session_id: str, round_id: str, model_in: str, cfg: dict) -> str:
        sessions = self.broker.sessions
        rnd = await sessions.round(session_id, round_id)
        if rnd is None:
            await sessions.update_round(
                session_id,
                round_id,
                status=RoundStatus.WAITING,
                model_in=model_in,
                started_at=f"{time.time():.3f}",
            )
            rnd = await sessions.round(session_id, round_id)
            log.info("session %s round %s: waiting for clients", session_id, round_id)
        status = rnd.status
        if status == RoundStatus.FAILED:
            raise RoundFailed(f"round {round_id}: {rnd.reason or 'failed'}")
        if status == RoundStatus.WAITING:
            await self._start_training(session_id, round_id, rnd, cfg)
            status = RoundStatus.COLLECTING
        if status == RoundStatus.COLLECTING:
            rnd = await sessions.round(session_id, round_id)
            tasks = await sessions.round_tasks(session_id, round_id, "tasks")
            await self.collect(tasks, float(rnd.deadline), int(cfg["buffer_size"]))
            await sessions.update_round(session_id, round_id, status=RoundStatus.AGGREGATING)
            status = RoundStatus.AGGREGATING
        if status == RoundStatus.AGGREGATING:
            await self._aggregate(session_id, round_id, cfg)
            status = RoundStatus.VALIDATING if cfg["validate"] else RoundStatus.DONE
            await sessions.update_round(session_id, round_id, status=status)
        if status == RoundStatus.VALIDATING:
            await self._validate(session_id, round_id, cfg)
            status = RoundStatus.DONE
            await sessions.update_round(session_id, round_id, status=status)
        rnd = await sessions.round(session_id, round_id)
        if not rnd.finished_at:
            finished = time.time()
            await sessions.update_round(session_id, round_id, finished_at=f"{finished:.3f}")
            ROUNDS.labels("done").inc()
            ROUND_SECONDS.observe(finished - float(rnd.started_at))
        log.info("session %s round %s done: model %s", session_id, round_id, rnd.model_out)
        return rnd.model_out

    async def _fail(self, session_id: str, round_id: str, reason: str) -> None:
        ROUNDS.labels("failed").inc()
        await self.broker.sessions.update_round(
            session_id,
            round_id,
            status=RoundStatus.FAILED,
            reason=reason,
            finished_at=f"{time.time():.3f}",
        )
        raise RoundFailed(f"round {round_id}: {reason}")

    async def _start_training(self, session_id: str, round_id: str, rnd: RoundRecord, cfg: dict):
        sessions = self.broker.sessions
        wait = cfg["client_wait"] if cfg["client_wait"] is not None else cfg["round_timeout"]
        deadline = float(rnd.started_at) + float(wait)
        min_clients = int(cfg["min_clients"])
        while True:
            online = await self.broker.presence.online()
            if len(online) >= min_clients:
                break
            if time.time() >= deadline:
                await self._fail(
                    session_id,
                    round_id,
                    f"only {len(online)} of the {min_clients} required clients were online",
                )
            await asyncio.sleep(self.poll_every)
        model_in = rnd.model_in
        if rnd.client_ids:  # an earlier attempt chose them: the same clients again
            selected = rnd.client_ids
        else:
            selected = await self._user(session_id, round_id, "client_selection", sorted(online))
        if selected is None:
            # The same sample on every attempt, so a resumed round picks the same clients.
            picker = random.Random(f"{session_id}/{round_id}")
            selected = sorted(picker.sample(online, min(int(cfg["max_clients"]), len(online))))
        settings = dict(cfg["client_settings"])
        if "client_settings" in getattr(self._sandboxes.get(session_id), "implements", ()):
            model = await asyncio.to_thread(load_npz, await self.broker.models.get(model_in))
            settings.update(await self._user(session_id, round_id, "client_settings", model))
            del model
        tasks = {correlation_id(session_id, round_id, "train", c): c for c in selected}
        await sessions.update_round(session_id, round_id, clients=json.dumps(selected))
        await sessions.add_round_tasks(session_id, round_id, "tasks", tasks)
        data = json.dumps(
            {
                "client_settings": settings,
                "session_id": session_id,
                "round_id": round_id,
                "round_timeout": cfg["round_timeout"],
                "task": "training",
                "model_id": model_in,
            }
        )
        await self._push(tasks, "Fedn_ModelUpdate", model_in, data, session_id, round_id)
        await sessions.set_round_once(
            session_id, round_id, "deadline", f"{time.time() + float(cfg['round_timeout']):.3f}"
        )
        await sessions.update_round(session_id, round_id, status=RoundStatus.COLLECTING)
        log.info("session %s round %s: %d training tasks pushed", session_id, round_id, len(tasks))

    async def _push(self, tasks, task_type, model_id, data, session_id, round_id) -> None:
        # Ids an earlier attempt at this round already pushed come back as None: skipped.
        await self.broker.tasks.push_many(
            list(tasks.values()),
            task_type,
            model_id=model_id,
            data=data,
            session_id=session_id,
            round_id=round_id,
            correlation_ids=list(tasks),
        )

    async def collect(self, tasks: dict[str, str], deadline: float, buffer_size: int = -1) -> None:
        """Wait until each task has settled; time out the rest at the deadline. With a
        buffer_size > 0, the rest are timed out as soon as that many updates were kept."""
        queues = self.broker.tasks
        while True:
            records = await queues.records(tasks)
            online = set(await self.broker.presence.online())
            open_, kept = [], 0
            for corr, raw in records.items():
                rec = TaskRecord.from_hash(raw)
                kept += bool(rec.model_update_id)
                if rec.settled or rec.flag == "timeout":
                    continue
                if tasks[corr] not in online or not raw:  # no record: it expired
                    await queues.flag(corr, "timeout")  # its client is gone
                    continue
                open_.append(corr)
            if not open_:
                return
            if time.time() >= deadline or 0 < buffer_size <= kept:
                for corr in open_:
                    await queues.flag(corr, "timeout")
                return
            await asyncio.sleep(self.poll_every)

    async def _aggregate(self, session_id: str, round_id: str, cfg: dict) -> None:
        sessions, models = self.broker.sessions, self.broker.models
        tasks = await sessions.round_tasks(session_id, round_id, "tasks")
        records = {
            corr: TaskRecord.from_hash(raw)
            for corr, raw in (await self.broker.tasks.records(tasks)).items()
        }
        arrived = [(tasks[corr], rec) for corr, rec in records.items() if rec.model_update_id]
        kept = arrived
        if int(cfg["buffer_size"]) > 0:  # the first buffer_size to arrive, on every attempt
            kept = sorted(kept, key=lambda item: float(item[1].result_at or 0))
            kept = kept[: int(cfg["buffer_size"])]
        kept.sort(key=lambda item: item[0])
        rnd = await sessions.round(session_id, round_id)
        model_in = rnd.model_in if rnd is not None else ""
        aggregator = await self._aggregator(session_id, round_id, model_in, cfg)
        used, rejected = [], {}
        try:
            for client, rec in kept:
                weight = update_weight(rec.result_meta)
                if weight is None:
                    rejected[client] = "missing or invalid meta.training_metadata.num_examples"
                    continue
                try:
                    data = await models.get(rec.model_update_id)
                    if isinstance(aggregator, UserAggregate):
                        await asyncio.to_thread(
                            aggregator.add_update, client, data, rec.result_meta
                        )
                    else:
                        await asyncio.to_thread(aggregator.add_npz, data, weight)
                    del data  # else it lives on while the next update is fetched
                except BrokerUnavailable:
                    raise  # pause the session; the next attempt redoes this aggregation
                except (BadUpdate, BrokerError) as exc:  # e.g. the update's model is gone
                    rejected[client] = str(exc)
                    continue
                used.append(client)
            if rejected:
                log.warning("session %s round %s rejected: %s", session_id, round_id, rejected)
            await sessions.update_round(
                session_id, round_id, rejected=json.dumps(rejected), updates=len(used)
            )
            if not used:
                await self._fail(session_id, round_id, "no model updates arrived")
            try:
                result = await asyncio.to_thread(aggregator.result)
            except ServerFunctionsError as exc:
                await self._fail(session_id, round_id, f"server_functions: {exc}")
            blob = await asyncio.to_thread(save_npz, result)
            del result
        finally:
            close = getattr(aggregator, "close", None)
            if close is not None:
                close()
        new_id = await models.put(blob)
        del blob  # before FedOpt's state bytes are built below
        stored = await sessions.set_round_once(session_id, round_id, "model_out", new_id)
        if stored != new_id:  # an earlier attempt already published this round's model
            await models.delete(new_id)
        if hasattr(aggregator, "state_bytes"):  # the server optimizer's state, for round + 1
            await self._keep_state(session_id, round_id, aggregator.state_bytes())
        # The model trail (control plane): this round's model is a child of its input.
        await self.broker.catalog.add_model(
            stored, parent=model_in, session_id=session_id, round_id=round_id
        )
        await sessions.update_round(
            session_id,
            round_id,
            aggregated=json.dumps(used),
            aggregated_at=f"{time.time():.3f}",
        )
        if cfg["delete_models_storage"]:  # every update that arrived, used or not
            for _, rec in arrived:
                await models.delete(rec.model_update_id)

    async def _aggregator(self, session_id: str, round_id: str, model_in: str, cfg: dict):
        """The session's aggregator; FedOpt starts from the state the previous round kept,
        so a worker taking over a session continues its optimizer exactly."""
        name = cfg["aggregator"]
        sandbox = self._sandboxes.get(session_id)
        if sandbox is not None and "aggregate" in sandbox.implements:
            previous = await asyncio.to_thread(load_npz, await self.broker.models.get(model_in))
            return UserAggregate(sandbox, previous)
        if name == "fedavg":
            return StreamingMean()
        arrays = state = None
        if name == "fedopt":
            arrays = await asyncio.to_thread(load_npz, await self.broker.models.get(model_in))
            if int(round_id) > 1:
                previous = await self.broker.sessions.round(session_id, str(int(round_id) - 1))
                if previous is not None and previous.opt_state:
                    state = bytes(await self.broker.models.get(previous.opt_state))
        try:
            return make_aggregator(name, cfg["aggregator_kwargs"], arrays, state)
        except ValueError as exc:
            await self._fail(session_id, round_id, f"aggregator {name}: {exc}")

    async def _keep_state(self, session_id: str, round_id: str, state: bytes) -> None:
        state_id = f"{session_id}.{round_id}.opt"
        try:
            await self.broker.models.put(state, model_id=state_id)
        except Conflict:  # an earlier attempt kept it (the same bytes, from the same inputs)
            pass
        await self.broker.sessions.set_round_once(session_id, round_id, "opt_state", state_id)

    async def _validate(self, session_id: str, round_id: str, cfg: dict) -> None:
        sessions = self.broker.sessions
        rnd = await sessions.round(session_id, round_id)
        online = set(await self.broker.presence.online())
        clients = [c for c in rnd.client_ids if c in online]
        tasks = {correlation_id(session_id, round_id, "validate", c): c for c in clients}
        await sessions.add_round_tasks(session_id, round_id, "validations", tasks)
        await self._push(tasks, "Fedn_Validation", rnd.model_out, "", session_id, round_id)
        deadline = await sessions.set_round_once(
            session_id,
            round_id,
            "validation_deadline",
            f"{time.time() + float(cfg['round_timeout']):.3f}",
        )
        tasks = await sessions.round_tasks(session_id, round_id, "validations")
        await self.collect(tasks, float(deadline))
