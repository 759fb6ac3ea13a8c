"""The wire plan against the general path it stands in for.

Whatever request the plan takes, it must give the Prepared request that decode_inputs and
validate_request give; whatever it is asked to encode, the bytes that encode_outputs and
SerializeToString give. Anything else it must decline (None), so that the general path
answers, errors included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo.domain.config import ModelConfig
from salvo.domain.status import InvalidRequest
from salvo.domain.types import Prepared
from salvo.domain.validation import validate_request
from salvo.frontends.grpc.codec import decode_inputs, decode_parameters, encode_outputs
from salvo.frontends.grpc.wire.plan import WirePlan
from salvo_client.proto import grpc_service_pb2 as pb

BATCHED = ModelConfig(
    name="two",
    max_batch_size=8,
    inputs=(
        {"name": "a", "datatype": "FP32", "dims": (3,)},
        {"name": "b", "datatype": "INT64", "dims": (2, 2)},
    ),
    outputs=(
        {"name": "x", "datatype": "FP32", "dims": (3,)},
        {"name": "y", "datatype": "INT32", "dims": (1,)},
        {"name": "z", "datatype": "FP16", "dims": (2,)},
    ),
)
UNBATCHED = ModelConfig(
    name="flat",
    max_batch_size=0,
    inputs=({"name": "a", "datatype": "UINT8", "dims": (4,)},),
    outputs=({"name": "x", "datatype": "FP64", "dims": (4,)},),
)
DTYPES = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}


def general(config: ModelConfig, request: pb.ModelInferRequest) -> Prepared:
    """What the general path (`codec.decode_inputs`, `validate_request`) makes of `request`."""
    parameters = decode_parameters(request)
    return validate_request(
        config,
        1,
        request.id,
        decode_inputs(request),
        [o.name for o in request.outputs],
        parameters,
    )


def common_request(config: ModelConfig, rows: int, request_id: str = "") -> pb.ModelInferRequest:
    """The request perf_analyzer and tritonclient send: every input raw, in config order."""
    request = pb.ModelInferRequest(model_name=config.name, id=request_id)
    rng = np.random.default_rng(rows)
    for spec in config.inputs:
        shape = (rows, *spec.dims) if config.max_batch_size else spec.dims
        array = (rng.random(shape) * 100).astype(DTYPES[spec.datatype])
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def assert_same(fast: Prepared, slow: Prepared) -> None:
    assert (fast.model, fast.version, fast.id, fast.outputs, fast.rows, fast.parameters) == (
        slow.model, slow.version, slow.id, slow.outputs, slow.rows, slow.parameters,
    )  # fmt: skip
    assert len(fast.inputs) == len(slow.inputs)
    for mine, theirs in zip(fast.inputs, slow.inputs, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize(("config", "rows"), [(BATCHED, 1), (BATCHED, 8), (UNBATCHED, 1)])
def test_the_common_request_decodes_as_the_general_path_decodes_it(config, rows) -> None:
    request = common_request(config, rows, request_id="r-1")
    fast = WirePlan(config, 1).decode(request, decode_parameters(request))
    assert fast is not None
    assert_same(fast, general(config, request))


def test_requested_outputs_by_name_keep_the_order_asked() -> None:
    request = common_request(BATCHED, 2)
    request.outputs.add(name="z")
    request.outputs.add(name="x")
    fast = WirePlan(BATCHED, 1).decode(request, decode_parameters(request))
    assert fast is not None and fast.outputs == (2, 0)
    assert_same(fast, general(BATCHED, request))


def test_perf_analyzers_request_takes_the_plan() -> None:
    """perf_analyzer names the output it wants and adds a parameter it needs no action on."""
    request = common_request(BATCHED, 1, request_id="0")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.outputs.add(name="x")
    fast = WirePlan(BATCHED, 1).decode(request, decode_parameters(request))
    assert fast is not None
    assert fast.parameters == {"triton_enable_empty_final_response": True}
    assert_same(fast, general(BATCHED, request))


def _mutate(request: pb.ModelInferRequest, mutation: str, value: Any) -> None:
    """Change `request` in one way a caller might, right or wrong."""
    tensors = request.inputs
    if not tensors:  # "missing_input" took the only one: nothing left to change
        return
    if mutation == "name":
        tensors[value % len(tensors)].name = "nope"
    elif mutation == "datatype":
        tensors[value % len(tensors)].datatype = ["FP64", "INT32", "BYTES", "fp32"][value % 4]
    elif mutation == "batch":
        tensors[0].shape[0] = value - 2  # -2 .. 14: zero, negative and over max_batch_size
    elif mutation == "dims":
        tensors[-1].shape[-1] = value
    elif mutation == "rank":
        tensors[0].shape.append(1)
    elif mutation == "raw_length":
        request.raw_input_contents[0] = request.raw_input_contents[0][: value % 3 + 1]
    elif mutation == "extra_raw":
        request.raw_input_contents.append(b"\0" * 4)
    elif mutation == "missing_input":
        del request.inputs[-1]
        del request.raw_input_contents[-1]
    elif mutation == "swapped_order":
        if len(tensors) > 1:
            first, second = pb.ModelInferRequest.InferInputTensor(), tensors[1]
            first.CopyFrom(tensors[0])
            tensors[0].CopyFrom(second)
            tensors[1].CopyFrom(first)
            raws = request.raw_input_contents
            raws[0], raws[1] = raws[1], raws[0]
    elif mutation == "contents":
        tensors[0].contents.fp32_contents.extend([0.0] * (value % 2))
    elif mutation == "parameters":  # the keys the server acts on, and ones it passes on
        key = ["priority", "timeout", "triton_enable_empty_final_response", "tag"][value % 4]
        parameter, kind = request.parameters[key], value // 4 % 4
        if kind == 0:
            parameter.int64_param = value
        elif kind == 1:
            parameter.bool_param = bool(value % 2)
        elif kind == 2:
            parameter.string_param = str(value)
        else:
            parameter.int64_param = -value
    elif mutation == "outputs":
        for name in [["x"], ["x", "x"], ["nope"], ["y", "z"], []][value % 5]:
            request.outputs.add(name=name)
    elif mutation == "input_parameters":
        tensors[0].parameters["binary_data_size"].int64_param = value


MUTATIONS = st.sampled_from(
    [
        "none", "name", "datatype", "batch", "dims", "rank", "raw_length", "extra_raw",
        "missing_input", "swapped_order", "contents", "parameters", "outputs",
        "input_parameters",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    config=st.sampled_from([BATCHED, UNBATCHED]),
    rows=st.integers(1, BATCHED.max_batch_size + 1),
    mutations=st.lists(st.tuples(MUTATIONS, st.integers(0, 16)), max_size=3),
)
def test_the_plan_takes_only_what_the_general_path_accepts_and_agrees_with_it(
    config, rows, mutations
) -> None:
    request = common_request(config, rows if config.max_batch_size else 1, request_id="q")
    for mutation, value in mutations:
        if mutation != "none":
            _mutate(request, mutation, value)
    fast = WirePlan(config, 1).decode(request, decode_parameters(request))
    try:
        slow = general(config, request)
    except InvalidRequest:
        assert fast is None, "the plan took a request the general path refuses"
        return
    if fast is not None:
        assert_same(fast, slow)


def test_a_model_the_plan_cannot_take_leaves_every_request_to_the_general_path() -> None:
    for inputs in (
        ({"name": "s", "datatype": "BYTES", "dims": (1,)},),
        ({"name": "b", "datatype": "BOOL", "dims": (2,)},),
        ({"name": "v", "datatype": "FP32", "dims": (-1,)},),
    ):
        config = ModelConfig(
            name="m",
            max_batch_size=4,
            inputs=inputs,
            outputs=({"name": "x", "datatype": "FP32", "dims": (1,)},),
        )
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name=inputs[0]["name"], datatype=inputs[0]["datatype"], shape=[1, 2])
        request.raw_input_contents.append(b"\0\0\0\0\0\0\0\0")
        assert WirePlan(config, 1).decode(request, decode_parameters(request)) is None


def serialized(config: ModelConfig, request_id: str, outputs, arrays) -> bytes:
    """What the general path sends: a ModelInferResponse built with encode_outputs."""
    response = pb.ModelInferResponse(model_name=config.name, model_version="1", id=request_id)
    encode_outputs(
        response,
        (
            (config.outputs[i].name, config.outputs[i].datatype, array)
            for i, array in zip(outputs, arrays, strict=True)
        ),
    )
    return response.SerializeToString()


OUTPUT_DTYPES = {"FP32": np.float32, "INT32": np.int32, "FP16": np.float16}


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(0, 300),
    request_id=st.text(max_size=200),
    outputs=st.permutations([0, 1, 2]).flatmap(lambda p: st.integers(1, 3).map(lambda n: p[:n])),
    strided=st.booleans(),
)
def test_responses_are_the_bytes_the_general_path_serializes(
    rows, request_id, outputs, strided
) -> None:
    plan = WirePlan(BATCHED, 1)
    rng = np.random.default_rng(rows)
    arrays = []
    for i in outputs:
        spec = BATCHED.outputs[i]
        array = (rng.random((rows, *spec.dims)) * 1000).astype(OUTPUT_DTYPES[spec.datatype])
        if strided:  # a column of a wider array: not contiguous
            wide = np.repeat(array, 2, axis=-1)
            array = wide[..., ::2]
        arrays.append(array)
    for _ in range(2):  # the second time through, the output descriptions are remembered
        encoded = plan.encode(request_id, outputs, arrays)
        assert encoded == serialized(BATCHED, request_id, outputs, arrays)


def test_outputs_the_plan_does_not_encode_are_left_to_the_general_path() -> None:
    plan = WirePlan(BATCHED, 1)
    wrong_dtype = np.zeros((1, 3), np.float64)  # the general path names the mismatch
    assert plan.encode("", (0,), [wrong_dtype]) is None
    big_endian = np.zeros((1, 3), ">f4")
    assert plan.encode("", (0,), [big_endian]) is None
    bf16 = ModelConfig(
        name="h",
        max_batch_size=4,
        inputs=({"name": "a", "datatype": "FP32", "dims": (1,)},),
        outputs=({"name": "x", "datatype": "BF16", "dims": (1,)},),
    )
    assert WirePlan(bf16, 1).encode("", (0,), [np.zeros((1, 1), np.uint16)]) is None
