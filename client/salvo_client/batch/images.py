"""Image preprocessing, as the model declares it in its config's `parameters`.

A model that takes images says how a file becomes its input tensor; `salvo batch` reads a
folder of images only for such a model:

    parameters:
      image.layout: HW        # HW (one channel), HWC or CHW: required, it marks an image model
      image.mode: L           # the PIL mode images are converted to: L or RGB
                              #   (default L for HW, RGB otherwise)
      image.size: 8,8         # W,H to resize to (default: the input's dims)
      image.scale: 0,16       # lo,hi that pixel values 0..255 map onto (default 0,255);
                              #   16,0 inverts

Pixels become `lo + (hi - lo) * p / 255` in the input's datatype. Pillow is imported only
to read images (`pip install 'salvo[batch]'`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from salvo_client.batch.errors import BatchError, missing_extra
from salvo_client.batch.model import ModelSpec, TensorSpec

__all__ = [
    "IMAGE_LAYOUT",
    "IMAGE_MODE",
    "IMAGE_SCALE",
    "IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "ImagePrep",
    "image_prep",
    "load_image",
]

IMAGE_LAYOUT = "image.layout"
IMAGE_MODE = "image.mode"
IMAGE_SIZE = "image.size"
IMAGE_SCALE = "image.scale"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""The files of a folder that are read as images; any other file is left alone."""

_CHANNELS = {"L": 1, "RGB": 3}


@dataclass(frozen=True, slots=True)
class ImagePrep:
    """How one image file becomes `input`'s tensor."""

    input: TensorSpec
    layout: str
    mode: str
    size: tuple[int, int] | None
    """(W, H) to resize to; None keeps each image's own size."""
    scale: tuple[float, float]

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input.name,
            "layout": self.layout,
            "mode": self.mode,
            "size": None if self.size is None else list(self.size),
            "scale": list(self.scale),
        }


def _pair(model: str, key: str, text: str, kind: type) -> tuple[Any, Any]:
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        raise BatchError(
            f"model '{model}': parameter {key}={text!r}: expected two numbers like 8,8"
        ) from None


def _default_size(spec: TensorSpec, layout: str) -> tuple[int, int] | None:
    dims = spec.dims
    h, w = (dims[1], dims[2]) if layout == "CHW" else (dims[0], dims[1])
    return (w, h) if w > 0 and h > 0 else None


def image_prep(spec: ModelSpec) -> ImagePrep:
    """The model's image preprocessing; BatchError when it declares none, or one its input
    cannot take."""
    params = spec.parameters
    layout = params.get(IMAGE_LAYOUT)
    if layout is None:
        raise BatchError(
            f"model '{spec.name}' declares no image preprocessing, so it cannot score a folder "
            f"of images: its config needs parameters {IMAGE_LAYOUT} (HW, HWC or CHW), and "
            f"optionally {IMAGE_MODE}, {IMAGE_SIZE}, {IMAGE_SCALE} (see docs/batch.md)"
        )
    layout = layout.strip().upper()
    if layout not in ("HW", "HWC", "CHW"):
        raise BatchError(f"model '{spec.name}': {IMAGE_LAYOUT}={layout!r}: use HW, HWC or CHW")
    if len(spec.inputs) != 1:
        raise BatchError(
            f"model '{spec.name}' has {len(spec.inputs)} inputs; images feed a model with one"
        )
    tensor = spec.inputs[0]
    if len(tensor.dims) != len(layout):
        raise BatchError(
            f"model '{spec.name}': input '{tensor.name}' has dims {list(tensor.dims)}, "
            f"which is not a {layout} image"
        )
    mode = params.get(IMAGE_MODE, "L" if layout == "HW" else "RGB").strip().upper()
    if mode not in _CHANNELS:
        raise BatchError(f"model '{spec.name}': {IMAGE_MODE}={mode!r}: use L or RGB")
    if layout == "HW" and mode != "L":
        raise BatchError(f"model '{spec.name}': an HW image has one channel: {IMAGE_MODE} L")
    channels = tensor.dims[0] if layout == "CHW" else tensor.dims[-1]
    if layout != "HW" and channels > 0 and channels != _CHANNELS[mode]:
        raise BatchError(
            f"model '{spec.name}': input '{tensor.name}' takes {channels} channels, "
            f"mode {mode} has {_CHANNELS[mode]}"
        )
    size = (
        _pair(spec.name, IMAGE_SIZE, params[IMAGE_SIZE], int)
        if IMAGE_SIZE in params
        else _default_size(tensor, layout)
    )
    if size is not None and min(size) < 1:
        raise BatchError(f"model '{spec.name}': {IMAGE_SIZE} must be positive")
    scale = _pair(spec.name, IMAGE_SCALE, params.get(IMAGE_SCALE, "0,255"), float)
    return ImagePrep(tensor, layout, mode, size, scale)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise missing_extra("pillow", "reading a folder of images") from None
    return Image


def load_image(path: Path, prep: ImagePrep) -> np.ndarray:
    """The tensor of one image file; OSError or ValueError for a file that is no image."""
    image_module = _pil()
    with image_module.open(path) as image:
        image = image.convert(prep.mode)
        if prep.size is not None and image.size != prep.size:
            image = image.resize(prep.size, image_module.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float64)
    lo, hi = prep.scale
    values = lo + (hi - lo) * pixels / 255.0
    if values.ndim == 2 and prep.layout != "HW":
        values = values[:, :, np.newaxis]
    if prep.layout == "CHW":
        values = values.transpose(2, 0, 1)
    dtype = prep.input.dtype
    if dtype.kind in "iub":
        values = np.rint(values)
    return np.ascontiguousarray(values.astype(dtype))
