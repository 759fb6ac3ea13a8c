"""Every class of malformed request gets its status and a message naming the field; the
server keeps serving after each (a good request is answered right after)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def mlp_request(rows: int = 1, cols: int = 64, **overrides) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp", id="bad")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, cols])
    request.raw_input_contents.append(np.zeros((rows, cols), np.float32).tobytes())
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def _unknown_input():
    r = mlp_request()
    r.inputs[0].name = "inputs"
    return r


def _missing_input():
    r = pb.ModelInferRequest(model_name="mlp")
    return r


def _wrong_datatype():
    r = mlp_request()
    r.inputs[0].datatype = "FP64"
    r.raw_input_contents[0] = np.zeros((1, 64), np.float64).tobytes()
    return r


def _unknown_datatype():
    r = mlp_request()
    r.inputs[0].datatype = "FP33"
    return r


def _wrong_rank():
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="input", datatype="FP32", shape=[64])
    r.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    return r


def _wrong_dims():
    return mlp_request(cols=63)


def _byte_size():
    r = mlp_request()
    r.raw_input_contents[0] = r.raw_input_contents[0][:-4]
    return r


def _both_encodings():
    r = mlp_request()
    r.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return r


def _typed_count():
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(
        [0.0] * 10
    )
    return r


def _typed_wrong_field():
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.int_contents.extend(
        [0] * 64
    )
    return r


def _batch_too_large():
    return mlp_request(rows=129)


def _unknown_output():
    r = mlp_request()
    r.outputs.add(name="logits")
    return r


def _raw_count():
    r = mlp_request()
    r.raw_input_contents.append(b"extra")
    return r


def _negative_dim():
    r = mlp_request()
    r.inputs[0].shape[0] = -1
    return r


def _bad_parameter():
    r = mlp_request()
    r.parameters["timeout"].string_param = "soon"
    return r


CASES = {
    "unknown input": (_unknown_input, INVALID, "unknown input 'inputs' for model 'mlp'"),
    "missing input": (_missing_input, INVALID, "missing input 'input' for model 'mlp'"),
    "wrong datatype": (_wrong_datatype, INVALID, "input 'input': expected datatype FP32, got FP64"),
    "unknown datatype": (_unknown_datatype, INVALID, "input 'input'"),
    "wrong rank": (_wrong_rank, INVALID, "input 'input': expected shape [-1, 64], got [64]"),
    "wrong dims": (_wrong_dims, INVALID, "input 'input': expected shape [-1, 64], got [1, 63]"),
    "byte size": (_byte_size, INVALID, "input 'input'"),
    "both encodings": (_both_encodings, INVALID, "input 'input'"),
    "typed count": (_typed_count, INVALID, "input 'input'"),
    "typed field": (_typed_wrong_field, INVALID, "input 'input'"),
    "batch too large": (
        _batch_too_large,
        INVALID,
        "input 'input': batch size 129 exceeds max_batch_size 128 of model 'mlp'",
    ),
    "unknown output": (_unknown_output, INVALID, "unknown output 'logits' for model 'mlp'"),
    "raw count": (_raw_count, INVALID, "raw_input_contents"),
    "negative dim": (_negative_dim, INVALID, "input 'input'"),
    "bad parameter": (_bad_parameter, INVALID, "parameter 'timeout'"),
    "unknown model": (lambda: mlp_request(model_name="nope"), NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (
        lambda: mlp_request(model_version="9"),
        NOT_FOUND,
        "model 'mlp' has no version 9",
    ),
    "path-like model name": (
        lambda: mlp_request(model_name="../mlp"),
        INVALID,
        "invalid model name '../mlp'",
    ),
    "absolute model path": (
        lambda: mlp_request(model_name="/etc/passwd"),
        INVALID,
        "invalid model name '/etc/passwd'",
    ),
}


@pytest.fixture(scope="module")
def stub(demo_server):
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_request_gets_status_and_message_then_server_serves(stub, case):
    build, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(build(), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert "Traceback" not in info.value.details()
    good = stub.ModelInfer(mlp_request(id="good"), timeout=30)
    assert good.id == "good"
    assert np.frombuffer(good.raw_output_contents[0], np.float32).shape == (10,)


def test_tritonclient_sees_the_same_errors(demo_server):
    with tc.InferenceServerClient(demo_server.grpc_target) as client:
        x = tc.InferInput("input", [1, 64], "FP64")
        x.set_data_from_numpy(np.zeros((1, 64), np.float64))
        with pytest.raises(tc.InferenceServerException) as info:
            client.infer("mlp", [x])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "expected datatype FP32, got FP64" in info.value.message()
        y = tc.InferInput("input", [1, 64], "FP32")
        y.set_data_from_numpy(np.ones((1, 64), np.float32))
        assert client.infer("mlp", [y]).as_numpy("output").shape == (1, 10)


def test_nan_and_inf_are_data_not_errors(stub):
    request = mlp_request()
    values = np.zeros((1, 64), np.float32)
    values[0, :3] = [np.nan, np.inf, -np.inf]
    request.raw_input_contents[0] = values.tobytes()
    response = stub.ModelInfer(request, timeout=30)
    assert len(response.raw_output_contents[0]) == 40
