"""The v2 tensor datatypes and how each maps to numpy, torch and Triton's config enum.

BF16 has no numpy dtype: Salvo carries BF16 tensors in numpy as uint16 bit patterns and
reinterprets them as torch.bfloat16 at the model boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataType:
    """One v2 datatype."""

    name: str
    """The v2 name, as it travels in requests: "FP32", "BYTES"…"""
    numpy: np.dtype
    """How Salvo holds it in numpy (object for BYTES, uint16 bits for BF16)."""
    contents_field: str | None
    """The InferTensorContents field for the typed encoding; None where only raw is allowed."""
    config_enum: str
    """Triton's ModelConfig DataType enum name."""

    @property
    def itemsize(self) -> int:
        """Bytes per element in the raw encoding; 0 for BYTES, whose elements vary."""
        return 0 if self.name == "BYTES" else self.numpy.itemsize


def _dt(name: str, np_type: type | str, field: str | None, enum: str) -> DataType:
    return DataType(name, np.dtype(np_type), field, enum)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, "bool_contents", "TYPE_BOOL"),
        _dt("UINT8", np.uint8, "uint_contents", "TYPE_UINT8"),
        _dt("UINT16", np.uint16, "uint_contents", "TYPE_UINT16"),
        _dt("UINT32", np.uint32, "uint_contents", "TYPE_UINT32"),
        _dt("UINT64", np.uint64, "uint64_contents", "TYPE_UINT64"),
        _dt("INT8", np.int8, "int_contents", "TYPE_INT8"),
        _dt("INT16", np.int16, "int_contents", "TYPE_INT16"),
        _dt("INT32", np.int32, "int_contents", "TYPE_INT32"),
        _dt("INT64", np.int64, "int64_contents", "TYPE_INT64"),
        _dt("FP16", np.float16, None, "TYPE_FP16"),
        _dt("FP32", np.float32, "fp32_contents", "TYPE_FP32"),
        _dt("FP64", np.float64, "fp64_contents", "TYPE_FP64"),
        _dt("BF16", np.uint16, None, "TYPE_BF16"),
        _dt("BYTES", np.object_, "bytes_contents", "TYPE_STRING"),
    )
}


def datatype(name: str) -> DataType:
    """The datatype called `name`; KeyError if there is none."""
    return DATATYPES[name]
