"""The aggregators (workers/aggregators.py) against numpy references written here."""

from __future__ import annotations

import numpy as np
import pytest

from workers.aggregators import FedMedian, FedTrimmedAvg, check_config, make_aggregator
from workers.fedavg import BadUpdate, StreamingMean, save_npz

RNG = np.random.default_rng(7)
SEED = [RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=5).astype(np.float32)]


def updates(base, n=3, scale=0.1):
    return [([a + RNG.normal(scale=scale, size=a.shape).astype(a.dtype) for a in base],
             float(10 * (k + 1))) for k in range(n)]  # fmt: skip


def weighted_mean(ups):
    total = sum(w for _, w in ups)
    return [sum(u[i].astype(np.float64) * w for u, w in ups) / total for i in range(len(SEED))]


def reference_fedopt(opt, rounds, lr=1e-3, b1=0.9, b2=0.99, tau=1e-4):
    """The ancestor's rules (workers/aggregators.py docstring), plainly, in float64."""
    x = [a.astype(np.float64) for a in SEED]
    m = v = None
    for ups in rounds:
        d = [mean - xi for mean, xi in zip(weighted_mean(ups), x, strict=True)]
        if m is None:
            m = [(1 - b1) * di for di in d]
            v = [np.full(di.shape, tau**2) for di in d]
        else:
            m = [b1 * mi + (1 - b1) * di for mi, di in zip(m, d, strict=True)]
        if opt == "adam":
            v = [b2 * vi + (1 - b2) * di**2 for vi, di in zip(v, d, strict=True)]
        elif opt == "yogi":
            v = [vi - (1 - b2) * np.sign(vi - di**2) * di**2 for vi, di in zip(v, d, strict=True)]
        else:
            v = [vi + di**2 for vi, di in zip(v, d, strict=True)]
        x = [xi + lr * mi / (np.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v, strict=True)]
    return x


def run_round(agg, ups):
    for arrays, w in ups:
        agg.add_npz(save_npz(arrays), w)
    return agg.result()


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("restart", [False, True])
def test_fedopt_two_rounds_equal_the_reference(opt, restart):
    """restart: round 2 runs in a new object built from round 1's state, as a worker taking
    over the session does (the state goes through Redis as these bytes)."""
    kwargs = {"serveropt": opt, "learning_rate": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}
    r1 = updates(SEED)
    agg = make_aggregator("fedopt", kwargs, SEED)
    model1 = run_round(agg, r1)
    r2 = updates(model1)
    state = agg.state_bytes()
    if restart:
        agg = make_aggregator("fedopt", kwargs, model1, state)
    else:
        agg.model_in, agg.mean = model1, StreamingMean()
    model2 = run_round(agg, r2)
    lr, b1, b2, tau = (kwargs[k] for k in ("learning_rate", "beta1", "beta2", "tau"))
    # the reference starts round 2 from the float32 model round 1 actually produced
    want1 = reference_fedopt(opt, [r1], lr, b1, b2, tau)
    for got, want in zip(model1, want1, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
    x = [a.astype(np.float64) for a in model1]
    d1 = [mean - s for mean, s in zip(weighted_mean(r1), SEED, strict=True)]
    d2 = [mean - xi for mean, xi in zip(weighted_mean(r2), x, strict=True)]
    for i in range(len(SEED)):
        m = (1 - b1) * d1[i]
        v = np.full(d1[i].shape, tau**2)
        v = {"adam": lambda v, d: b2 * v + (1 - b2) * d**2,
             "yogi": lambda v, d: v - (1 - b2) * np.sign(v - d**2) * d**2,
             "adagrad": lambda v, d: v + d**2}[opt]  # fmt: skip
        v1 = v(np.full(d1[i].shape, tau**2), d1[i])
        m2 = b1 * m + (1 - b1) * d2[i]
        v2 = v(v1, d2[i])
        want2 = x[i] + lr * m2 / (np.sqrt(v2) + tau)
        np.testing.assert_allclose(model2[i], want2, rtol=1e-6)
    assert model2[0].shape == SEED[0].shape


def test_fedopt_defaults_are_the_ancestors():
    assert check_config("fedopt", {}) == {"serveropt": "adam", "learning_rate": 1e-3,
                                          "beta1": 0.9, "beta2": 0.99, "tau": 1e-4}  # fmt: skip
    got = run_round(make_aggregator("fedopt", None, SEED), ups := updates(SEED))
    for g, w in zip(got, reference_fedopt("adam", [ups]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def poisoned():
    honest = [([a + np.float32(0.01 * k) for a in SEED], 1.0) for k in range(5)]
    return honest, [([np.full_like(a, 1e9) for a in SEED], 1000.0)]


def test_median_and_trimmed_mean_resist_one_poisoned_update():
    honest, bad = poisoned()
    ups = honest + bad
    stacks = [np.stack([u[i] for u, _ in ups]) for i in range(len(SEED))]
    with FedMedian() as med:
        got = run_round(med, ups)
    for g, s, a in zip(got, stacks, SEED, strict=True):
        np.testing.assert_allclose(g, np.median(s, axis=0), rtol=1e-6)
        assert np.abs(g - a).max() < 0.1  # near the honest ones
    with FedTrimmedAvg(beta=0.2) as trimmed:  # 6 updates: cut 1 at each end
        got = run_round(trimmed, ups)
    for g, s, a in zip(got, stacks, SEED, strict=True):
        np.testing.assert_allclose(g, np.sort(s, axis=0)[1:-1].mean(axis=0), rtol=1e-6)
        assert np.abs(g - a).max() < 0.1
    fedavg = run_round(StreamingMean(), ups)
    assert np.abs(fedavg[0] - SEED[0]).min() > 1e8  # FedAvg is carried away


@pytest.mark.parametrize("name", ["fedopt", "fedmedian", "fedtrimmedavg"])
def test_bad_updates_are_refused_and_change_nothing(name):
    agg = make_aggregator(name, None, SEED)
    good = updates(SEED, n=2)
    agg.add_npz(save_npz(good[0][0]), good[0][1])
    for data, weight in [
        (save_npz([SEED[0]]), 1.0),  # one array short
        (save_npz([SEED[0], SEED[0]]), 1.0),  # wrong shape
        (b"not an npz", 1.0),
        (save_npz(good[1][0]), 0.0),  # weight 0
    ]:
        with pytest.raises(BadUpdate):
            agg.add_npz(data, weight)
    assert agg.count == 1
    agg.add_npz(save_npz(good[1][0]), good[1][1])
    assert agg.count == 2 and len(agg.result()) == len(SEED)
    getattr(agg, "close", lambda: None)()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("fedopt", {"serveropt": "sgd"}), ("fedopt", {"learning_rate": 0}),
     ("fedopt", {"beta1": 1.0}), ("fedopt", {"tau": "x"}), ("fedopt", {"momentum": 1}),
     ("fedtrimmedavg", {"beta": 0.5}), ("fedmedian", {"beta": 0.1}), ("krum", {})],
)  # fmt: skip
def test_bad_settings_are_a_clear_error(name, kwargs):
    with pytest.raises(ValueError):
        check_config(name, kwargs)


def test_integer_arrays_come_out_as_float64():
    ints = [np.arange(6, dtype=np.int64).reshape(2, 3)]
    with FedMedian() as med:
        for k in range(3):
            med.add_npz(save_npz([ints[0] + k]), 1.0)
        [got] = med.result()
    assert got.dtype == np.float64 and np.array_equal(got, ints[0] + 1.0)
