"""Start `combiner serve` / `combiner worker` as child processes (demo, tests, bench)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


class Child:
    """One `python -m combiner ...` child; its output goes to a log file."""

    def __init__(self, args: list[str], log_path: str, env: dict | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, wait_listening: bool = False, timeout: float = 30.0) -> Child:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "combiner", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if wait_listening else log,
            stderr=log,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the parent only; it stops us in order
        )
        if wait_listening:
            self.port = self._read_port(timeout)
            threading.Thread(target=self._drain_stdout, args=(log,), daemon=True).start()
        return self

    def _read_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        for raw in self.process.stdout:
            match = _LISTENING.search(raw.decode(errors="replace"))
            if match:
                return int(match.group(2))
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"{' '.join(self.args[:1])} did not start; see {self.log_path}")

    def _drain_stdout(self, log) -> None:
        for raw in self.process.stdout:
            log.write(raw)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a replica drains), then SIGKILL if it does not end in time."""
        if not self.alive:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()
