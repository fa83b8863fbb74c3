"""The real scaleout 1.0.0 client behind HAProxy, in front of three replicas that are
restarted (graceful drain) or killed (kill -9) while a training session runs.

The deployment is tests/cluster.py's Cluster: Redis (AOF), three `combiner serve` replicas
(--drain-delay 1.5), one `combiner worker` and HAProxy with deploy/haproxy.cfg. The clients
(tests/e2e/harness.py) attach to HAProxy only, so every call of theirs may land on any
replica. The 1.0.0 client dies on one UNAVAILABLE or "Stream removed" (docs/protocol.md §3.2),
so each test checks at the end that every client process is still running and that its
log has no traceback.

Restarts and kills are placed inside rounds without timing guesses: one client's training
call k waits until the test releases it (hold_dir/release-k, harness.release), so round k
is still collecting while replica k-1 restarts, and ends only after it.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.e2e.harness import E2E, PROCS, release, save_npz
from tests.e2e.test_training import SPEC, assert_model, ids, plus, seed_arrays, shift
from tests.services import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed"),
]

ROUNDS = 4
HELD = "1,2,3"  # the first client's training calls that wait for the test (rounds 1-3)
# What the 1.0.0 client logs just before it dies of the reconnect bug (§3.2), and
# CANCELLED, which it survives (it retries) but which a drain must not cause either: it
# is what a call got when HAProxy still sent it to a replica that had stopped taking calls.
UNEXPECTED = (
    "Traceback",
    "Server unavailable",
    "Stream removed",
    "closed channel",
    "Connection cancelled",
)


class LogFile:
    """A Cluster process's log, attached to the report on failure (conftest.py)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.log_path = path

    def describe(self, tail: int = 200) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-tail:])


def attach_logs(request, tmp_path: Path, names, *files: LogFile) -> None:
    """On failure, the report shows these Cluster processes' logs (tmp_path/NAME.log) and
    the other files given (conftest.py)."""
    stash = request.node.stash.setdefault(PROCS, [])
    stash.extend(LogFile(name, tmp_path / f"{name}.log") for name in names)
    stash.extend(files)


@pytest.fixture
def system(request, prefix, tmp_path, client_python):
    """A Cluster (HAProxy in front) and an E2E for the real clients, on the Cluster's Redis."""
    cluster = Cluster(tmp_path, prefix, replicas=3, workers=1)
    attach_logs(request, tmp_path, [f"replica{i}" for i in (1, 2, 3)] + ["worker1", "haproxy"])
    e2e = None
    try:
        cluster.start()
        e2e = E2E(request, cluster.redis.url, prefix, tmp_path, client_python)
        yield cluster, e2e
    finally:
        if e2e is not None:
            e2e.stop()  # clients first: they must not outlive the replicas (§3.2)
        cluster.stop()


# --- helpers --------------------------------------------------------------------------------


def start_clients(cluster, e2e, mode: str, hold: Path, held: str = HELD):
    """One client per SPEC entry, all through HAProxy; the first one's training calls
    listed in `held` wait for the test."""
    return [
        e2e.start_client(
            delta=d,
            num_examples=n,
            mode=mode,
            host="127.0.0.1",
            port=cluster.port,
            hold_dir=hold if i == 0 else None,
            hold_calls=held if i == 0 else "",
        )
        for i, (d, n) in enumerate(SPEC)
    ]


def all_alive(cluster, e2e, down: frozenset = frozenset()):
    """A check for wait loops: every client, the worker, HAProxy and the replicas that are
    meant to be up are running."""

    def check():
        e2e.ensure_alive()
        assert cluster.haproxy.poll() is None, "haproxy died"
        assert all(w.alive for w in cluster.workers), "the worker died"
        for i, r in enumerate(cluster.replicas):
            assert i in down or r.alive, f"replica{i + 1} died"

    return check


def start_session(e2e, seed, rounds: int = ROUNDS):
    return e2e.start_session(
        save_npz(e2e.tmp / "seed.npz", seed),
        "--rounds", str(rounds), "--min-clients", "3", "--max-clients", "3",
        "--round-timeout", "60",
    )  # fmt: skip


def wait_held(e2e, sid: str, client, call: int) -> None:
    """Until the held client sits in training call `call`: round `call` is collecting."""
    e2e.wait_log(client.proc, f"e2e: training call {call} waits", timeout=60)
    view = e2e.cli.session_show(sid)
    assert view["status"] == "running", view
    assert len(view["rounds"]) == call and view["rounds"][-1]["status"] == "collecting", view


