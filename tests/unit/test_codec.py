"""The codec: round trips for every datatype, tritonclient as referee, and each rejection."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import _utils as tutils
from tritonclient.grpc import service_pb2 as triton_pb

from salvo.domain.datatypes import DATATYPES
from salvo.domain.status import InvalidRequest
from salvo.domain.tensors import decode_tensor_raw, encode_tensor_raw
from salvo.domain.types import Tensor
from salvo.frontends.grpc.codec import (
    MessageParameters,
    decode_inputs,
    decode_parameters,
    encode_outputs,
    encode_tensor_typed,
)
from salvo_client.proto import grpc_service_pb2 as pb

ALL = sorted(DATATYPES)
TYPED = [name for name in ALL if DATATYPES[name].contents_field is not None]
RAW_ONLY = [name for name in ALL if DATATYPES[name].contents_field is None]
FLOATS = ["FP16", "FP32", "FP64"]

SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
EXAMPLES = settings(max_examples=25, deadline=None)


def arrays(datatype: str, shape: Any = SHAPES) -> st.SearchStrategy[np.ndarray]:
    """Arrays of every value the datatype holds: NaN payloads, infinities, any BF16 bits."""
    if datatype == "BYTES":
        return hnp.arrays(object, shape, elements=st.binary(max_size=12))
    # BF16 travels as uint16 bit patterns, so any uint16 is a valid BF16 (NaNs included).
    return hnp.arrays(DATATYPES[datatype].numpy, shape)


def assert_same(datatype: str, got: np.ndarray, want: np.ndarray) -> None:
    """Equal shape, dtype and, for fixed-width types, bit-for-bit equal data."""
    assert got.shape == want.shape
    assert got.dtype == DATATYPES[datatype].numpy
    if datatype == "BYTES":
        assert got.tolist() == want.tolist()
        assert all(type(x) is bytes for x in got.flat)
    else:
        assert got.tobytes() == np.ascontiguousarray(want, dtype=got.dtype).tobytes()


def round_trip(request: pb.ModelInferRequest) -> list[Tensor]:
    """Decode `request` as the server sees it: after the wire."""
    return decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))


def raw_request(*inputs: tuple[str, str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, array in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(encode_tensor_raw(datatype, array))
    return request


def typed_request(*inputs: tuple[str, str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, array in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        tensor.contents.CopyFrom(encode_tensor_typed(datatype, array))
    return request


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL)
@EXAMPLES
@given(data=st.data())
def test_raw_round_trip(datatype: str, data: st.DataObject) -> None:
    a = data.draw(arrays(datatype), label="a")
    b = data.draw(arrays(datatype), label="b")
    tensors = round_trip(raw_request(("a", datatype, a), ("b", datatype, b)))
    assert [(t.name, t.datatype, t.shape) for t in tensors] == [
        ("a", datatype, a.shape),
        ("b", datatype, b.shape),
    ]
    assert_same(datatype, tensors[0].data, a)
    assert_same(datatype, tensors[1].data, b)


@pytest.mark.parametrize("datatype", TYPED)
@EXAMPLES
@given(data=st.data())
def test_typed_round_trip(datatype: str, data: st.DataObject) -> None:
    a = data.draw(arrays(datatype), label="a")
    (tensor,) = round_trip(typed_request(("a", datatype, a)))
    assert (tensor.name, tensor.datatype, tensor.shape) == ("a", datatype, a.shape)
    assert_same(datatype, tensor.data, a)


@pytest.mark.parametrize("datatype", TYPED)
@EXAMPLES
@given(data=st.data())
def test_typed_contents_built_by_protobuf(datatype: str, data: st.DataObject) -> None:
    """Contents filled through protobuf's own API, not our encoder, decode to the same values."""
    a = data.draw(arrays(datatype), label="a")
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="a", datatype=datatype, shape=a.shape)
    getattr(tensor.contents, DATATYPES[datatype].contents_field).extend(a.ravel().tolist())
    (decoded,) = round_trip(request)
    # Python floats may quiet a signalling NaN, so compare values, NaN equal to NaN.
    np.testing.assert_array_equal(decoded.data, a, strict=True)


@EXAMPLES
@given(
    inputs=st.lists(
        st.sampled_from(ALL).flatmap(lambda dt: arrays(dt).map(lambda a: (dt, a))),
        min_size=1,
        max_size=5,
    )
)
def test_raw_round_trip_mixed_inputs_keep_order(inputs: list[tuple[str, np.ndarray]]) -> None:
    named = [(f"in{i}", dt, a) for i, (dt, a) in enumerate(inputs)]
    tensors = round_trip(raw_request(*named))
    assert [t.name for t in tensors] == [name for name, _, _ in named]
    for tensor, (_, datatype, array) in zip(tensors, named, strict=True):
        assert tensor.datatype == datatype
        assert_same(datatype, tensor.data, array)


