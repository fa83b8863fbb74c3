"""The aggregators a session may choose (``session_config.aggregator``), all with the
interface of workers/fedavg.py's StreamingMean: ``add_npz(data, weight)`` folds in one update
(BadUpdate, and nothing changed, if it cannot be used) and ``result()`` gives the new model.

* ``fedavg``: the streamed weighted mean (workers/fedavg.py).
* ``fedopt``: server-side adaptive optimisation (Reddi et al. 2020, "Adaptive Federated
  Optimization"), with the update rules, initial moments and defaults of the ancestor's
  FedOpt aggregator: pseudo-gradient d = (weighted mean of the updates) - (round's input);
  m = (1 - beta1) d on the first round, then beta1 m + (1 - beta1) d; v starts at tau^2 and
  is adam: beta2 v + (1 - beta2) d^2, yogi: v - (1 - beta2) sign(v - d^2) d^2,
  adagrad: v + d^2; new model = input + learning_rate m / (sqrt(v) + tau). No bias
  correction. Defaults: adam, learning_rate 1e-3, beta1 0.9, beta2 0.99, tau 1e-4. The mean
  is streamed, so memory is the mean, the input and the two moments; the moments (float64)
  are kept in Redis between rounds (``state_bytes``) where the ancestor kept them in one
  combiner's memory, so a worker taking over a session continues the optimiser exactly.
* ``fedmedian`` and ``fedtrimmedavg``: robust to poisoned updates, coordinate-wise median
  and trimmed mean (``beta`` = the share cut at each end). Both are unweighted (an
  attacker could claim any num_examples). Updates are spooled to a private temporary
  folder and reduced array by array, so memory is the number of updates times the largest
  array, not times the model.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import zipfile

import numpy as np

from workers.fedavg import BadUpdate, NpzReader, StreamingMean, _as_float, _npz_arrays

AGGREGATORS = ("fedavg", "fedopt", "fedmedian", "fedtrimmedavg")
FEDOPT_DEFAULTS = {
    "serveropt": "adam",
    "learning_rate": 1e-3,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-4,
}
SERVER_OPTIMIZERS = ("adam", "yogi", "adagrad")
KWARGS = {
    "fedavg": {},
    "fedopt": FEDOPT_DEFAULTS,
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.1},
}


def _number(kwargs: dict, name: str) -> float:
    value = kwargs[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_config(name: str, kwargs: dict | None) -> dict:
    """The aggregator's settings with defaults filled in; ValueError says what is wrong."""
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {name!r}")
    kwargs = dict(kwargs or {})
    allowed = KWARGS[name]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"{name} takes no {', '.join(unknown)} (aggregator_kwargs: {known})")
    merged = {**allowed, **kwargs}
    if name == "fedopt":
        if merged["serveropt"] not in SERVER_OPTIMIZERS:
            raise ValueError(f"serveropt must be one of {', '.join(SERVER_OPTIMIZERS)}")
        for key in ("learning_rate", "beta1", "beta2", "tau"):
            merged[key] = _number(merged, key)
        if merged["learning_rate"] <= 0 or merged["tau"] <= 0:
            raise ValueError("learning_rate and tau must be > 0")
        if not (0 <= merged["beta1"] < 1 and 0 <= merged["beta2"] < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
    if name == "fedtrimmedavg":
        merged["beta"] = _number(merged, "beta")
        if not 0 <= merged["beta"] < 0.5:
            raise ValueError("beta must be in [0, 0.5)")
    return merged


def make_aggregator(
    name: str, kwargs: dict | None = None, model_in: list[np.ndarray] | None = None,
    state: bytes | None = None,
):  # fmt: skip
    settings = check_config(name, kwargs)
    if name == "fedavg":
        return StreamingMean()
    if name == "fedopt":
        if model_in is None:
            raise ValueError("fedopt needs the round's input model")
        return FedOpt(model_in, state=state, **settings)
    if name == "fedmedian":
        return FedMedian()
    return FedTrimmedAvg(settings["beta"])


class FedOpt:
    def __init__(
        self, model_in: list[np.ndarray], serveropt: str = "adam", learning_rate: float = 1e-3,
        beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-4, state: bytes | None = None,
    ) -> None:  # fmt: skip
        check_config("fedopt", {"serveropt": serveropt, "learning_rate": learning_rate,
                                "beta1": beta1, "beta2": beta2, "tau": tau})  # fmt: skip
        self.model_in = model_in
        self.serveropt, self.lr = serveropt, learning_rate
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.mean = StreamingMean()
        self.m: list[np.ndarray] | None = None
        self.v: list[np.ndarray] | None = None
        if state is not None:
            self._restore(state)

    @property
    def count(self) -> int:
        return self.mean.count

    def add_npz(self, data: bytes, weight: float) -> None:
        if self.mean.model is None:  # the first update must match the input model
            with NpzReader(data) as npz:
                shapes = [npz[n].shape for n in _npz_arrays(npz)]
            want = [a.shape for a in self.model_in]
            if shapes != want:
                raise BadUpdate(f"update shapes {shapes} differ from the model's {want}")
        self.mean.add_npz(data, weight)

    def result(self) -> list[np.ndarray]:
        mean = self.mean.result()
        first = self.m is None
        if first:
            self.m = [np.zeros(a.shape, np.float64) for a in mean]
            self.v = [np.full(a.shape, self.tau**2, np.float64) for a in mean]
        out = []
        for i, (avg, old) in enumerate(zip(mean, self.model_in, strict=True)):
            d = avg.astype(np.float64) - old.astype(np.float64)
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * d
            d2 = d * d
            if self.serveropt == "adam":
                self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * d2
            elif self.serveropt == "yogi":
                self.v[i] = self.v[i] - (1.0 - self.beta2) * np.sign(self.v[i] - d2) * d2
            else:  # adagrad
                self.v[i] = self.v[i] + d2
            new = old.astype(np.float64) + self.lr * self.m[i] / (np.sqrt(self.v[i]) + self.tau)
            out.append(new.astype(avg.dtype, copy=False))
        return out

    def state_bytes(self) -> bytes:
        """m and v after result(), as npz (m0.., v0..): the next round's ``state``."""
        if self.m is None:
            raise ValueError("no state before result()")
        buf = io.BytesIO()
        arrays = {f"m{i}": a for i, a in enumerate(self.m)}
        arrays |= {f"v{i}": a for i, a in enumerate(self.v)}
        np.savez(buf, **arrays)
        return buf.getvalue()

    def _restore(self, state: bytes) -> None:
        try:
            with NpzReader(state) as npz:
                n = len(self.model_in)
                self.m = [npz[f"m{i}"] for i in range(n)]
                self.v = [npz[f"v{i}"] for i in range(n)]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"unreadable fedopt state: {exc}") from exc
        for i, (m, v, a) in enumerate(zip(self.m, self.v, self.model_in, strict=True)):
            if m.shape != a.shape or v.shape != a.shape:
                raise ValueError(f"fedopt state array {i} does not match the model's shape")


