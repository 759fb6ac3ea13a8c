"""v2 inference requests and responses over HTTP: JSON tensors and Triton's binary tensor
data extension, both ways.

A request body is a JSON header, then, where `Inference-Header-Content-Length` says how
long the header is, the raw bytes of every input whose parameters give a
`binary_data_size`, in the order of the inputs. A binary input decodes to a view of the
body (`decode_tensor_at`, no copy where aligned); a JSON input's `data` (flat or nested,
row-major) becomes one numpy array in one call, its kind checked against the datatype
(no float into an INT tensor, no integer out of its type's range). Every error names the
field.

A response carries each output as JSON `data`, or, where the request asks
(`binary_data` on an output, `binary_data_output` on the request), as raw bytes after
the JSON header, with `binary_data_size` in its parameters. JSON is written by orjson
straight from the arrays: no Python value is made per element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import orjson

from salvo.domain.config import ModelConfig
from salvo.domain.status import InvalidRequest
from salvo.domain.tensors import decode_tensor_at, element_count, encode_raw, wire_dtype
from salvo.domain.types import InferRequest, InferResponse, Prepared, Tensor
from salvo.domain.validation import validate_request

HEADER_LENGTH = "inference-header-content-length"
_SCALARS = (str, int, float, bool)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    """A `parameters` object: its values must be strings, numbers or booleans."""
    if value is None:
        return {}
    parameters = _object(value, f"{what} 'parameters'")
    for key, item in parameters.items():
        if not isinstance(item, _SCALARS):
            raise InvalidRequest(f"{what} parameter '{key}' must be a string, number or boolean")
    return parameters


def read_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], int]:
    """The request's JSON header, and where its binary data starts."""
    if header_length is None:
        end = len(body)
    else:
        try:
            end = int(header_length)
        except ValueError:
            end = -1
        if not 0 <= end <= len(body):
            raise InvalidRequest(
                f"header Inference-Header-Content-Length: {header_length!r} is not a length "
                f"within the body's {len(body)} bytes"
            )
    try:
        header = orjson.loads(memoryview(body)[:end])
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body: not valid JSON: {exc}") from None
    return _object(header, "request body"), end


class RestRequest(InferRequest):
    """One inference request from an HTTP body, decoded when the data plane prepares it."""

    __slots__ = ("_body", "_binary_at", "_header", "_parameters", "binary_outputs", "outputs")

    transport: ClassVar[str] = "http"

    def __init__(
        self,
        model: str,
        version: str,
        header: dict[str, Any],
        body: bytes,
        binary_at: int,
        deadline_ns: int | None = None,
        probe: Any = None,
    ) -> None:
        request_id = header.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidRequest("'id' must be a string")
        super().__init__(model, version, request_id, deadline_ns, probe)
        self._header = header
        self._body = body
        self._binary_at = binary_at
        self._parameters = _parameters(header.get("parameters"), "request")
        default = self._parameters.get("binary_data_output", False) is True
        outputs = header.get("outputs", [])
        if not isinstance(outputs, list):
            raise InvalidRequest("'outputs' must be a list")
        self.outputs: list[str] = []
        self.binary_outputs: dict[str, bool] | bool = default
        """Which outputs answer as binary data: by name, or for all of them."""
        if outputs:
            binary: dict[str, bool] = {}
            for i, item in enumerate(outputs):
                output = _object(item, f"outputs[{i}]")
                name = output.get("name")
                if not isinstance(name, str):
                    raise InvalidRequest(f"outputs[{i}] 'name' must be a string")
                flag = _parameters(output.get("parameters"), f"output '{name}'").get(
                    "binary_data", default
                )
                binary[name] = flag is True
                self.outputs.append(name)
            self.binary_outputs = binary

    def parameters(self) -> Mapping[str, object]:
        return self._parameters

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        inputs = self._header.get("inputs")
        if not isinstance(inputs, list):
            raise InvalidRequest("'inputs' must be a list")
        tensors = []
        offset = self._binary_at
        body = self._body
        for i, item in enumerate(inputs):
            tensor, offset = self._tensor(_object(item, f"inputs[{i}]"), i, body, offset)
            tensors.append(tensor)
        if offset != len(body):
            raise InvalidRequest(
                f"request body: {len(body) - offset} bytes of binary data follow the inputs' "
                "binary_data_size"
            )
        return validate_request(
            config, version, self.id, tensors, self.outputs, dict(self._parameters)
        )

    @staticmethod
    def _tensor(item: dict[str, Any], i: int, body: bytes, offset: int) -> tuple[Tensor, int]:
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"inputs[{i}] 'name' must be a string")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidRequest(f"input '{name}': 'datatype' must be a string")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidRequest(f"input '{name}': 'shape' must be a list of integers")
        parameters = _parameters(item.get("parameters"), f"input '{name}'")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequest(
                    f"input '{name}': parameter 'binary_data_size' must be a non-negative integer"
                )
            if offset + size > len(body):
                raise InvalidRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(body) - offset} bytes left)"
                )
            if "data" in item:
                raise InvalidRequest(f"input '{name}': both 'data' and 'binary_data_size'")
            array = decode_tensor_at(name, datatype, shape, body, offset, size, "binary data")
            return Tensor(name, datatype, tuple(shape), array), offset + size
        if "data" not in item:
            raise InvalidRequest(f"input '{name}': no 'data' and no 'binary_data_size'")
        array = json_tensor(name, datatype, shape, item["data"])
        return Tensor(name, datatype, tuple(shape), array), offset


