"""Start the real scaleout 1.0.0 client attached directly to a combiner (docs/protocol.md §14 b).

Run with the client venv's python, from a folder holding client/scaleout.yaml:
    python client_driver.py HOST PORT CLIENT_ID NAME poll|stream

It builds ImporterClient as `scaleout client start --combiner ... --local-package` does,
but sets the EdgeClient's id and name first (the direct-attach path never copies them,
docs/protocol.md §3.1), so the Announce VersionCheck stays in the path. `stream` runs the
client with run(with_heartbeat=True, with_polling=False): SendHeartbeat + TaskStream.
"""

import functools
import sys

from scaleout.client.connect import ClientOptions
from scaleout.client.importer_client import ImporterClient


def main() -> int:
    host, port, client_id, name, mode = sys.argv[1:6]
    if mode not in ("poll", "stream"):
        print(f"driver: unknown mode {mode!r}", file=sys.stderr)
        return 2
    client = ImporterClient(
        api_url=None,
        client_obj=ClientOptions(name, "local", client_id=client_id),
        combiner_host=host,
        combiner_port=int(port),
    )
    client.edge_client.set_client_id(client_id)
    client.edge_client.set_name(name)
    if mode == "stream":
        edge = client.edge_client
        edge.run = functools.partial(edge.run, with_heartbeat=True, with_polling=False)
    print(f"driver: starting client {client_id} ({mode}) against {host}:{port}", flush=True)
    client.start()
    print("driver: client.start() returned", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
