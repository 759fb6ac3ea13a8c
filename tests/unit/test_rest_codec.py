"""The REST codec with tritonclient.http as referee: what it sends (JSON and binary
tensors, every datatype) decodes to its arrays, what we answer it reads back, and every
malformed body is refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import tritonclient.http as thttp
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http import _utils as tutils

from salvo.domain.config import ModelConfig, TensorConfig
from salvo.domain.datatypes import DATATYPES
from salvo.domain.status import InvalidRequest
from salvo.domain.types import InferResponse
from salvo.frontends.http.codec import RestRequest, encode_response, json_tensor, read_header
from tests.unit.test_codec import assert_same, triton_view

ALL = sorted(DATATYPES)
JSON = [d for d in ALL if d != "BF16"]  # tritonclient sends BF16 as binary data only
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
EXAMPLES = settings(max_examples=25, deadline=None)


def arrays(datatype: str, json: bool) -> st.SearchStrategy[np.ndarray]:
    """Arrays of the datatype; what JSON can carry where `json` (finite numbers, text)."""
    if datatype == "BYTES":
        elements = st.text(max_size=8).map(str.encode) if json else st.binary(max_size=8)
        return hnp.arrays(object, SHAPES, elements=elements)
    dtype = DATATYPES[datatype].numpy
    if json and datatype == "BF16":  # finite bit patterns: the exponent not all ones
        finite = st.integers(0, 0xFFFF).filter(lambda bits: (bits >> 7) & 0xFF != 0xFF)
        return hnp.arrays(dtype, SHAPES, elements=finite)
    if json and dtype.kind == "f":
        return hnp.arrays(dtype, SHAPES, elements={"allow_nan": False, "allow_infinity": False})
    return hnp.arrays(dtype, SHAPES)


def config_for(*inputs: tuple[str, str, tuple[int, ...]]) -> ModelConfig:
    return ModelConfig(
        name="m",
        inputs=tuple(TensorConfig(name=n, datatype=d, dims=s) for n, d, s in inputs),
        outputs=(TensorConfig(name="y", datatype="FP32", dims=(1,)),),
    )


def sent_by_tritonclient(inputs: list[thttp.InferInput], **kw: Any) -> tuple[bytes, str | None]:
    body, json_size = tutils._get_inference_request(
        inputs=inputs,
        request_id=kw.get("request_id", ""),
        outputs=kw.get("outputs"),
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    return body, None if json_size is None else str(json_size)


def decoded(body: bytes, header_length: str | None, config: ModelConfig) -> list[np.ndarray]:
    header, at = read_header(body, header_length)
    return list(RestRequest("m", "", header, body, at).prepare(config, 1).inputs)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ALL)
@EXAMPLES
@given(data=st.data())
def test_decodes_what_tritonclient_sends(datatype: str, binary: bool, data: Any) -> None:
    if datatype not in JSON and not binary:
        return
    a = data.draw(arrays(datatype, json=not binary), label="a")
    b = data.draw(arrays("FP32", json=not binary), label="b")
    inputs = []
    for name, dt, array in (("a", datatype, a), ("b", "FP32", b)):
        tensor = thttp.InferInput(name, list(array.shape), dt)
        tensor.set_data_from_numpy(triton_view(dt, array), binary_data=binary)
        inputs.append(tensor)
    body, header_length = sent_by_tritonclient(inputs)
    assert (header_length is not None) == binary
    config = config_for(("a", datatype, a.shape), ("b", "FP32", b.shape))
    got_a, got_b = decoded(body, header_length, config)
    assert_same(datatype, got_a, a)
    assert_same("FP32", got_b, b)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ALL)
@EXAMPLES
@given(data=st.data())
def test_tritonclient_reads_our_outputs(datatype: str, binary: bool, data: Any) -> None:
    a = data.draw(arrays(datatype, json=not binary), label="a")
    b = data.draw(arrays("INT64", json=True), label="b")
    config = ModelConfig(
        name="m",
        inputs=(TensorConfig(name="x", datatype="FP32", dims=(1,)),),
        outputs=(
            TensorConfig(name="a", datatype=datatype, dims=a.shape),
            TensorConfig(name="b", datatype="INT64", dims=b.shape),
        ),
    )
    response = InferResponse(config, 3, "req-7", (0, 1), [a, b])
    body, header_length = encode_response(response, {"a": binary, "b": False})
    assert (header_length is not None) == binary
    result = thttp.InferResult.from_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "3"
    got_a = result.as_numpy("a")
    assert got_a.shape == a.shape
    if datatype == "BYTES":  # JSON carries text: tritonclient gives str for it
        assert [v if isinstance(v, bytes) else v.encode() for v in got_a.flat] == list(a.flat)
    elif datatype == "BF16":
        assert got_a.view(np.uint16).tobytes() == a.tobytes()
    else:
        assert got_a.tobytes() == a.astype(got_a.dtype).tobytes()
    np.testing.assert_array_equal(result.as_numpy("b"), b)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_an_output_json_cannot_carry_is_refused_naming_it(datatype: str) -> None:
    dtype = DATATYPES[datatype].numpy
    config = ModelConfig(
        name="m",
        inputs=(TensorConfig(name="x", datatype="FP32", dims=(1,)),),
        outputs=(TensorConfig(name="y", datatype=datatype, dims=(2,)),),
    )
    response = InferResponse(config, 1, "", (0,), [np.array([1.0, np.inf], dtype)])
    with pytest.raises(InvalidRequest, match="output 'y' holds NaN or infinity"):
        encode_response(response, False)
    body, header_length = encode_response(response, True)  # as binary data it travels
    result = thttp.InferResult.from_response_body(body, header_length=header_length)
    assert result.as_numpy("y").tolist() == [1.0, np.inf]


def test_nested_json_data_is_read_row_major() -> None:
    array = json_tensor("x", "INT32", [2, 3], [[1, 2, 3], [4, 5, 6]])
    assert array.dtype == np.dtype("<i4")
    assert array.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert json_tensor("x", "FP32", [2, 2], [1, 2.5, 3, 4]).tolist() == [[1, 2.5], [3, 4]]
    assert json_tensor("x", "FP32", [0, 3], []).shape == (0, 3)


def test_json_bf16_rounds_to_nearest_even() -> None:
    bits = json_tensor("x", "BF16", [3], [1.0, 1.00390625, -2.5])  # 1 + 2^-8 is a tie
    assert bits.dtype == np.uint16
    assert bits.tolist() == [0x3F80, 0x3F80, 0xC020]


def body_of(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, str | None]:
    head = json.dumps(header).encode()  # json: integers of any size
    return head + b"".join(blobs), str(len(head)) if blobs else None


def x_input(**changes: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **changes}


def binary_x(size: int) -> dict[str, Any]:
    """Input x as binary tensor data of `size` bytes."""
    return {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": size}}


CONFIG = config_for(("x", "FP32", (2,)))


@pytest.mark.parametrize(
    ("header", "blobs", "words"),
    [
        ({"inputs": "x"}, (), "'inputs' must be a list"),
        ({"inputs": [7]}, (), "inputs[0] must be a JSON object"),
        ({"inputs": [x_input(name=3)]}, (), "inputs[0] 'name' must be a string"),
        ({"inputs": [x_input(datatype=None)]}, (), "input 'x': 'datatype'"),
        ({"inputs": [x_input(datatype="FP128")]}, (), "FP128"),
        ({"inputs": [x_input(shape=[2.0])]}, (), "input 'x': 'shape' must be a list of integers"),
        ({"inputs": [x_input(shape=[-2])]}, (), "input 'x'"),
        ({"inputs": [x_input(data="12")]}, (), "input 'x': 'data' must be a list"),
        ({"inputs": [x_input(data=[1.0])]}, (), "input 'x': 'data' holds 1 values"),
        ({"inputs": [x_input(data=[[1.0], [2.0, 3.0]])]}, (), "input 'x': 'data' is not"),
        ({"inputs": [x_input(data=["a", "b"])]}, (), "input 'x': FP32 'data' must hold numbers"),
        (
            {"inputs": [x_input(datatype="INT32", data=[1.5, 2])]},
            (),
            "INT32 'data' must hold integers",
        ),
        ({"inputs": [x_input(datatype="UINT8", data=[1, 256])]}, (), "out of UINT8's range"),
        ({"inputs": [x_input(datatype="INT64", data=[1, 2**64])]}, (), "input 'x'"),
        ({"inputs": [x_input(datatype="BOOL", data=[1, 0])]}, (), "BOOL 'data' must hold true"),
        ({"inputs": [x_input(datatype="BYTES", data=[1, 2])]}, (), "BYTES 'data' must hold"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}, (), "no 'data'"),
        (
            {"inputs": [x_input(parameters={"binary_data_size": 8})]},
            (b"\0" * 8,),
            "both 'data' and 'binary_data_size'",
        ),
        (
            {"inputs": [{**x_input(), "data": None, "parameters": {"binary_data_size": 9}}]},
            (b"\0" * 8,),
            "binary_data_size 9 runs past the end",
        ),
        (
            {"inputs": [binary_x(4)]},
            (b"\0" * 8,),
            "binary data holds 4 bytes",
        ),
        (
            {"inputs": [binary_x(-1)]},
            (b"\0" * 8,),
            "'binary_data_size' must be a non-negative integer",
        ),
        (
            {"inputs": [binary_x(8)]},
            (b"\0" * 12,),
            "4 bytes of binary data follow",
        ),
        ({"inputs": [x_input(parameters={"a": [1]})]}, (), "input 'x' parameter 'a'"),
        ({"inputs": [x_input(name="z")]}, (), "unknown input 'z'"),
        ({"inputs": [x_input(shape=[3], data=[1.0, 2, 3])]}, (), "expected shape [2]"),
        ({"inputs": [x_input()], "outputs": [{"name": "nope"}]}, (), "unknown output 'nope'"),
        ({"inputs": [x_input()], "parameters": {"priority": "high"}}, (), "'priority'"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(header, blobs, words) -> None:
    body, header_length = body_of(header, *blobs)
    with pytest.raises(InvalidRequest) as refused:
        decoded(body, header_length, CONFIG)
    assert words in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"id": 7}, "'id' must be a string"),
        ({"outputs": {}}, "'outputs' must be a list"),
        ({"outputs": [{"name": 1}]}, "outputs[0] 'name' must be a string"),
        ({"parameters": []}, "request 'parameters' must be a JSON object"),
    ],
)
def test_a_malformed_envelope_is_refused_before_routing(header, words) -> None:
    with pytest.raises(InvalidRequest, match=".*") as refused:
        RestRequest("m", "", header, b"", 0)
    assert words in str(refused.value)


@pytest.mark.parametrize(
    ("body", "header_length", "words"),
    [
        (b"{", None, "not valid JSON"),
        (b"[1, 2]", None, "request body must be a JSON object"),
        (b"{}", "x", "Inference-Header-Content-Length: 'x'"),
        (b"{}", "3", "within the body's 2 bytes"),
        (b"{}", "-1", "Inference-Header-Content-Length"),
    ],
)
def test_a_body_that_is_not_a_request_is_refused(body, header_length, words) -> None:
    with pytest.raises(InvalidRequest) as refused:
        read_header(body, header_length)
    assert words in str(refused.value)
