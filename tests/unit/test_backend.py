"""Model files: TorchScript and torch.export load and run; pickles never get unpickled."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.export.pt2_archive._package  # noqa: F401  (import before pickle is patched)

from salvo.domain.config import DynamicBatchingConfig, ModelConfig, OptimizationConfig, TensorConfig
from salvo.domain.status import ConfigError, ModelFailed, Overloaded, Status
from salvo.engine.backend import LoadedModel
from salvo.engine.cuda import graph_buckets

CONFIG = ModelConfig(
    name="lin",
    max_batch_size=8,
    inputs=(TensorConfig(name="x", datatype="FP32", dims=(4,)),),
    outputs=(TensorConfig(name="y", datatype="FP32", dims=(3,)),),
)
# For models that fail at run time on purpose (warm-up would refuse them at load).
NO_WARMUP = CONFIG.model_copy(update={"optimization": OptimizationConfig(warmup=False)})


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
    model = LoadedModel.load(NO_WARMUP, tmp_path / "1")
    with pytest.raises(ModelFailed) as info:
        model.run([np.ones((3, 4), np.float32)])
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


def test_warm_up_runs_each_batch_size_and_a_broken_model_fails_its_load(tmp_path):
    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rows_seen", torch.zeros(9, dtype=torch.int64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rows_seen[x.shape[0]] += 1
            return x[:, :3] * 0

    save_script(tmp_path / "1", Counting())
    config = CONFIG.model_copy(
        update={"dynamic_batching": DynamicBatchingConfig(preferred_batch_sizes=(4,))}
    )
    model = LoadedModel.load(config, tmp_path / "1")
    seen = model.module.rows_seen.tolist()
    assert [rows for rows, count in enumerate(seen) if count] == [1, 4, 8]
    assert seen[8] == 3  # the largest twice more, timed now that it is warm
    assert model.largest_batch_ns is not None and model.largest_batch_ns > 0

    save_script(tmp_path / "2", WrongRows())
    with pytest.raises(ConfigError, match=r"model\.pt: warm-up failed: model 'lin' output 'y'"):
        LoadedModel.load(CONFIG, tmp_path / "2")


@pytest.mark.parametrize(("precision", "tolerance"), [("fp16", 1e-2), ("bf16", 5e-2)])
def test_lower_precision_keeps_the_declared_datatypes(tmp_path, precision, tolerance):
    save_script(tmp_path / "1")
    reference = LoadedModel.load(CONFIG, tmp_path / "1")
    optimization = OptimizationConfig(precision=precision, channels_last=True)
    model = LoadedModel.load(
        CONFIG.model_copy(update={"optimization": optimization}), tmp_path / "1"
    )
    assert next(model.module.parameters()).dtype == getattr(
        torch, {"fp16": "float16", "bf16": "bfloat16"}[precision]
    )
    x = np.random.default_rng(0).uniform(-1, 1, (5, 4)).astype(np.float32)
    (got,), _ = model.run([x])
    (want,), _ = reference.run([x])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=tolerance)


def test_device_out_of_memory_fails_the_batch_with_resource_exhausted(tmp_path):
    class Hungry:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = LoadedModel(CONFIG, tmp_path / "model.pt", Hungry(), torch.device("cpu"))
    with pytest.raises(
        Overloaded, match="model 'lin' ran out of device memory on a batch of 3 rows"
    ) as info:
        model.run([np.ones((3, 4), np.float32)])
    assert info.value.status is Status.RESOURCE_EXHAUSTED


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


@pytest.mark.parametrize(
    ("max_batch_size", "preferred", "buckets"),
    [
        (32, (), [32, 16, 8, 4, 2, 1]),
        (12, (6, 12), [12, 8, 6, 4, 2, 1]),
        (1, (), [1]),
        (0, (), [None]),
    ],
)
def test_cuda_graph_buckets_cover_every_batch_size(max_batch_size, preferred, buckets):
    config = CONFIG.model_copy(
        update={
            "max_batch_size": max_batch_size,
            "dynamic_batching": DynamicBatchingConfig(preferred_batch_sizes=preferred),
        }
    )
    assert graph_buckets(config) == buckets


def test_compile_is_refused_for_torchscript_naming_the_file(tmp_path):
    path = save_script(tmp_path / "1")
    config = CONFIG.model_copy(update={"optimization": OptimizationConfig(compile=True)})
    with pytest.raises(
        ConfigError, match="optimization.compile needs a torch.export model"
    ) as info:
        LoadedModel.load(config, tmp_path / "1")
    assert str(path) in str(info.value)


def test_freeze_is_refused_for_torch_export_naming_the_file(tmp_path):
    path = save_exported(tmp_path / "1")
    config = CONFIG.model_copy(update={"optimization": OptimizationConfig(freeze=True)})
    with pytest.raises(ConfigError, match="optimization.freeze applies to TorchScript") as info:
        LoadedModel.load(config, tmp_path / "1")
    assert str(path) in str(info.value)


class ConvNet(torch.nn.Module):
    """A convolution, a batch norm and a ReLU: what freezing folds and pre-packs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.norm.running_var.uniform_(0.5, 2.0)
        self.head = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


CONV = ModelConfig(
    name="conv",
    max_batch_size=8,
    inputs=(TensorConfig(name="x", datatype="FP32", dims=(3, 8, 8)),),
    outputs=(TensorConfig(name="y", datatype="FP32", dims=(3,)),),
)


def test_a_frozen_torchscript_model_answers_like_the_model(tmp_path):
    save_script(tmp_path / "1", ConvNet().eval())
    plain = LoadedModel.load(CONV, tmp_path / "1")
    config = CONV.model_copy(update={"optimization": OptimizationConfig(freeze=True)})
    frozen = LoadedModel.load(config, tmp_path / "1")
    assert "prim::GetAttr" in str(plain.module.graph)
    assert "prim::GetAttr" not in str(frozen.module.graph)  # the weights are constants now
    for rows in (1, 3, 8):
        x = np.random.default_rng(rows).standard_normal((rows, 3, 8, 8)).astype(np.float32)
        (got,), _ = frozen.run(frozen.assemble([[x]]))
        (want,), _ = plain.run(plain.assemble([[x]]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_be_frozen_fails_its_load_naming_the_option(tmp_path, monkeypatch):
    path = save_script(tmp_path / "1")

    def refuse(module):
        raise RuntimeError("cannot optimize this one\nsecond line")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", refuse)
    config = CONFIG.model_copy(update={"optimization": OptimizationConfig(freeze=True)})
    with pytest.raises(ConfigError) as info:
        LoadedModel.load(config, tmp_path / "1")
    assert str(info.value) == (
        f"{path}: optimization.freeze: cannot freeze the model: "
        "RuntimeError: cannot optimize this one"
    )


def test_read_only_request_arrays_run_with_user_warnings_as_errors(tmp_path):
    """Request arrays are read-only views of the request's bytes, and torch warns about
    them (once a process: hence a fresh interpreter, where no other test warned first)."""
    save_script(tmp_path / "1")
    script = f"""
from pathlib import Path
import numpy as np
from salvo.engine.backend import LoadedModel
from tests.unit.test_backend import CONFIG
model = LoadedModel.load(CONFIG, Path({str(tmp_path / "1")!r}))
x = np.frombuffer(np.ones((2, 4), np.float32).tobytes(), np.float32).reshape(2, 4)
assert not x.flags.writeable
(y,), _ = model.run([x])
print(y.shape)
"""
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(2, 3)"
