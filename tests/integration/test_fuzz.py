"""Fuzzing ModelInfer: hostile requests built field by field, and mutated request bytes.

Each request goes to a real `salvo serve` over a real socket. Every answer must be the one
the request deserves (see tests/fuzzing.py): never UNKNOWN or INTERNAL, never a valid
request refused or an invalid one run. Afterwards the server is alive, logged no
unexpected error, and still answers a known request exactly as before. The full run of
100,000+ requests is `make bench-fuzz`.
"""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salvo.domain.config import load_config
from salvo_client.proto import grpc_service_pb2 as pb
from tests.fuzzing import (
    HOSTILE_NAMES,
    HOSTILE_VERSIONS,
    UNEXPECTED_LOG,
    generic_infer,
    infer_requests,
    mutated_requests,
    send,
)
from tests.servers import InProcessServer

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

FUZZ = settings(
    max_examples=350,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _known_answer(target: str) -> np.ndarray:
    """mlp on a fixed input, through tritonclient (the independent client)."""
    x = tc.InferInput("input", [2, 64], "FP32")
    x.set_data_from_numpy(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))
    with tc.InferenceServerClient(target) as client:
        return client.infer("mlp", [x]).as_numpy("output")


@pytest.fixture(scope="module")
def configs(demo_repo):
    return {name: load_config(demo_repo / name) for name in ("mlp", "digits", "resnet")}


@pytest.fixture(scope="module")
def fuzzed(demo_server):
    """The demo server, with what it answered and logged before the fuzzing, checked after."""
    before = _known_answer(demo_server.grpc_target)
    first_line = len(demo_server.lines)
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        yield generic_infer(channel)
    assert demo_server.proc.poll() is None, demo_server.log()
    logged = "".join(demo_server.lines[first_line:])
    assert not [word for word in UNEXPECTED_LOG if word in logged], logged[-4000:]
    np.testing.assert_array_equal(_known_answer(demo_server.grpc_target), before)


def test_requests_built_field_by_field_get_the_status_they_deserve(fuzzed, configs):
    @FUZZ
    @given(st.data())
    def run(data):
        case = data.draw(infer_requests(configs))
        assert send(fuzzed, case) is None, case

    run()


def test_mutated_request_bytes_never_get_unknown_or_internal(fuzzed, configs):
    small = {name: configs[name] for name in ("mlp", "digits")}

    @FUZZ
    @given(st.data())
    def run(data):
        case = data.draw(mutated_requests(small))
        assert send(fuzzed, case) is None, case

    run()


def _mlp(name: str = "mlp", version: str = "") -> bytes:
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(bytes(256))
    return request.SerializeToString()


@pytest.mark.parametrize("version", HOSTILE_VERSIONS)
def test_every_hostile_version_is_not_found(fuzzed, version):
    with pytest.raises(grpc.RpcError) as info:
        fuzzed(_mlp(version=version), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert "has no version" in info.value.details()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_every_hostile_model_name_is_refused(fuzzed, name):
    with pytest.raises(grpc.RpcError) as info:
        fuzzed(_mlp(name=name), timeout=30)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert "model name" in info.value.details() or "unknown model" in info.value.details()


GARBAGE = [b"\xff\xff\xff", b"\x0a\xff", b"\x08", b"\x12\x02\xc3"]


@pytest.mark.parametrize("payload", GARBAGE)
def test_an_undecodable_message_is_invalid_argument_naming_the_message(fuzzed, payload):
    with pytest.raises(grpc.RpcError) as info:
        fuzzed(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in info.value.details()
    assert "inference.ModelInferRequest" in info.value.details()


def test_an_undecodable_stream_message_ends_the_stream_with_invalid_argument(demo_server):
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        stream = channel.stream_stream(
            STREAM,
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = stream(iter([_mlp(), GARBAGE[0]]), timeout=30)
        first = next(answers)
        assert not first.error_message and len(first.infer_response.raw_output_contents) == 1
        with pytest.raises(grpc.RpcError) as info:
            next(answers)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in info.value.details()


def test_an_undecodable_stream_message_past_the_rate_limit_still_ends_the_stream(
    demo_repo, tmp_path
):
    """The rate limit checks each request of a stream; a message that did not parse has no
    model to check, and ends the stream INVALID_ARGUMENT naming the message, as it would
    without the limit, once the answers before it are out."""
    shutil.copytree(demo_repo / "mlp", tmp_path / "mlp")
    with (
        InProcessServer(tmp_path, rate_limit_per_s=0.01, rate_limit_burst=1) as server,
        grpc.insecure_channel(server.grpc_target) as channel,
    ):
        stream = channel.stream_stream(
            STREAM,
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        # The burst's one token goes to the first request; the second is past the limit.
        answers = stream(iter([_mlp(), GARBAGE[0]]), timeout=30)
        first = next(answers)  # answered before the stream ends
        assert not first.error_message and len(first.infer_response.raw_output_contents) == 1
        with pytest.raises(grpc.RpcError) as info:
            next(answers)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "inference.ModelInferRequest" in info.value.details()
