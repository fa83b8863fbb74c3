"""Generate the Python stubs for proto/scaleout.proto into combiner/pb/.

The stubs are committed; tests/test_proto.py regenerates them into a temp folder
and fails if they differ, so the committed files always match the .proto.

Run: python proto/generate.py [OUT_DIR]
"""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Map the virtual path combiner/pb/scaleout.proto onto proto/, so the generated
# grpc module imports `combiner.pb.scaleout_pb2` (a package-relative import) and the
# descriptor is registered under a name that cannot clash with the real client's.
VIRTUAL = "combiner/pb"


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{VIRTUAL}={ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"{VIRTUAL}/scaleout.proto",
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with code {rc}")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