def finished(session, check) -> dict:
    view = session.result(120, check=check)
    assert session.proc.popen.returncode == 0, session.proc.describe()
    assert view["status"] == "completed", view
    return view


def assert_trained(e2e, view, seed, clients, rounds: int = ROUNDS) -> None:
    """Every round had all three updates; the final model is the exact weighted mean."""
    assert len(view["rounds"]) == rounds, view
    for r in view["rounds"]:
        assert r["status"] == "done", r
        assert r["clients"] == ids(clients), r
        assert r["updates"] == 3 and r["aggregated"] == ids(clients), r
        assert r["validations"] == 3, r
    final = e2e.cli.model_get(view["model_id"], e2e.tmp / "final.npz")
    assert_model(final, plus(seed, rounds * shift(clients)), "final model")


def assert_survived(clients) -> None:
    """No client died: each process still runs, and nothing fatal is in its log."""
    for c in clients:
        assert c.proc.alive(), f"client died:\n{c.proc.describe(tail=80)}"
        log = c.proc.read_log(tail=100_000)
        for text in UNEXPECTED:
            assert text not in log, f"{text!r} in the log of {c.proc.name}:\n{log}"


def session_tasks(e2e, sid: str, rounds: int = ROUNDS) -> dict[str, str]:
    """Every task the session pushed (training and validation): correlation id -> client."""
    tasks: dict[str, str] = {}
    for r in range(1, rounds + 1):
        for kind in ("tasks", "validations"):
            tasks.update(e2e.round_tasks(sid, str(r), kind))
    return tasks


