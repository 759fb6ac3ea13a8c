"""Model files: TorchScript and torch.export load and run; pickles never get unpickled."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.export.pt2_archive._package  # noqa: F401  (import before pickle is patched)

from salvo.backend import LoadedModel
from salvo.config import ModelConfig, TensorConfig
from salvo.errors import ConfigError, ModelFailed

CONFIG = ModelConfig(
    name="lin",
    max_batch_size=8,
    inputs=(TensorConfig(name="x", datatype="FP32", dims=(4,)),),
    outputs=(TensorConfig(name="y", datatype="FP32", dims=(3,)),),
)


class Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def save_script(version_dir: Path, module: torch.nn.Module | None = None) -> Path:
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.pt"
    torch.jit.save(torch.jit.script(module or Lin()), str(path))
    return path


def save_exported(version_dir: Path) -> Path:
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(Lin(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


class _NoUnpickling:
    """Make every Python unpickling entry point fail loudly while active."""

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("something tried to unpickle")

        class Refusing(pickle.Unpickler):
            def __init__(self, *args, **kwargs):
                refuse()

        self._patches = [
            mock.patch("pickle.load", refuse),
            mock.patch("pickle.loads", refuse),
            mock.patch("pickle.Unpickler", Refusing),
            mock.patch("torch.load", refuse),
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


@pytest.mark.parametrize("save", [save_script, save_exported])
def test_both_formats_load_without_unpickling_and_match_the_module(tmp_path, save):
    save(tmp_path / "1")
    with _NoUnpickling():
        model = LoadedModel.load(CONFIG, tmp_path / "1")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (y,), timings = model.run([x])
    with torch.inference_mode():
        expected = Lin()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert y.shape == (5, 3) and timings.infer_ns > 0


def test_plain_pickle_is_refused(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="model.pkl: refusing a pickle file"):
        LoadedModel.load(CONFIG, tmp_path / "1")


def test_pickle_named_model_pt_is_refused(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.pt").write_bytes(pickle.dumps({"a": 1}))
    with _NoUnpickling(), pytest.raises(ConfigError, match="the file is a pickle"):
        LoadedModel.load(CONFIG, tmp_path / "1")


def test_torch_save_checkpoint_is_refused(tmp_path):
    (tmp_path / "1").mkdir()
    torch.save(Lin().state_dict(), tmp_path / "1" / "model.pt")
    with _NoUnpickling(), pytest.raises(ConfigError, match="torch.save checkpoint"):
        LoadedModel.load(CONFIG, tmp_path / "1")


def test_pt2_with_a_pickled_payload_is_refused(tmp_path):
    path = save_exported(tmp_path / "1")
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            dst.writestr(info, data)
    tampered.replace(path)
    with _NoUnpickling(), pytest.raises(ConfigError, match="stored as a pickle"):
        LoadedModel.load(CONFIG, tmp_path / "1")


def test_missing_model_file(tmp_path):
    (tmp_path / "1").mkdir()
    with pytest.raises(ConfigError, match="no model file"):
        LoadedModel.load(CONFIG, tmp_path / "1")


class WrongRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1, :3]


class Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            raise RuntimeError("positive input")
        return x[:, :3]


class WrongDtype(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3].double()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (WrongRows(), "model 'lin' output 'y': expected 3 rows, one per input row, got 1"),
        (Raises(), "model 'lin' raised"),
        (WrongDtype(), "model 'lin' output 'y': expected FP32, got float64"),
    ],
)
def test_bad_model_output_fails_with_a_clear_message(tmp_path, module, message):
    save_script(tmp_path / "1", module)
    model = LoadedModel.load(CONFIG, tmp_path / "1")
    with pytest.raises(ModelFailed) as info:
        model.run([np.ones((3, 4), np.float32)])
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


def test_bf16_roundtrip(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    config = ModelConfig(
        name="bf",
        max_batch_size=4,
        inputs=(TensorConfig(name="x", datatype="BF16", dims=(2,)),),
        outputs=(TensorConfig(name="y", datatype="BF16", dims=(2,)),),
    )
    save_script(tmp_path / "1", Double())
    model = LoadedModel.load(config, tmp_path / "1")
    bits = (
        torch.tensor([[1.5, -3.0]], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    (out,), _ = model.run([bits])
    values = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float().tolist()
    assert values == [[3.0, -6.0]]