@pytest.mark.parametrize("datatype", [d for d in ALL if d not in ("BOOL", "BYTES")])
def test_raw_encoding_is_little_endian_and_row_major(datatype: str) -> None:
    dtype = DATATYPES[datatype].numpy
    a = np.arange(12, dtype=dtype).reshape(3, 4)
    swapped = a.astype(dtype.newbyteorder(">")).T  # big-endian, Fortran-ordered view
    raw = encode_tensor_raw(datatype, swapped)
    assert raw == a.T.astype(dtype.newbyteorder("<")).tobytes(order="C")
    assert_same(datatype, decode_tensor_raw("x", datatype, (4, 3), raw), a.T)


def test_raw_decode_is_a_zero_copy_view() -> None:
    raw = np.arange(6, dtype="<f4").tobytes()
    out = decode_tensor_raw("x", "FP32", [2, 3], raw)
    assert out.base is not None
    assert not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(raw, dtype=np.uint8))


def test_nan_and_inf_are_data() -> None:
    bits = np.array([0x7F800001, 0x7FC00001, 0xFFA00000, 0x7F800000, 0xFF800000], dtype=np.uint32)
    a = bits.view(np.float32)  # signalling and quiet NaNs with payloads, +inf, -inf
    (raw,) = round_trip(raw_request(("x", "FP32", a)))
    (typed,) = round_trip(typed_request(("x", "FP32", a)))
    assert raw.data.view(np.uint32).tolist() == bits.tolist()
    assert typed.data.view(np.uint32).tolist() == bits.tolist()


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2), (2, 0, 2**40)])
def test_zero_element_shapes(datatype: str, shape: tuple[int, ...]) -> None:
    a = np.empty(shape, dtype=DATATYPES[datatype].numpy)
    (raw,) = round_trip(raw_request(("x", datatype, a)))
    assert raw.data.shape == shape
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    (typed,) = round_trip(request)
    assert typed.data.shape == shape and typed.data.dtype == DATATYPES[datatype].numpy


def test_bytes_outputs_accept_str_as_utf8() -> None:
    a = np.array([["héllo", b"\x00\xff"], ["", "z"]], dtype=object)
    raw = encode_tensor_raw("BYTES", a)
    out = decode_tensor_raw("s", "BYTES", (2, 2), raw)
    assert out.tolist() == [["héllo".encode(), b"\x00\xff"], [b"", b"z"]]


def test_bf16_accepts_ml_dtypes_bfloat16() -> None:
    a = np.array([1.5, -2.0, np.nan], dtype=ml_dtypes.bfloat16)
    assert encode_tensor_raw("BF16", a) == a.view(np.uint16).tobytes()


# -- tritonclient as referee ------------------------------------------------------------------


def triton_view(datatype: str, array: np.ndarray) -> np.ndarray:
    """How a tritonclient user holds the same tensor: BF16 as ml_dtypes.bfloat16."""
    return array.view(ml_dtypes.bfloat16) if datatype == "BF16" else array


