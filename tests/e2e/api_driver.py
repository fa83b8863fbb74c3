"""The published control-plane client as an operator's notebook uses it, run with the client
venv's python (nothing of this repository on its path):

    python -I api_driver.py URL STEP ARGS_JSON

The class is ``scaleoututil.api.client.Scaleout`` in scaleoututil 1.0.0 (the docs call it
the APIClient). It reads the admin refresh token from SCALEOUT_AUTH_TOKEN itself, so the token
is on no command line, and trades it at URL/api/auth/refresh for an admin access token.
Prints one JSON object: what the calls returned, as they returned it.

Steps:
* upload: {"seed", "package", "package_name"}: set_active_model, set_active_package;
* train: {"rounds", "min_clients", "round_timeout", "deadline", "download",
  "server_functions"}: start_session (fedavg, or with server_functions() if asked), waits
  (up to deadline seconds) for session_is_finished, then reads back the session, its rounds
  and validations, the active model and its trail, and downloads the active model to the
  path "download".
"""

import json
import sys
import time

import numpy as np
from scaleoututil.api.client import Scaleout as APIClient
from scaleoututil.serverfunctions.serverfunctionsbase import ServerFunctionsBase


def upload(api: APIClient, args: dict) -> dict:
    return {
        "model": api.set_active_model(args["seed"]),
        "package": api.set_active_package(args["package"], "numpyhelper", args["package_name"]),
        "active_package": api.get_active_package(),
        "checksum": api.get_package_checksum(),
    }


def server_functions():
    """A user's class as a notebook might define it (the APIClient sends inspect.getsource
    of it, indented here since it is defined in a function): train every client but the
    last by id, and aggregate with the coordinate-wise maximum instead of a mean."""

    class MaxOfTheOthers(ServerFunctionsBase):
        def client_selection(self, client_ids, round_type):
            return sorted(client_ids)[:-1]

        def client_settings(self, global_model):
            return {"chosen_by": "server_functions"}

        def aggregate(self, previous_global, client_updates):
            models = [params for params, _ in client_updates.values()]
            return [np.max(np.stack([m[i] for m in models]), axis=0)
                    for i in range(len(previous_global))]  # fmt: skip

    return MaxOfTheOthers


def train(api: APIClient, args: dict) -> dict:
    user = server_functions() if args.get("server_functions") else None
    started = api.start_session(
        name=args.get("name"),
        rounds=args["rounds"],
        round_timeout=args["round_timeout"],
        min_clients=args["min_clients"],
        requested_clients=args["min_clients"],
        helper="numpyhelper",
        server_functions=user,
    )
    session_id = started.get("session_id")
    if not session_id:
        return {"started": started}
    deadline = time.monotonic() + args["deadline"]
    while not api.session_is_finished(session_id):
        if time.monotonic() > deadline:
            return {"started": started, "timeout": True, "session": api.get_session(session_id)}
        time.sleep(0.5)
    active = api.get_active_model()
    return {
        "started": started,
        "status": api.get_session_status(session_id),
        "session": api.get_session(session_id),
        "by_name": api.get_session(name=args["name"]) if args.get("name") else None,
        "rounds": api.get_rounds(filter={"session_id": session_id}),
        "validations": api.get_validations(session_id=session_id),
        "validations_count": api.get_validations_count(session_id=session_id),
        "active_model": active,
        "trail": api.get_model_trail(),
        "download": api.download_model(active["model_id"], args["download"]),
    }


def main() -> int:
    url, step, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    api = APIClient(url)
    result = {"upload": upload, "train": train}[step](api, args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
