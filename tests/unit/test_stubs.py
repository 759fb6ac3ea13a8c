"""The committed stubs are what tools/gen_protos.py makes now, and they are wire-compatible
with tritonclient's (same names, numbers and types), in one process thanks to our pool."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from salvo_client.proto import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "client" / "salvo_client" / "proto"


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(tmp_path)], check=True
    )
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(
        p.name for p in STUBS.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    )
    assert generated == committed
    stale = [n for n in generated if (tmp_path / n).read_text() != (STUBS / n).read_text()]
    assert not stale, f"stale stubs {stale}: run `make protos`"


def _fields(descriptor):
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def _compare(ours, theirs, path=""):
    """Every field of ours exists in theirs with the same number, type and label."""
    mine, other = _fields(ours), _fields(theirs)
    for name, spec in mine.items():
        assert name in other, f"{path}{ours.name}.{name} is not in Triton's message"
        assert spec == other[name], f"{path}{ours.name}.{name}: {spec} != {other[name]}"
    for nested in ours.nested_types:
        _compare(nested, theirs.nested_types_by_name[nested.name], f"{path}{ours.name}.")
    for enum in ours.enum_types:
        theirs_enum = theirs.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.values}.items() <= {
            v.name: v.number for v in theirs_enum.values
        }.items()


@pytest.mark.parametrize(
    ("ours", "theirs"), [(grpc_service_pb2, triton_service), (model_config_pb2, triton_config)]
)
def test_messages_match_triton_wire_format(ours, theirs):
    assert ours.DESCRIPTOR.package == theirs.DESCRIPTOR.package == "inference"
    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        _compare(message, theirs.DESCRIPTOR.message_types_by_name[name])
    for name, enum in ours.DESCRIPTOR.enum_types_by_name.items():
        assert {v.name: v.number for v in enum.values}.items() <= {
            v.name: v.number for v in theirs.DESCRIPTOR.enum_types_by_name[name].values
        }.items()


def test_service_methods_match_triton():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )
    assert len(ours.methods) == 12


def test_stubs_import_without_torch():
    # The client package must stay light: importing the stubs pulls in no torch.
    code = "import sys, salvo_client.proto.grpc_service_pb2_grpc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert importlib.util.find_spec("salvo_client") is not None
