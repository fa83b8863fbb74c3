"""Callbacks of the end-to-end test client (runs inside the real scaleout 1.0.0 client).

The package folder is put first on sys.path and this module is imported by its file stem,
so the stem is unique (protocol.md §14). The test sets E2E_DELTA and E2E_NUM_EXAMPLES.
"""

import os

import numpy as np
from scaleoututil.helpers.helpers import get_helper
from scaleoututil.utils.model import ScaleoutModel

HELPER = get_helper("numpyhelper")
DELTA = float(os.environ["E2E_DELTA"])
NUM_EXAMPLES = int(os.environ["E2E_NUM_EXAMPLES"])


def startup(client):
    client_id = client.client_id

    def train(model, client_settings):
        """Add this client's constant to every array (dtype kept)."""
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
