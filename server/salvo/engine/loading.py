"""Model files onto a device: what is loaded, and what is refused.

Two formats are accepted: TorchScript (`model.pt`, read by TorchScript's own C++ loader)
and torch.export (`model.pt2`). Python's pickle is never run on a model file: a pickle or
a `torch.save` checkpoint is refused, and a `.pt2` archive is checked for pickled payloads
and loaded with its pickled example inputs removed (torch.export's loader would otherwise
unpickle them, falling back to arbitrary objects).
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from salvo.domain.config import ModelConfig
from salvo.domain.status import ConfigError
from salvo.engine.tensors import PRECISIONS

MODEL_FILES = ("model.pt", "model.pt2")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".bin", ".joblib", ".ckpt")
_PICKLE_MAGIC = (b"\x80", b"(", b"]", b"}")  # protocol 2+ opcode, and protocol 0/1 openers


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA where a GPU is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return resolved


def find_model_file(version_dir: Path) -> Path:
    """The model file in a version directory; refuses pickles with a clear error."""
    for name in MODEL_FILES:
        path = version_dir / name
        if path.is_file():
            return path
    pickles = sorted(p.name for p in version_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{version_dir / pickles[0]}: refusing a pickle file: Salvo never unpickles model "
            "files; save the model with torch.jit.save (model.pt) or torch.export.save (model.pt2)"
        )
    raise ConfigError(f"{version_dir}: no model file (expected one of {', '.join(MODEL_FILES)})")


def _open_archive(path: Path) -> zipfile.ZipFile:
    with path.open("rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        kind = "a pickle" if head[:1] in _PICKLE_MAGIC else "not a zip archive"
        raise ConfigError(
            f"{path}: refusing to load: the file is {kind}; Salvo loads only TorchScript "
            "(torch.jit.save) and torch.export (torch.export.save) archives and never unpickles"
        )
    return zipfile.ZipFile(path)


def load_torchscript(path: Path, device: torch.device) -> Any:
    with _open_archive(path) as archive:
        names = archive.namelist()
    if not any("/code/" in n for n in names) or not any(n.endswith("constants.pkl") for n in names):
        raise ConfigError(
            f"{path}: refusing to load: this is a torch.save checkpoint (a pickle), not "
            "TorchScript; save the model with torch.jit.save"
        )
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module


def load_exported(path: Path, device: torch.device) -> Any:
    buffer = io.BytesIO()
    with _open_archive(path) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = info.filename
            data = src.read(info)
            if name.endswith("_config.json") and "/data/" in name:
                payloads = json.loads(data).get("config", {})
                pickled = [key for key, meta in payloads.items() if meta.get("use_pickle")]
                if pickled:
                    raise ConfigError(
                        f"{path}: refusing to load: entry {pickled[0]!r} is stored as a pickle"
                    )
            elif "/data/weights/" in name and name.endswith(".pt"):
                raise ConfigError(f"{path}: refusing to load: legacy pickled weights {name!r}")
            if "/data/sample_inputs/" in name:
                data = b""  # example inputs are pickled; serving does not need them
            dst.writestr(info, data)
    buffer.seek(0)
    with warnings.catch_warnings():
        # Weights are read straight from the archive's bytes, which are never written.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        program = torch.export.load(buffer)
    return program.module().to(device)


def optimized(module: Any, config: ModelConfig) -> Any:
    """The loaded module in the configured precision and layout (converted once, here),
    compiled where asked (compiled by its first passes: the warm-up's)."""
    dtype = PRECISIONS[config.optimization.precision]
    if dtype is not None:
        module = module.to(dtype)
    if config.optimization.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if config.optimization.compile:
        module = torch.compile(module)
    return module


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message ("" for none): torch's carry pages of context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
