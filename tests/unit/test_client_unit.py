"""The client's own logic, without sockets: its tensor codec (round trips for every dtype,
the server's codec and tritonclient as referees), requests, retry and channel set-up,
error mapping, trace context and the CLI's input parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pytest
import tritonclient.utils as tutils
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo.domain.status import (
    DeadlineExceeded as ServerDeadlineExceeded,
)
from salvo.domain.status import (
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    SalvoError,
)
from salvo.domain.tensors import decode_tensor_raw, encode_tensor_raw
from salvo.frontends.grpc.status import grpc_status
from salvo_client import channel, errors
from salvo_client.channel import channel_setup, resolve_target, trace_metadata
from salvo_client.commands import _parse_input
from salvo_client.messages import build_request, result_of
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.retry import RetryPolicy
from salvo_client.tensors import datatype_of, decode_outputs, decode_tensor, encode_tensor

FIXED = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
EXAMPLES = settings(max_examples=40, deadline=None)


def wire(datatype: str, array: np.ndarray) -> tuple[str, bytes]:
    """Encode as the client does, then as the bytes would arrive (a bytes object)."""
    got_type, raw = encode_tensor("x", array)
    assert got_type == datatype
    return got_type, bytes(raw)


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("datatype", sorted(FIXED))
@EXAMPLES
@given(data=st.data())
def test_fixed_width_round_trip_is_bit_exact(datatype, data):
    dtype = np.dtype(FIXED[datatype])
    # Both byte orders: the wire is little-endian whatever the array.
    order = data.draw(st.sampled_from(["<", ">"])) if dtype.itemsize > 1 else "="
    array = data.draw(hnp.arrays(dtype.newbyteorder(order), SHAPES))
    _, raw = wire(datatype, array)
    decoded = decode_tensor("x", datatype, array.shape, raw)
    assert decoded.shape == array.shape
    assert decoded.dtype == dtype.newbyteorder("<")
    assert decoded.tobytes() == array.astype(dtype.newbyteorder("<")).tobytes()
    # The server reads exactly what the client meant.
    server = decode_tensor_raw("x", datatype, array.shape, raw)
    assert server.tobytes() == decoded.tobytes()


@pytest.mark.parametrize("datatype", sorted(FIXED))
@EXAMPLES
@given(data=st.data())
def test_server_encoded_outputs_decode(datatype, data):
    array = data.draw(hnp.arrays(FIXED[datatype], SHAPES))
    raw = encode_tensor_raw(datatype, array)
    decoded = decode_tensor("y", datatype, array.shape, raw)
    assert decoded.tobytes() == array.tobytes()


def test_fixed_width_outputs_are_zero_copy_views():
    raw = np.arange(6, dtype="<f4").tobytes()
    decoded = decode_tensor("y", "FP32", [2, 3], raw)
    assert not decoded.flags.writeable and not decoded.flags.owndata
    assert decoded.base is not None
    np.testing.assert_array_equal(decoded, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_non_contiguous_input_is_sent_row_major():
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran-ordered view
    _, raw = wire("INT32", array)
    np.testing.assert_array_equal(decode_tensor("x", "INT32", array.shape, raw), array)


@EXAMPLES
@given(array=hnp.arrays(np.uint16, SHAPES))
def test_bfloat16_travels_as_its_bits(array):
    bf16 = array.view(ml_dtypes.bfloat16)
    _, raw = wire("BF16", bf16)
    assert raw == array.astype("<u2").tobytes()
    assert decode_tensor("x", "BF16", array.shape, raw).tobytes() == raw


@EXAMPLES
@given(array=hnp.arrays(object, SHAPES, elements=st.binary(max_size=12)))
def test_bytes_round_trip_with_tritonclient_and_server_as_referees(array):
    _, raw = wire("BYTES", array)
    if array.size:
        assert raw == tutils.serialize_byte_tensor(array).item()
    decoded = decode_tensor("x", "BYTES", array.shape, raw)
    assert decoded.dtype == object and decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()
    assert all(type(x) is bytes for x in decoded.flat)
    assert decode_tensor_raw("x", "BYTES", array.shape, raw).tolist() == array.tolist()
    assert decode_tensor("x", "BYTES", array.shape, encode_tensor_raw("BYTES", array)).tolist() == (
        array.tolist()
    )


@EXAMPLES
@given(array=hnp.arrays(object, SHAPES, elements=st.text(max_size=8)))
def test_str_elements_travel_as_utf8(array):
    _, raw = wire("BYTES", array)
    decoded = decode_tensor("x", "BYTES", array.shape, raw)
    assert decoded.tolist() == np.vectorize(str.encode, otypes=[object])(array).tolist()


def test_numpy_string_arrays_are_bytes():
    _, raw = wire("BYTES", np.array(["hé", "w"]))
    assert raw == b"\x03\x00\x00\x00h\xc3\xa9\x01\x00\x00\x00w"
    _, raw = wire("BYTES", np.array([b"ab", b""]))
    assert raw == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert decode_tensor("x", "BYTES", [2], raw).tolist() == [b"ab", b""]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x05\x00\x00\x00ab",  # declares more than there is
        b"\x01\x00\x00\x00a\x00",  # trailing byte
        b"\x01\x00",  # a short length
    ],
)
def test_malformed_bytes_output_is_an_internal_error(raw):
    with pytest.raises(errors.InternalError, match="malformed BYTES"):
        decode_tensor("y", "BYTES", [1], raw)


def test_wrong_output_size_is_an_internal_error():
    with pytest.raises(errors.InternalError, match="needs 8"):
        decode_tensor("y", "FP32", [2], b"\x00" * 7)
    with pytest.raises(errors.InternalError, match="FP33"):
        decode_tensor("y", "FP33", [2], b"")


@pytest.mark.parametrize("dtype", [np.complex64, "datetime64[s]", "V4", np.float128])
def test_dtypes_without_a_v2_datatype_are_refused(dtype):
    with pytest.raises(TypeError, match="no v2 datatype"):
        datatype_of(np.dtype(dtype))


def test_inputs_must_be_arrays():
    with pytest.raises(TypeError, match="expected a numpy array, got list"):
        encode_tensor("x", [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BYTES elements must be bytes or str, got int"):
        encode_tensor("x", np.array([1, b"a"], dtype=object))


def test_typed_contents_outputs_decode():
    response = pb.ModelInferResponse()
    response.outputs.add(name="a", datatype="INT32", shape=[2]).contents.int_contents.extend([1, 2])
    response.outputs.add(name="b", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"z")
    out = decode_outputs(response)
    np.testing.assert_array_equal(out["a"], np.array([1, 2], np.int32))
    assert out["b"].tolist() == [b"z"]


# --------------------------------------------------------------------------- requests


def test_request_carries_raw_inputs_parameters_and_outputs():
    x = np.ones((2, 3), np.float32)
    request = build_request(
        "m",
        {"x": x, "s": np.array([b"q"], dtype=object)},
        outputs="y",
        version=3,
        priority=2,
        parameters={"cache": False, "timeout": 50, "ratio": 0.5, "tag": "t"},
        request_id="r1",
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r1")
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("x", "FP32", [2, 3]),
        ("s", "BYTES", [1]),
    ]
    assert request.raw_input_contents[0] == x.tobytes()
    assert not any(i.HasField("contents") for i in request.inputs)
    assert [o.name for o in request.outputs] == ["y"]
    kinds = {k: v.WhichOneof("parameter_choice") for k, v in request.parameters.items()}
    assert kinds == {
        "priority": "int64_param",
        "cache": "bool_param",
        "timeout": "int64_param",
        "ratio": "double_param",
        "tag": "string_param",
    }
    with pytest.raises(ValueError, match="priority given both"):
        build_request("m", {}, priority=1, parameters={"priority": 2})
    with pytest.raises(TypeError, match="parameter 'p'"):
        build_request("m", {}, parameters={"p": [1]})  # type: ignore[dict-item]


def test_stream_results_carry_outputs_or_a_typed_error():
    ok = pb.ModelStreamInferResponse()
    ok.infer_response.id = "a"
    ok.infer_response.outputs.add(name="y", datatype="INT64", shape=[1])
    ok.infer_response.raw_output_contents.append(np.int64(7).tobytes())
    result = result_of(ok)
    assert result.ok and result.request_id == "a" and result.unwrap()["y"].tolist() == [7]

    failed = pb.ModelStreamInferResponse(error_message="unknown model 'x'")
    failed.infer_response.id = "b"
    result = result_of(failed)
    assert not result.ok and isinstance(result.error, errors.NotFound)
    assert result.error.request_id == "b"
    with pytest.raises(errors.NotFound, match="unknown model 'x'"):
        result.unwrap()

    # A status the server states wins over the message.
    failed.infer_response.parameters[
        errors.STREAM_STATUS_PARAMETER
    ].int64_param = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert isinstance(result_of(failed).error, errors.ResourceExhausted)
    failed.infer_response.parameters[errors.STREAM_STATUS_PARAMETER].string_param = "UNAVAILABLE"
    assert isinstance(result_of(failed).error, errors.Unavailable)


# --------------------------------------------------------------------------- errors

SERVER_ERRORS: list[SalvoError] = [
    ModelNotFound("unknown model 'nope'"),
    ModelNotFound("model 'mlp' is not in the repository"),
    ModelNotFound("model 'mlp' has no version 7 (serving [1])"),
    ModelUnavailable("model 'mlp' is loading"),
    ModelUnavailable("model 'mlp' is unavailable: failed"),
    ModelUnavailable("model 'mlp' is unloading"),
    ModelUnavailable("failed to load model 'mlp': bad file"),
    InvalidRequest("input 'input': expected shape [-1, 64], got [1, 63]"),
    InvalidRequest("unknown input 'inputs' for model 'mlp' (inputs: input)"),
    InvalidRequest("missing input 'input' for model 'mlp'"),
    InvalidRequest("unknown output 'z' for model 'mlp' (outputs: output)"),
    InvalidRequest("raw_input_contents holds 2 entries, but the request has 1 inputs"),
    InvalidRequest("parameter 'priority' must be an integer, got 'x'"),
    Overloaded("queue full: 8 requests queued (max_queue_size)"),
    ServerDeadlineExceeded("request timed out after waiting in the queue of model 'mlp'"),
    ModelFailed("model 'mlp' raised RuntimeError: boom"),
    ModelFailed("model 'mlp' output 'output': expected FP32, got float64"),
    ModelFailed("model 'mlp' returned 2 outputs, its config declares 1"),
]


@pytest.mark.parametrize("exc", SERVER_ERRORS, ids=lambda e: e.message[:40])
def test_stream_errors_without_a_stated_status_are_classified_from_the_message(exc):
    assert errors.stream_error_status(exc.message) is grpc_status(exc)[0]


def test_every_status_maps_to_its_exception():
    for status, cls in [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    ]:
        exc = errors.error_for(status, "why")
        assert type(exc) is cls and exc.status is status and exc.message == "why"
        assert str(exc) == f"{status.name}: why"
    other = errors.error_for(grpc.StatusCode.UNIMPLEMENTED, "no")
    assert type(other) is errors.SalvoClientError


def test_rpc_errors_become_typed_exceptions():
    class FakeRpcError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "unknown model 'x'"

    exc = errors.from_rpc_error(FakeRpcError())
    assert isinstance(exc, errors.NotFound) and exc.message == "unknown model 'x'"


# --------------------------------------------------------------------------- channel


def test_retries_become_a_service_config_retry_policy():
    assert RetryPolicy.of(0) is None
    assert RetryPolicy.of(2) == RetryPolicy(max_attempts=3)
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=1.5)
    setup = _setup(retries=policy)
    options = dict(setup.options)
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "inference.GRPCInferenceService"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.050000000s",
        "maxBackoff": "1.500000000s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    no_retry = dict(_setup(retries=0).options)
    assert no_retry["grpc.enable_retries"] == 0
    assert "methodConfig" not in json.loads(no_retry["grpc.service_config"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 6}, "2 to 5"),
        ({"max_attempts": 1}, "2 to 5"),
        ({"retryable_status_codes": ("UNAVAILABLE", "INVALID_ARGUMENT")}, "never be retried"),
        ({"retryable_status_codes": ("NOPE",)}, "unknown status"),
        ({"initial_backoff_s": 0.001}, "at least 0.01"),
        ({"initial_backoff_s": 0.5, "max_backoff_s": 0.1}, "at least initial_backoff_s"),
    ],
)
def test_bad_retry_policies_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        RetryPolicy.of(-1)


def test_targets():
    assert resolve_target("dns:///svc:8001") == "dns:///svc:8001"
    assert resolve_target(["10.0.0.1:8001"]) == "10.0.0.1:8001"
    assert resolve_target(["127.0.0.1:8001", "127.0.0.2:8002"]) == (
        "ipv4:127.0.0.1:8001,127.0.0.2:8002"
    )
    assert resolve_target(["[::1]:8001", "[::2]:8002"]) == "ipv6:[::1]:8001,[::2]:8002"
    assert resolve_target(["localhost:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        resolve_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="expected host:port"):
        resolve_target(["127.0.0.1", "127.0.0.2:1"])
    with pytest.raises(ValueError, match="no schemes"):
        resolve_target(["dns:///a:1", "127.0.0.2:1"])


def _setup(**overrides: Any) -> channel.ChannelSetup:
    kwargs: dict[str, Any] = {
        "timeout_s": 5.0,
        "retries": 2,
        "tls": False,
        "root_certificates": None,
        "client_certificate": None,
        "client_key": None,
        "tls_server_name": None,
        "token": None,
        "headers": None,
        "max_message_bytes": 1234,
        "keepalive_time_s": 30.0,
        "keepalive_timeout_s": 5.0,
        "load_balancing": "round_robin",
        "channel_options": (),
    }
    kwargs.update(overrides)
    return channel_setup("127.0.0.1:1", **kwargs)


def test_channel_options_credentials_and_metadata():
    setup = _setup(token="tok", headers={"X-Team": "a"}, channel_options=[("grpc.x", 1)])
    options = dict(setup.options)
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.keepalive_time_ms"] == 30000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.x"] == 1
    assert setup.credentials is None
    assert setup.metadata == (("x-team", "a"), ("authorization", "Bearer tok"))
    assert setup.timeout(None) == 5.0 and setup.timeout(1.5) == 1.5

    secure = _setup(tls=True, token="tok", tls_server_name="svc")
    assert isinstance(secure.credentials, grpc.ChannelCredentials)
    assert secure.metadata == ()  # the token rides on the call credentials
    assert dict(secure.options)["grpc.ssl_target_name_override"] == "svc"
    with pytest.raises(ValueError, match="both client_certificate and client_key"):
        _setup(client_certificate=b"cert")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        _setup(timeout_s=0)


def test_trace_context_is_injected_when_opentelemetry_is_there(monkeypatch):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def inject(carrier):
        carrier["traceparent"] = parent
        carrier["tracestate"] = "k=v"

    monkeypatch.setattr(channel, "_otel_inject", inject)
    assert trace_metadata() == (("traceparent", parent), ("tracestate", "k=v"))
    setup = _setup(token="tok")
    assert setup.call_metadata() == (
        ("authorization", "Bearer tok"),
        ("traceparent", parent),
        ("tracestate", "k=v"),
    )

    def broken(carrier):
        raise RuntimeError("collector down")

    monkeypatch.setattr(channel, "_otel_inject", broken)
    assert trace_metadata() == ()
    monkeypatch.setattr(channel, "_otel_inject", None)
    assert trace_metadata() == () and setup.call_metadata() == (("authorization", "Bearer tok"),)


# --------------------------------------------------------------------------- CLI


def test_cli_inputs_from_json_and_npy(tmp_path: Path):
    name, array = _parse_input("x=[[1, 2], [3, 4]]", "FP32")
    assert name == "x" and array.dtype == np.float32 and array.shape == (2, 2)
    _, array = _parse_input("x=[1, 0]", "BOOL")
    assert array.dtype == np.bool_
    _, array = _parse_input('s=["a", "é"]', "BYTES")
    assert array.dtype == object and array.tolist() == [b"a", "é".encode()]
    path = tmp_path / "in.npy"
    np.save(path, np.arange(4, dtype=np.int16))
    _, array = _parse_input(f"x={path}", "FP32")  # a file keeps its own dtype
    assert array.dtype == np.int16 and array.tolist() == [0, 1, 2, 3]
    np.save(path, np.array([b"a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        _parse_input(f"x={path}", "FP32")
    with pytest.raises(ValueError, match="neither a .npy file nor valid JSON"):
        _parse_input("x=[1,", "FP32")
    with pytest.raises(ValueError, match="expected NAME=FILE.npy or NAME=JSON"):
        _parse_input("[1]", "FP32")
