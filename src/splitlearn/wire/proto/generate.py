"""Regenerate splitlearn_pb2.py (needs grpcio-tools, pinned with protobuf in constraints.txt)."""

from pathlib import Path

from grpc_tools import protoc

here = Path(__file__).parent
raise SystemExit(protoc.main(["protoc", f"-I{here}", f"--python_out={here}", f"--pyi_out={here}", str(here / "splitlearn.proto")]))
