"""Streamed FedAvg over npz models (docs/protocol.md §9).

Models are npz files with arrays named "0".."n-1". The running weighted mean is updated
one update at a time (``m += w_k (x_k - m) / N``), so memory stays at about one model
whatever the number of clients. Float arrays keep their dtype; integer ones average
as float64.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import threading
import zipfile

import numpy as np


class BadUpdate(ValueError):
    """This update cannot be averaged (unreadable, wrong shapes, bad weight)."""


class _BufferReader(io.RawIOBase):
    """A seekable file over a bytes-like object without copying it (io.BytesIO copies a
    bytearray), so a model-sized buffer is not held twice while its npz is read."""

    def __init__(self, data) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()


def _open(data) -> io.BufferedReader:
    return io.BufferedReader(_BufferReader(data))


# CPython 3.11 before 3.11.8 keeps ast.literal_eval's recursion count in shared state: two
# threads inside it at once can fail one with "SystemError: AST constructor recursion
# depth mismatch". numpy parses every array's header with it, and models are read in
# worker threads (asyncio.to_thread), so a valid update was refused under load
# (tests/test_failover.py). Reading one array at a time in the process avoids it.
_HEADERS = threading.Lock() if sys.version_info < (3, 11, 8) else contextlib.nullcontext()


class NpzReader:
    """An npz model (bytes, or a file's path) opened for reading (np.load, no pickles),
    used like np.load's NpzFile: ``files``, ``reader[name]``, ``close()``, a context
    manager. Each array is read under _HEADERS."""

    def __init__(self, source) -> None:
        with _HEADERS:
            file = source if isinstance(source, str | os.PathLike) else _open(source)
            npz = np.load(file, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an npz archive")
        self._npz = npz

    @property
    def files(self) -> list[str]:
        return self._npz.files

    def __getitem__(self, name: str) -> np.ndarray:
        with _HEADERS:
            return self._npz[name]

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_npz(data: bytes) -> list[np.ndarray]:
    try:
        with NpzReader(data) as npz:
            names = set(npz.files)
            expected = {str(i) for i in range(len(names))}
            if names != expected:
                raise BadUpdate(f"arrays must be named 0..{len(names) - 1}, got {sorted(names)}")
            return [npz[str(i)] for i in range(len(names))]
    except BadUpdate:
        raise
    except Exception as exc:
        raise BadUpdate(f"not a readable npz model: {exc}") from exc


def save_npz(arrays: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{str(i): a for i, a in enumerate(arrays)})
    return buf.getvalue()


def release_large_buffers(threshold: int = 128 * 1024) -> None:
    """Have glibc serve allocations above threshold with mmap, so a freed model-sized
    buffer goes back to the OS instead of staying in a fragmented heap (the bench measured
    the worker's peak RSS at about twice its live data without this). No-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, threshold)


def _npz_arrays(npz) -> list[str]:
    names = set(npz.files)
    expected = {str(i) for i in range(len(names))}
    if names != expected:
        raise BadUpdate(f"arrays must be named 0..{len(names) - 1}, got {sorted(names)}")
    return [str(i) for i in range(len(names))]


def _as_float(a: np.ndarray) -> np.ndarray:
    """Float arrays keep their dtype; integer ones average as float64."""
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


def _fold(m: np.ndarray, diff: np.ndarray, share: float) -> None:
    """m += diff * share, in place, reusing diff (no more temporaries)."""
    diff *= m.dtype.type(share)
    m += diff


class StreamingMean:
    def __init__(self) -> None:
        self.model: list[np.ndarray] | None = None
        self.total = 0.0
        self.count = 0

    def add(self, arrays: list[np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise BadUpdate(f"weight (num_examples) must be > 0, got {weight}")
        if self.model is None:
            self.model = [np.array(_as_float(a)) for a in arrays]  # a copy: not the caller's
            self.total, self.count = float(weight), 1
            return
        if len(arrays) != len(self.model):
            raise BadUpdate(f"expected {len(self.model)} arrays, got {len(arrays)}")
        for i, (m, a) in enumerate(zip(self.model, arrays, strict=True)):
            if m.shape != a.shape:
                raise BadUpdate(f"array {i} has shape {a.shape}, expected {m.shape}")
        self.total += weight
        share = weight / self.total
        for m, a in zip(self.model, arrays, strict=True):
            _fold(m, np.subtract(a, m, dtype=m.dtype), share)  # one temporary per array
        self.count += 1

    def add_npz(self, data: bytes, weight: float) -> None:
        """Fold an npz update in one array at a time: memory stays at the running mean, the
        update's bytes and one of its arrays. A first pass decodes every array (checking
        shapes and the zip CRCs) without keeping it, so a bad update changes nothing."""
        if not weight > 0:
            raise BadUpdate(f"weight (num_examples) must be > 0, got {weight}")
        try:
            with NpzReader(data) as npz:
                names = _npz_arrays(npz)
                if self.model is None:  # the first update is the mean: keep its arrays
                    self.model = [_as_float(npz[name]) for name in names]
                    self.total, self.count = float(weight), 1
                    return
                if len(names) != len(self.model):
                    raise BadUpdate(f"expected {len(self.model)} arrays, got {len(names)}")
                for i, name in enumerate(names):
                    shape = npz[name].shape
                    if shape != self.model[i].shape:
                        raise BadUpdate(
                            f"array {i} has shape {shape}, expected {self.model[i].shape}"
                        )
                self.total += weight
                share = weight / self.total
                for m, name in zip(self.model, names, strict=True):
                    a = npz[name].astype(m.dtype, copy=False)  # freshly decoded: ours
                    a -= m
                    _fold(m, a, share)
                    del a
        except (BadUpdate, MemoryError):
            raise
        except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise BadUpdate(f"not a readable npz model: {exc}") from exc
        self.count += 1

    def result(self) -> list[np.ndarray]:
        if self.model is None:
            raise ValueError("no updates")
        return self.model
