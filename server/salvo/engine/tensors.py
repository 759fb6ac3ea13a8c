"""numpy arrays and torch tensors, one into the other, for every v2 datatype.

BF16 has no numpy dtype: requests carry BF16 tensors as uint16 bit patterns, which are
reinterpreted as torch.bfloat16 at the model's boundary.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}


PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The dtype a model computes in per `optimization.precision`; None leaves it as exported."""


@functools.cache
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """torch's dtype for a numpy dtype (worked out once per dtype, not per batch)."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


def host_dtype(datatype: str) -> torch.dtype:
    """The dtype of the host tensor that carries a request's array of `datatype` (BF16
    travels as its 16 bits)."""
    return torch.uint16 if datatype == "BF16" else TORCH_DTYPES[datatype]


def host_tensor(array: Any, datatype: str) -> torch.Tensor:
    """A request's array (or an assembled pinned tensor) as a host tensor of `datatype`."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def to_torch(array: Any, datatype: str, device: torch.device) -> torch.Tensor:
    """A request's array (or an assembled pinned tensor) as a tensor on `device`."""
    tensor = host_tensor(array, datatype)
    return tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()