_INT_RANGES = {
    np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
}


def json_tensor(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """An input's JSON `data` (a flat or nested list, row-major) as an array of `shape`."""
    count = element_count(name, datatype, shape)  # checks the datatype and shape first
    dtype = wire_dtype(datatype)
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{name}': 'data' must be a list")
    if dtype.kind == "O":
        values = np.array(data, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"input '{name}': BYTES 'data' must hold strings")
        array = np.array([v.encode() for v in values] or [], dtype=object)
    else:
        try:
            values = np.asarray(data)
        except (ValueError, OverflowError) as exc:  # ragged lists; integers past 64 bits
            raise InvalidRequest(
                f"input '{name}': 'data' is not a {datatype} tensor: {exc}"
            ) from None
        if dtype.kind in "iu" and values.dtype.kind in "fO" and datatype != "BF16":
            # Integers past int64 beside others: numpy made floats (or objects) of them.
            values = _big_integers(name, datatype, dtype, values, data)
        array = _convert(name, datatype, dtype, values.reshape(-1))
    if array.size != count:
        raise InvalidRequest(
            f"input '{name}': 'data' holds {array.size} values, but shape {list(shape)} "
            f"needs {count}"
        )
    return array.reshape(shape)


def _big_integers(
    name: str, datatype: str, dtype: np.dtype, values: np.ndarray, data: list
) -> np.ndarray:
    """`data` as `dtype` where every value is an integer (some past int64), else `values`."""
    items = np.array(data, dtype=object).reshape(-1)
    if not all(type(v) is int for v in items):
        return values  # floats among them: refused by _convert
    try:
        return np.array(items.tolist(), dtype=dtype)
    except OverflowError:
        low, high = _INT_RANGES[dtype.newbyteorder("=")]
        raise InvalidRequest(
            f"input '{name}': a value of 'data' is out of {datatype}'s range [{low}, {high}]"
        ) from None


def _convert(name: str, datatype: str, dtype: np.dtype, values: np.ndarray) -> np.ndarray:
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidRequest(f"input '{name}': BOOL 'data' must hold true or false")
        return values
    if datatype == "BF16":  # its 16 bits, rounded to nearest even from float32's
        if kind not in "iuf":
            raise InvalidRequest(f"input '{name}': BF16 'data' must hold numbers")
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if dtype.kind in "iu":
        if kind not in "iu":
            raise InvalidRequest(f"input '{name}': {datatype} 'data' must hold integers")
        low, high = _INT_RANGES[dtype.newbyteorder("=")]
        if int(values.min()) < low or int(values.max()) > high:
            raise InvalidRequest(
                f"input '{name}': a value of 'data' is out of {datatype}'s range [{low}, {high}]"
            )
        return values.astype(dtype)
    if kind not in "iuf":
        raise InvalidRequest(f"input '{name}': {datatype} 'data' must hold numbers")
    return values.astype(dtype)


def _json_data(name: str, datatype: str, array: np.ndarray) -> Any:
    """An output's values as orjson writes them: the array itself where it can."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if datatype == "BF16":
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise InvalidRequest(
            f"output '{name}' holds NaN or infinity, which JSON cannot carry: ask for it as "
            "binary data (parameter 'binary_data': true)"
        )
    if flat.dtype.kind == "O":
        try:
            return [bytes(v).decode() for v in flat]
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"output '{name}' is not UTF-8 text: ask for it as binary data "
                "(parameter 'binary_data': true)"
            ) from None
    return flat.astype(flat.dtype.newbyteorder("="), copy=False)


def encode_response(
    response: InferResponse, binary: dict[str, bool] | bool
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary data follow."""
    outputs = []
    blobs: list[bytes] = []
    for name, datatype, array in response.tensors():
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": array.shape}
        wanted = binary if isinstance(binary, bool) else binary.get(name, False)
        if wanted:
            raw = encode_raw(f"output '{name}'", datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(name, datatype, array)
        outputs.append(entry)
    header = orjson.dumps(
        {
            "model_name": response.model,
            "model_version": str(response.version),
            **({"id": response.id} if response.id else {}),
            "outputs": outputs,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