@pytest.mark.parametrize("datatype", ALL)
@EXAMPLES
@given(data=st.data())
def test_decodes_what_tritonclient_sends(datatype: str, data: st.DataObject) -> None:
    a = data.draw(arrays(datatype), label="a")
    b = data.draw(arrays("FP32"), label="b")
    inputs = []
    for name, dt, array in (("a", datatype, a), ("b", "FP32", b)):
        infer_input = tgrpc.InferInput(name, list(array.shape), dt)
        infer_input.set_data_from_numpy(triton_view(dt, array))
        inputs.append(infer_input)
    request = tutils._get_inference_request(
        model_name="m",
        inputs=inputs,
        model_version="",
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    tensors = decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert [(t.name, t.datatype, t.shape) for t in tensors] == [
        ("a", datatype, a.shape),
        ("b", "FP32", b.shape),
    ]
    assert_same(datatype, tensors[0].data, a)
    assert_same("FP32", tensors[1].data, b)


@pytest.mark.parametrize("datatype", ALL)
@EXAMPLES
@given(data=st.data())
def test_tritonclient_reads_our_outputs(datatype: str, data: st.DataObject) -> None:
    a = data.draw(arrays(datatype), label="a")
    b = data.draw(arrays("INT64"), label="b")
    response = pb.ModelInferResponse(model_name="m")
    encode_outputs(response, [("a", datatype, a), ("b", "INT64", b)])
    assert len(response.outputs) == len(response.raw_output_contents) == 2
    result = tgrpc.InferResult(
        triton_pb.ModelInferResponse.FromString(response.SerializeToString())
    )
    got_a = result.as_numpy("a")
    assert got_a.shape == a.shape
    assert result.get_output("a").datatype == datatype
    if datatype == "BYTES":
        assert got_a.tolist() == a.tolist()
    else:
        assert got_a.dtype == triton_view(datatype, a).dtype
        assert got_a.tobytes() == a.tobytes()
    assert result.as_numpy("b").tobytes() == b.tobytes()


def test_outputs_from_strided_arrays() -> None:
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[::2, 1::2]
    response = pb.ModelInferResponse()
    encode_outputs(response, [("y", "FP32", a)])
    assert list(response.outputs[0].shape) == [2, 3]
    np.testing.assert_array_equal(
        decode_tensor_raw("y", "FP32", [2, 3], response.raw_output_contents[0]), a
    )


# -- rejections -------------------------------------------------------------------------------


def reject(request: pb.ModelInferRequest, *fragments: str) -> str:
    """Assert decoding `request` raises InvalidRequest whose message has every fragment."""
    with pytest.raises(InvalidRequest) as info:
        round_trip(request)
    for fragment in fragments:
        assert fragment in info.value.message
    return info.value.message


def one_raw(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def one_typed(datatype: str, shape: list[int], **contents: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(
        name="x", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )
    return request


def test_rejects_unknown_datatype() -> None:
    reject(one_raw("FP33", [1], b"\0" * 4), "input 'x': unknown datatype 'FP33'")
    reject(one_typed("float32", [1], fp32_contents=[1.0]), "input 'x'", "'float32'")


def test_rejects_negative_dimension() -> None:
    reject(one_raw("FP32", [2, -1], b""), "input 'x'", "negative dimension -1")
    reject(one_typed("INT32", [-3], int_contents=[]), "input 'x'", "negative")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62, 2**62, 0], [0, 2**61 + 1]])
def test_rejects_absurd_shapes_without_allocating(shape: list[int]) -> None:
    # Each would be a MemoryError or numpy's "array is too big" if the codec tried.
    reject(one_raw("FP64", shape, b"\0" * 8), "input 'x'", str(shape))
    reject(one_typed("FP64", shape, fp64_contents=[1.0]), "input 'x'", str(shape))
    reject(one_raw("BYTES", shape, b"\0" * 8), "input 'x'", str(shape))


def test_rejects_raw_byte_size_mismatch() -> None:
    message = reject(one_raw("FP32", [2, 2], b"\0" * 12))
    assert (
        message == "input 'x': raw_input_contents holds 12 bytes, but shape [2, 2] of FP32 needs 16"
    )
    reject(one_raw("INT64", [1], b"\0" * 9), "input 'x'", "9 bytes", "needs 8")


def test_rejects_raw_entry_count_mismatch() -> None:
    request = raw_request(("x", "FP32", np.zeros(2, np.float32)))
    request.inputs.add(name="y", datatype="FP32", shape=[1])
    reject(request, "raw_input_contents holds 1 entries", "2 inputs")


def test_rejects_both_encodings() -> None:
    request = raw_request(("x", "FP32", np.zeros(2, np.float32)))
    request.inputs[0].contents.fp32_contents.extend([0.0, 0.0])
    reject(request, "input 'x'", "both contents and raw_input_contents")


def test_allows_empty_contents_message_beside_raw() -> None:
    request = raw_request(("x", "FP32", np.zeros(2, np.float32)))
    request.inputs[0].contents.SetInParent()
    assert round_trip(request)[0].data.shape == (2,)


@pytest.mark.parametrize(
    ("shape", "raw", "fragment"),
    [
        ([3], b"\1\0\0\0a\1\0\0\0b", "needs at least 12"),  # too few bytes for 3 lengths
        ([2], b"\x09\0\0\0abc\0\0\0\0", "declares 9 bytes, but only 7 remain"),  # overrun
        ([1], b"\1\0\0\0ab", "use 5"),  # left over
        ([2], b"\1\0\0\0a\0\0\0\0\1\0\0\0b", "use 9"),  # more elements than the shape
        ([3], b"\1\0\0\0a\3\0\0\0bcd", "element 2 needs a 4-byte length"),  # ran out
    ],
)
def test_rejects_malformed_raw_bytes(shape: list[int], raw: bytes, fragment: str) -> None:
    reject(one_raw("BYTES", shape, raw), "input 'x'", fragment)