class _Spooled:
    """Updates kept on disk, checked as they arrive; reduced one array index at a time."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="combiner-agg-")
        self._files: list[str] = []
        self._shapes: list[tuple] | None = None
        self._dtypes: list[np.dtype] = []

    @property
    def count(self) -> int:
        return len(self._files)

    def add_npz(self, data: bytes, weight: float) -> None:
        if not weight > 0:
            raise BadUpdate(f"weight (num_examples) must be > 0, got {weight}")
        try:
            with NpzReader(data) as npz:
                names = _npz_arrays(npz)
                arrays = [npz[n] for n in names]  # one at a time would do; this checks CRCs
                shapes = [a.shape for a in arrays]
                dtypes = [_as_float(a[:0]).dtype for a in arrays]
                del arrays
        except BadUpdate:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise BadUpdate(f"not a readable npz model: {exc}") from exc
        if self._shapes is not None and shapes != self._shapes:
            raise BadUpdate(f"update shapes {shapes} differ from the first update's")
        path = os.path.join(self._dir.name, f"{len(self._files)}.npz")
        with open(path, "wb") as f:
            f.write(data)
        self._shapes, self._dtypes = shapes, dtypes
        self._files.append(path)

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def result(self) -> list[np.ndarray]:
        if not self._files:
            raise ValueError("no updates")
        files = [NpzReader(p) for p in self._files]  # lazy: nothing read yet
        try:
            out = []
            for i, dtype in enumerate(self._dtypes):
                # filled one decoded array at a time: K x this array, not twice that
                stack = np.empty((len(files), *self._shapes[i]), dtype=dtype)
                for k, f in enumerate(files):
                    stack[k] = f[str(i)]
                out.append(self.reduce(stack).astype(dtype, copy=False))
                del stack
            return out
        finally:
            for f in files:
                f.close()

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FedMedian(_Spooled):
    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0, overwrite_input=True)  # the stack is ours: no copy


class FedTrimmedAvg(_Spooled):
    def __init__(self, beta: float = 0.1) -> None:
        check_config("fedtrimmedavg", {"beta": beta})
        super().__init__()
        self.beta = beta

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        cut = int(self.beta * stack.shape[0])
        stack.sort(axis=0)  # in place: the stack is ours
        return stack[cut : stack.shape[0] - cut].mean(axis=0)
