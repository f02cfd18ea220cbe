"""
The gRPC API's definition and the modules generated from it: the committed
modules are what ``grpcio-tools`` makes of ``octoplex/v1/multiplexer.proto``
now, and its messages carry the JSON API's vocabulary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from grpc_tools import protoc

from octoplex.errors import KINDS
from octoplex.grpc_wire import KIND_VALUES
from octoplex.timings import PHASES
from octoplex.v1 import multiplexer_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("octoplex/v1/multiplexer.proto")
GENERATED = ("multiplexer_pb2.py", "multiplexer_pb2.pyi", "multiplexer_pb2_grpc.py")


def generate(into: Path) -> None:
    """Run protoc, as docs/development.md says to, writing under ``into``."""
    target = into / PROTO.parent
    target.mkdir(parents=True)
    shutil.copy(ROOT / PROTO, target)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{into}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(into / PROTO),
        ]
    )
    assert status == 0


@pytest.mark.parametrize("name", GENERATED)
def test_committed_modules_match_the_proto(tmp_path: Path, name: str) -> None:
    """Regenerating from the .proto gives the committed file, byte for byte."""
    generate(tmp_path)
    fresh = (tmp_path / PROTO.parent / name).read_bytes()
    committed = (ROOT / PROTO.parent / name).read_bytes()
    assert fresh == committed, (
        f"{PROTO.parent / name} does not match {PROTO}; regenerate it (docs/development.md)"
    )


def test_kind_enum_is_the_json_kinds() -> None:
    """Every JSON error kind has its Kind value, and Kind has no other."""
    names = [v.name for v in pb.Kind.DESCRIPTOR.values if v.number != 0]
    assert names == [f"KIND_{kind.upper()}" for kind in KINDS]
    assert sorted(KIND_VALUES.values()) == list(range(1, len(KINDS) + 1))


def test_timings_message_has_every_phase() -> None:
    """The Timings message has a field for each phase of a JSON timings report."""
    fields = [f.name for f in pb.Timings.DESCRIPTOR.fields]
    assert fields == [*PHASES, "total_msec", "reused"]