def test_rejects_raw_bool_that_is_not_0_or_1() -> None:
    reject(one_raw("BOOL", [3], b"\0\1\2"), "input 'x'", "0 or 1")


def test_rejects_typed_wrong_field() -> None:
    reject(
        one_typed("FP32", [2], fp64_contents=[1.0, 2.0]),
        "input 'x'",
        "expects contents.fp32_contents, got contents.fp64_contents",
    )
    reject(one_typed("UINT64", [1], uint_contents=[1]), "input 'x'", "uint64_contents")


def test_rejects_typed_two_fields() -> None:
    reject(
        one_typed("INT32", [1], int_contents=[1], fp32_contents=[1.0]),
        "input 'x'",
        "expects contents.int_contents",
        "fp32_contents",
    )


def test_rejects_typed_count_mismatch() -> None:
    reject(
        one_typed("INT32", [2, 2], int_contents=[1, 2, 3]),
        "input 'x': contents.int_contents holds 3 values, but shape [2, 2] of INT32 needs 4",
    )
    reject(one_typed("FP32", [2]), "input 'x'", "holds 0 values", "needs 2")


@pytest.mark.parametrize("datatype", RAW_ONLY)
def test_rejects_typed_fp16_and_bf16(datatype: str) -> None:
    reject(one_typed(datatype, [1]), "input 'x'", "raw_input_contents")
    reject(one_typed(datatype, [1], fp32_contents=[1.0]), "input 'x'", "raw_input_contents")
    with pytest.raises(ValueError, match="raw"):
        encode_tensor_typed(datatype, np.zeros(1, DATATYPES[datatype].numpy))


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("INT8", "int_contents", 128),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 2**15),
        ("INT16", "int_contents", -(2**15) - 1),
        ("UINT8", "uint_contents", 256),
        ("UINT16", "uint_contents", 2**16),
    ],
)
def test_rejects_typed_values_out_of_range(datatype: str, field: str, value: int) -> None:
    reject(one_typed(datatype, [2], **{field: [0, value]}), "input 'x'", f"[1] is {value}")


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT8", "int_contents", [-128, 127]),
        ("INT16", "int_contents", [-(2**15), 2**15 - 1]),
        ("UINT8", "uint_contents", [0, 255]),
        ("UINT16", "uint_contents", [0, 2**16 - 1]),
    ],
)
def test_accepts_typed_values_at_range_ends(datatype: str, field: str, values: list[int]) -> None:
    (tensor,) = round_trip(one_typed(datatype, [2], **{field: values}))
    assert tensor.data.tolist() == values


def test_rejects_duplicate_input_names() -> None:
    zeros = np.zeros(1, np.float32)
    reject(raw_request(("x", "FP32", zeros), ("x", "FP32", zeros)), "input 'x'", "more than once")


@pytest.mark.parametrize(
    ("datatype", "array", "fragment"),
    [
        ("FP32", np.zeros(2, np.float64), "expects a float32 array, got float64"),
        ("BF16", np.zeros(2, np.float32), "BF16 expects a uint16"),
        ("BYTES", np.zeros(2, np.float32), "BYTES expects"),
        ("BYTES", np.array([1, b"a"], dtype=object), "bytes or str, got int"),
        ("FP31", np.zeros(2, np.float32), "unknown datatype"),
    ],
)
def test_encoders_reject_arrays_that_do_not_fit(
    datatype: str, array: np.ndarray, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        encode_tensor_raw(datatype, array)
    with pytest.raises(ValueError, match=rf"output 'y'.*{fragment}"):
        encode_outputs(pb.ModelInferResponse(), [("y", datatype, array)])


def test_message_parameters_read_values_as_decoded_without_inserting_keys():
    request = pb.ModelInferRequest()
    request.parameters["priority"].int64_param = 2
    request.parameters["flag"].bool_param = True
    request.parameters["note"].string_param = "x"
    view = MessageParameters(request.parameters)
    assert view.get("priority") == 2 and view["flag"] is True and view.get("note") == "x"
    assert view.get("timeout") is None and view.get("timeout", 5) == 5
    with pytest.raises(KeyError):
        view["timeout"]
    assert "timeout" not in request.parameters  # reading inserted nothing
    assert dict(view) == decode_parameters(request) == {"priority": 2, "flag": True, "note": "x"}
    assert len(view) == 3 and sorted(view) == ["flag", "note", "priority"]
