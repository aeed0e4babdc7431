"""Regenerate the Python gRPC stubs from proto/: `python scripts/gen_proto.py [OUT_DIR]`.

axguard's own stubs live in the client distribution (clients/python/axguard_client/v1), so
a pipeline installs them without the server; the server imports them from there
(`axguard.v1` re-exports them). The vendored Open Inference Protocol (proto/inference) is
served, never called, by axguard: its stubs go to the server package
(service/axguard/transport/oip/). protoc writes `axguard/v1/…` and `inference/…` with absolute
imports; they are moved and the cross-module imports made relative. Tests regenerate them
into a temporary folder and fail on any difference.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


# protoc's package folder → where its stubs live, relative to the repository root.
DESTINATIONS = {"axguard": Path("clients/python/axguard_client"),
                "inference": Path("service/axguard/transport/oip")}


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir, laid out as in the
    repository (out_dir = the repository root rewrites the committed stubs)."""
    import grpc_tools

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted(Path(tmp).rglob("*_pb2*.py*")):
            # axguard/v1/x_pb2.py → clients/python/axguard_client/v1/x_pb2.py,
            # inference/x_pb2.py → service/axguard/transport/oip/x_pb2.py
            relative = path.relative_to(tmp)
            target = out_dir / DESTINATIONS[relative.parts[0]] / Path(*relative.parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            text = (path.read_text().replace("from axguard.v1 import ", "from . import ")
                    .replace("from inference import ", "from . import "))
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
    shutil.rmtree(ROOT / "clients" / "python" / "axguard_client" / "v1" / "__pycache__",
                  ignore_errors=True)