def assert_delivered_once(
    e2e, sid: str, clients, via: str, rounds: int = ROUNDS
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Each task of the session was handed out once (attempts 1) and completed. Returns
    the tasks (correlation id -> client) and their records."""
    tasks = session_tasks(e2e, sid, rounds)
    assert Counter(tasks.values()) == {c.client_id: 2 * rounds for c in clients}, tasks

    def completed():
        # the session ends on the last result; a polling client reports the task done
        # on its next poll
        records = e2e.task_records(tasks)
        return records if all(r.get("state") == "completed" for r in records.values()) else None

    records = wait_for(completed, 30, 0.1, "every task to be reported done")
    for corr, rec in records.items():
        assert rec.get("attempts") == "1" and rec.get("via") == via, (corr, rec)
        assert rec.get("result_at"), (corr, rec)
    return tasks, records


def received_by_poll(client) -> Counter:
    """Correlation ids the polling client started (one log line per task it received)."""
    return Counter(re.findall(r"TaskReceiver: Got task (\S+)", client.proc.read_log(tail=100_000)))


def marked_down(cluster) -> list[tuple[str, str]]:
    """(server, reason) each time HAProxy marked a replica down, in order."""
    text = (cluster.tmp / "haproxy.log").read_text(errors="replace")
    return re.findall(r"^\[WARNING\].* Server replicas/(\S+) is DOWN, reason: ([^,]+)", text, re.M)


# Why HAProxy took a draining replica out: its check read NOT_SERVING (a reply that is not
# SERVING), i.e. before the drain delay ended and the replica stopped taking calls. Not
# "Layer7 timeout" (the check only timed out: too late, see deploy/haproxy.cfg) nor
# "Layer4 connection problem" (the replica was gone already).
DRAINED = "Layer7 invalid response"


# TaskStream, as the replicas log it
OPENED = "client {} opened a task stream"
CLOSED = "client {} task stream closed"


def replica_log(cluster, i: int) -> str:
    try:
        return (cluster.tmp / f"replica{i + 1}.log").read_text(errors="replace")
    except OSError:
        return ""


def streams(cluster, client_id: str) -> list[tuple[int, int]]:
    """(opened, closed) TaskStreams of the client per replica (its log spans restarts)."""
    out = []
    for i in range(len(cluster.replicas)):
        text = replica_log(cluster, i)
        out.append((text.count(OPENED.format(client_id)), text.count(CLOSED.format(client_id))))
    return out


def holder(cluster, client_id: str) -> int | None:
    """The replica holding the client's open TaskStream (None while it has none)."""
    held = [i for i, (o, c) in enumerate(streams(cluster, client_id)) if o > c]
    assert len(held) <= 1, (client_id, streams(cluster, client_id))
    return held[0] if held else None


def opened_elsewhere(cluster, client_id: str, i: int) -> int:
    return sum(o for j, (o, _) in enumerate(streams(cluster, client_id)) if j != i)


def restart_moving_streams(cluster, e2e, i: int, victims: list[str], stopped) -> None:
    """Drain replica i (SIGTERM; returns once the process is gone), call stopped(), wait
    until each of the victims (the clients whose TaskStream it held) has opened a new
    stream on another replica, then start replica i again and wait until it serves."""
    before = {c: opened_elsewhere(cluster, c, i) for c in victims}
    cluster.replicas[i].stop()
    stopped()
    check = all_alive(cluster, e2e, down=frozenset({i}))

    def moved():
        check()
        return all(opened_elsewhere(cluster, c, i) > before[c] for c in victims)

    wait_for(moved, 30, 0.05, f"the streams replica{i + 1} held ({victims}) to open elsewhere")
    cluster.start_replica(i)
    wait_for(lambda: cluster.replica_serving(i), 15, 0.05, f"replica{i + 1} to serve")


# --- 1. rolling restart, polling clients ----------------------------------------------------


def test_rolling_restart_with_polling_clients(system):
    """Restart the three replicas one at a time (SIGTERM: NOT_SERVING, --drain-delay, then
    stop) while rounds 1, 2 and 3 are collecting: HAProxy's health check moves the polls
    away before the replica stops taking calls, so no client sees an error it dies of.
    (deploy/haproxy.cfg fails a check at once on NOT_SERVING: the replica is down within
    ~1 s, before the 1.5 s drain delay ends. When the check only failed on its timeout,
    that took up to 1.8 s, and a call sent in between could come back "Stream removed".)"""
    cluster, e2e = system
    check = all_alive(cluster, e2e)
    hold = e2e.tmp / "hold"
    hold.mkdir()
    clients = start_clients(cluster, e2e, "poll", hold)
    e2e.wait_online(clients)
    seed = seed_arrays()
    session = start_session(e2e, seed)
    sid = session.session_id

    for i in range(3):
        wait_held(e2e, sid, clients[0], call=i + 1)
        cluster.restart_replica(i)  # drain, start again on the same port, SERVING again
        check()
        release(hold, i + 1)

    view = finished(session, check)
    assert marked_down(cluster) == [(f"replica{i}", DRAINED) for i in (1, 2, 3)]
    assert_trained(e2e, view, seed, clients)
    tasks, _ = assert_delivered_once(e2e, sid, clients, via="poll")
    for c in clients:
        mine = {corr for corr, owner in tasks.items() if owner == c.client_id}
        assert received_by_poll(c) == Counter(mine), c.client_id
    assert_survived(clients)


# --- 2. rolling restart, streaming clients --------------------------------------------------


def test_rolling_restart_with_streaming_clients(system):
    """Streaming clients (SendHeartbeat + TaskStream). The drain ends every TaskStream on
    the replica with FAILED_PRECONDITION; the client retries it (§3.2), and HAProxy, which
    has marked the draining replica down, opens the new stream on another replica.

    Each replica is stopped (drained) and started again in two steps, and the test waits in
    between for the streams it held to be open again: with the replica down, they can only
    be open on another one."""
    cluster, e2e = system
    hold = e2e.tmp / "hold"
    hold.mkdir()
    clients = start_clients(cluster, e2e, "stream", hold)
    e2e.wait_online(clients)
    check = all_alive(cluster, e2e)
    wait_for(
        lambda: check() or all(holder(cluster, c.client_id) is not None for c in clients),
        30, 0.05, "every client's TaskStream to be open",
    )  # fmt: skip
    seed = seed_arrays()
    session = start_session(e2e, seed)
    sid = session.session_id

    ended = Counter()  # client id -> streams ended by a drain
    for i in range(3):
        wait_held(e2e, sid, clients[0], call=i + 1)
        victims = [c.client_id for c in clients if holder(cluster, c.client_id) == i]
        # The held client is in its training callback (the stream thread runs tasks): it
        # sends its update, then reads the stream's end, and only then opens a new one.
        restart_moving_streams(cluster, e2e, i, victims, lambda n=i + 1: release(hold, n))
        ended.update(victims)

    view = finished(session, check)
    assert marked_down(cluster) == [(f"replica{i}", DRAINED) for i in (1, 2, 3)]
    assert_trained(e2e, view, seed, clients)
    tasks, records = assert_delivered_once(e2e, sid, clients, via="stream")

    # Every client's stream was ended by a drain at least once (the replica holding it was
    # restarted at some point), each time with FAILED_PRECONDITION, which it retried with a
    # new stream: no other error, no other stream.
    for c in clients:
        log = c.proc.read_log(tail=100_000)
        retried = log.count("GRPC (listen_to_task_stream): Failed precondition")
        assert ended[c.client_id] >= 1, ended
        assert retried == ended[c.client_id], (c.client_id, retried, ended)
        assert log.count("Listening to task stream.") == 1 + retried, c.client_id
        opened = sum(o for o, _ in streams(cluster, c.client_id))
        assert opened == 1 + retried, (c.client_id, streams(cluster, c.client_id))
        # each task reached it once: (type, model id) identifies a task of this session
        got = Counter(re.findall(r"Received task request of type (\S+) for model_id (\S+)", log))
        want = Counter(
            (rec["type"], rec["model_id"])
            for corr, rec in records.items()
            if tasks[corr] == c.client_id
        )
        assert got == want, (c.client_id, got, want)
    assert_survived(clients)


# --- 3. kill -9 of a replica between polls --------------------------------------------------


def test_kill_9_between_polls(system):
    """SIGKILL one replica while round 2 is collecting and every polling client is between
    two polls, start it again in round 3: every task is still handed out once and the
    session ends with the exact model.

    What protects the clients: until HAProxy's health check marks the dead replica down
    (2 failed checks, 0.5 s apart), it still sends it calls. A call for which HAProxy
    cannot connect (the listener is gone) is retried (`retry-on conn-failure`) on another
    replica (`option redispatch 1`: every retry may change server). A call that was sent
    to it and got nothing back before it died (in flight, or sent on a pooled connection
    the kill closed) is retried the same way (`retry-on empty-response`; HAProxy keeps a
    copy of requests that fit its buffer; seen with a unary call in flight to a server
    killed while it slept in the handler, next to a stream on the same connection).

    What is not protected: a call whose reply had started when the replica died, i.e. a
    Download or a TaskStream in progress (HAProxy cannot replay it): the client gets
    UNKNOWN "Stream removed (Data frame with END_STREAM flag received)", which 1.0.0 raises
    at once (it retries only the exact details "Stream removed", and that path is broken
    too): a polling client's task fails (FAILED), a streaming client dies. A request
    larger than HAProxy's buffer (an Upload above 16 KiB) is not replayed either. And a
    call the killed replica had already executed runs twice: a poll whose reply (a task)
    died with the replica hands the task out again on the retry (attempt 2, still received
    once). Killing between polls, with no client downloading or uploading and no task
    queued, avoids all of these, so every task is handed out exactly once."""
    cluster, e2e = system
    hold = e2e.tmp / "hold"
    hold.mkdir()
    clients = start_clients(cluster, e2e, "poll", hold, held="2,3")
    e2e.wait_online(clients)
    seed = seed_arrays()
    session = start_session(e2e, seed, rounds=3)
    sid = session.session_id
    victim = 1

    # Round 2: the held client trains (it only polls, RUNNING); the two others have sent
    # their update and reported it done, so they only poll (idle). No task is queued.
    wait_held(e2e, sid, clients[0], call=2)
    others = {c.client_id for c in clients[1:]}

    def others_done():
        tasks = e2e.round_tasks(sid, "2")
        records = e2e.task_records({k: v for k, v in tasks.items() if v in others})
        return len(records) == 2 and all(r.get("state") == "completed" for r in records.values())

    wait_for(others_done, 30, 0.1, "the two free clients to report round 2 done")
    # right after a poll cycle: each client has polled since `seen`
    seen = e2e.last_seen()
    wait_for(
        lambda: all(e2e.last_seen()[c.client_id] > seen[c.client_id] for c in clients),
        10, 0.01, "every client to poll once more",
    )  # fmt: skip
    cluster.kill_replica(victim)
    down = all_alive(cluster, e2e, down=frozenset({victim}))
    release(hold, 2)
    wait_for(lambda: down() or marked_down(cluster), 10, 0.05, "HAProxy to mark the replica down")

    wait_held(e2e, sid, clients[0], call=3)  # round 2 ended with the replica dead
    down()
    cluster.start_replica(victim)
    wait_for(lambda: cluster.replica_serving(victim), 15, 0.05, "the killed replica to serve")
    release(hold, 3)

    view = finished(session, all_alive(cluster, e2e))
    assert marked_down(cluster) == [(f"replica{victim + 1}", "Layer4 connection problem")]
    assert_trained(e2e, view, seed, clients, rounds=3)
    tasks, _ = assert_delivered_once(e2e, sid, clients, via="poll", rounds=3)
    for c in clients:
        mine = {corr for corr, owner in tasks.items() if owner == c.client_id}
        assert received_by_poll(c) == Counter(mine), c.client_id
    assert_survived(clients)
