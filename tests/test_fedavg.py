"""Streamed FedAvg (unit: no Redis)."""

from __future__ import annotations

import ast
import concurrent.futures
import sys
import threading
import time

import numpy as np
import pytest

from workers.coordinator import update_weight
from workers.fedavg import BadUpdate, StreamingMean, load_npz, save_npz

rng = np.random.default_rng(7)


def model(shift: float = 0.0, dtype=np.float32) -> list[np.ndarray]:
    return [(rng.random(10) + shift).astype(dtype), (rng.random((2, 3)) + shift).astype(dtype)]


def test_streamed_mean_equals_the_weighted_mean():
    updates = [(model(i), n) for i, n in enumerate((3, 5, 11, 2))]
    streamed = StreamingMean()
    for arrays, n in updates:
        streamed.add_npz(save_npz(arrays), n)
    total = sum(n for _, n in updates)
    for k, got in enumerate(streamed.result()):
        want = sum(a[k].astype(np.float64) * n for a, n in updates) / total
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert streamed.count == 4


def test_integer_models_average_as_float64():
    mean = StreamingMean()
    mean.add_npz(save_npz([np.array([1, 2], dtype=np.int64)]), 1)
    mean.add_npz(save_npz([np.array([2, 4], dtype=np.int64)]), 1)
    assert mean.result()[0].dtype == np.float64
    np.testing.assert_array_equal(mean.result()[0], [1.5, 3.0])


@pytest.mark.parametrize(
    "bad, reason",
    [
        (save_npz([np.zeros(3, dtype=np.float32), np.zeros((2, 3), dtype=np.float32)]), "shape"),
        (save_npz([np.zeros(10, dtype=np.float32)]), "expected 2 arrays"),
        (b"not an npz", "not a readable npz"),
    ],
)
def test_a_bad_update_is_rejected_and_changes_nothing(bad, reason):
    mean = StreamingMean()
    first = model()
    mean.add_npz(save_npz(first), 4)
    with pytest.raises(BadUpdate, match=reason):
        mean.add_npz(bad, 4)
    for got, want in zip(mean.result(), first, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (mean.total, mean.count) == (4.0, 1)


def test_a_corrupt_last_array_changes_nothing():
    mean = StreamingMean()
    first = model()
    mean.add_npz(save_npz(first), 1)
    data = bytearray(save_npz(model(1.0)))
    data[-200] ^= 0xFF  # inside the last member or the directory: the read must fail
    with pytest.raises(BadUpdate):
        mean.add_npz(bytes(data), 1)
    for got, want in zip(mean.result(), first, strict=True):
        np.testing.assert_array_equal(got, want)


def test_arrays_must_be_named_0_to_n():
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, weights=np.zeros(2))
    with pytest.raises(BadUpdate, match="named 0"):
        load_npz(buf.getvalue())
    mean = StreamingMean()
    mean.add_npz(save_npz([np.zeros(2)]), 1)
    with pytest.raises(BadUpdate, match="named 0"):
        mean.add_npz(buf.getvalue(), 1)


def test_weight_must_be_positive():
    mean = StreamingMean()
    mean.add_npz(save_npz(model()), 1)
    with pytest.raises(BadUpdate, match="> 0"):
        mean.add_npz(save_npz(model()), 0)


@pytest.mark.parametrize(
    ("meta", "weight"),
    [
        ('{"training_metadata": {"num_examples": 7}}', 7.0),
        ("", None),
        ("not json", None),
        ('{"training_metadata": {}}', None),
        ('{"training_metadata": {"num_examples": [1]}}', None),
        ("[" * 100_000, None),  # too deep for json: RecursionError, not a stopped worker
        ('{"a":' * 5_000 + "1" + "}" * 5_000, None),
    ],
)
def test_update_weight_reads_num_examples_and_rejects_anything_else(meta, weight):
    assert update_weight(meta) == weight


@pytest.mark.skipif(
    sys.version_info >= (3, 11, 8), reason="CPython 3.11.8 fixed ast.literal_eval's thread race"
)
def test_models_read_in_threads_never_run_literal_eval_at_once(monkeypatch):
    """CPython 3.11.7 (this machine's) can fail ast.literal_eval, which numpy parses every
    array header with, when two threads run it at once (workers/fedavg.py, _HEADERS): a
    real update was refused so under load. The race is rare, so this stands in an
    ast.literal_eval that fails whenever another thread is inside it (it waits a moment
    inside, to make overlaps likely), and reads models in 8 threads through every reader."""
    inside, overlaps, guard = [0], [], threading.Lock()
    real = ast.literal_eval

    def exclusive(text):
        with guard:
            inside[0] += 1
            if inside[0] > 1:
                overlaps.append(text)
        try:
            time.sleep(0.0005)  # lets another thread in, if nothing keeps it out
            return real(text)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(ast, "literal_eval", exclusive)
    data = save_npz(model())

    def read(_):
        load_npz(data)
        StreamingMean().add_npz(data, 1.0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(read, range(200)))
    assert overlaps == []
