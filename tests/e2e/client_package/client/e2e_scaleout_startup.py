"""Callbacks of the end-to-end test client (runs inside the real scaleout 1.0.0 client).

The package folder is put first on sys.path and this module is imported by its file stem,
so the stem is unique (docs/protocol.md §14). The test sets E2E_DELTA and E2E_NUM_EXAMPLES,
and optionally E2E_TRAIN_SECONDS (training takes that long: a slow client) with
E2E_SLOW_CALLS (the 1-based training calls that are slow, e.g. "2"; empty: all of them),
and optionally E2E_HOLD_DIR with E2E_HOLD_CALLS (training call k, for each k listed, waits
until the test creates the file E2E_HOLD_DIR/release-k: the test decides when it ends).
"""

import itertools
import os
import time

import numpy as np
from scaleoututil.helpers.helpers import get_helper
from scaleoututil.utils.model import ScaleoutModel

HELPER = get_helper("numpyhelper")
DELTA = float(os.environ["E2E_DELTA"])
NUM_EXAMPLES = int(os.environ["E2E_NUM_EXAMPLES"])
TRAIN_SECONDS = float(os.environ.get("E2E_TRAIN_SECONDS") or 0)
SLOW_CALLS = {int(c) for c in os.environ.get("E2E_SLOW_CALLS", "").split(",") if c.strip()}
HOLD_DIR = os.environ.get("E2E_HOLD_DIR", "")
HOLD_CALLS = {int(c) for c in os.environ.get("E2E_HOLD_CALLS", "").split(",") if c.strip()}
HOLD_LIMIT = 600.0  # seconds: a held call gives up (raises) if the test never releases it


def hold(call: int) -> None:
    """Wait until the test releases this training call (creates HOLD_DIR/release-<call>)."""
    release = os.path.join(HOLD_DIR, f"release-{call}")
    print(f"e2e: training call {call} waits for {release}", flush=True)
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"training call {call} was never released")
        time.sleep(0.05)
    print(f"e2e: training call {call} released", flush=True)


def startup(client):
    client_id = client.client_id
    calls = itertools.count(1)

    def train(model, client_settings):
        """Add this client's constant to every array (dtype kept)."""
        call = next(calls)
        if TRAIN_SECONDS > 0 and (not SLOW_CALLS or call in SLOW_CALLS):
            print(f"e2e: training call {call} takes {TRAIN_SECONDS}s", flush=True)
            time.sleep(TRAIN_SECONDS)
        if HOLD_DIR and call in HOLD_CALLS:
            hold(call)
        params = model.get_model_params(HELPER)
        out = [p + np.asarray(DELTA, dtype=p.dtype) for p in params]
        meta = {"training_metadata": {"num_examples": NUM_EXAMPLES}}
        return ScaleoutModel.from_model_params(out, helper=HELPER), meta

    def validate(model):
        params = model.get_model_params(HELPER)
        return {
            "client_id": client_id,
            "num_arrays": len(params),
            "shapes": [list(p.shape) for p in params],
            "sums": [float(p.sum()) for p in params],
        }

    def predict(model):
        params = model.get_model_params(HELPER)
        return {"client_id": client_id, "prediction": [float(p.max()) for p in params]}

    def echo(params):
        return {"client_id": client_id, "echo": params, "delta": DELTA}

    client.set_train_callback(train)
    client.set_validate_callback(validate)
    client.set_predict_callback(predict)
    client.set_custom_callback("echo", echo)
