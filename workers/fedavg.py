"""Streamed FedAvg over npz models (protocol.md §9).

Models are npz files with arrays named "0".."n-1". The running weighted mean is updated
one update at a time (``m += w_k (x_k - m) / N``), so memory stays at about one model
whatever the number of clients. Float arrays keep their dtype; integer ones average
as float64.
"""

from __future__ import annotations

import io

import numpy as np


class BadUpdate(ValueError):
    """This update cannot be averaged (unreadable, wrong shapes, bad weight)."""


def load_npz(data: bytes) -> list[np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
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


class StreamingMean:
    def __init__(self) -> None:
        self.model: list[np.ndarray] | None = None
        self.total = 0.0
        self.count = 0

    def add(self, arrays: list[np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise BadUpdate(f"weight (num_examples) must be > 0, got {weight}")
        if self.model is None:
            self.model = [
                np.array(a, dtype=a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64)
                for a in arrays
            ]
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
            m += (a.astype(m.dtype, copy=False) - m) * m.dtype.type(share)
        self.count += 1

    def result(self) -> list[np.ndarray]:
        if self.model is None:
            raise ValueError("no updates")
        return self.model
