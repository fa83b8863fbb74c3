"""The round scenario's models: K float32 models of a given size, made the same way in
every process from their index (so the baseline rebuilds them instead of loading them)."""

from __future__ import annotations

import numpy as np

from workers.fedavg import save_npz

LAYERS = (0.5, 0.25, 0.125)  # shares of the first arrays; the last one takes the rest


def layer_sizes(model_bytes: int) -> list[int]:
    total = model_bytes // 4
    sizes = [int(total * share) for share in LAYERS]
    return [*sizes, total - sum(sizes)]


def arrays(k: int, model_bytes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + k)
    return [rng.standard_normal(n, dtype=np.float32) for n in layer_sizes(model_bytes)]


def weight(k: int) -> int:
    """num_examples of client k (1..100, uneven)."""
    return 1 + (k * 37) % 100


def npz(arrs: list[np.ndarray]) -> bytes:
    """As the client's numpy helper writes a model (np.savez_compressed, docs/protocol.md §9)."""
    return save_npz(arrs)
