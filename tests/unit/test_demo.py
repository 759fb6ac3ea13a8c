"""The demo repository: layout, configs, loadable artifacts, determinism, digits accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from salvo.demo import DEMO_MODELS, build_demo_repo, describe
from salvo.domain.config import ModelConfig, load_config

# TorchScript is one of the formats Salvo serves; torch 2.13 warns on every jit.load.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning"
)

MODELS = ("digits", "mlp", "resnet")
TORCH_DTYPES = {"FP32": torch.float32, "INT64": torch.int64}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo_repo(root)
    return root


def load_model(model_dir: Path) -> torch.nn.Module:
    """Load version 1 the way a server would: TorchScript or torch.export, never pickle."""
    version_dir = model_dir / "1"
    if (version_dir / "model.pt2").exists():
        return torch.export.load(version_dir / "model.pt2").module()
    return torch.jit.load(str(version_dir / "model.pt"))


def sample_inputs(config: ModelConfig, batch: int, seed: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((batch, *spec.dims), generator=generator) * 16 for spec in config.inputs]


def run(model: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = model(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def test_layout_and_configs(repo: Path) -> None:
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    assert (repo / "digits" / "1" / "model.pt2").is_file()
    assert (repo / "mlp" / "1" / "model.pt").is_file()
    assert (repo / "resnet" / "1" / "model.pt").is_file()
    expected = {
        "digits": (
            64,
            [("image", "FP32", (8, 8))],
            [("logits", "FP32", (10,)), ("label", "INT64", (1,))],
        ),
        "mlp": (128, [("input", "FP32", (64,))], [("output", "FP32", (10,))]),
        "resnet": (32, [("input", "FP32", (3, 64, 64))], [("output", "FP32", (10,))]),
    }
    for name, (max_batch, inputs, outputs) in expected.items():
        config = load_config(repo / name)
        assert config.name == name
        assert config.max_batch_size == max_batch
        assert [(t.name, t.datatype, t.dims) for t in config.inputs] == inputs
        assert [(t.name, t.datatype, t.dims) for t in config.outputs] == outputs
        assert config.device == "auto"
        assert config.instance_count == (2 if name == "resnet" else 1)
        assert config.dynamic_batching is not None
        assert config.dynamic_batching.max_queue_delay_us > 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_config(repo: Path, name: str, batch: int) -> None:
    config = load_config(repo / name)
    outputs = run(load_model(repo / name), sample_inputs(config, batch))
    assert len(outputs) == len(config.outputs)
    for tensor, spec in zip(outputs, config.outputs, strict=True):
        assert tuple(tensor.shape) == (batch, *spec.dims), spec.name
        assert tensor.dtype == TORCH_DTYPES[spec.datatype], spec.name
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), spec.name


def test_models_accept_max_batch(repo: Path) -> None:
    for name in MODELS:
        config = load_config(repo / name)
        outputs = run(load_model(repo / name), sample_inputs(config, config.max_batch_size))
        assert all(t.shape[0] == config.max_batch_size for t in outputs), name


def test_digits_label_is_argmax_of_logits(repo: Path) -> None:
    config = load_config(repo / "digits")
    logits, label = run(load_model(repo / "digits"), sample_inputs(config, 5))
    assert torch.equal(label[:, 0], logits.argmax(dim=1))


def test_rows_are_independent(repo: Path) -> None:
    # A batched row must equal the same row run alone, or dynamic batching would change answers.
    for name in MODELS:
        config = load_config(repo / name)
        model = load_model(repo / name)
        inputs = sample_inputs(config, 4)
        batched = run(model, inputs)
        alone = run(model, [t[2:3] for t in inputs])
        for b, a in zip(batched, alone, strict=True):
            torch.testing.assert_close(b[2:3], a, rtol=1e-4, atol=1e-5)


def test_build_is_deterministic_and_restores_torch_state(repo: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state()
    build_demo_repo(tmp_path)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.random.get_rng_state(), rng)

    for name in MODELS:
        config = load_config(repo / name)
        assert load_config(tmp_path / name) == config
        inputs = sample_inputs(config, 3)
        first = run(load_model(repo / name), inputs)
        second = run(load_model(tmp_path / name), inputs)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b), name
    assert json.loads((tmp_path / "digits" / "heldout.json").read_text()) == json.loads(
        (repo / "digits" / "heldout.json").read_text()
    )


def test_digits_heldout_accuracy_recomputes(repo: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    heldout = json.loads((repo / "digits" / "heldout.json").read_text())
    data = load_digits()
    _, test_idx = train_test_split(
        np.arange(len(data.target)), test_size=0.25, random_state=0, stratify=data.target
    )
    assert heldout["test_indices"] == sorted(int(i) for i in test_idx)
    assert heldout["split"] == "train_test_split(test_size=0.25, random_state=0, stratify=y)"
    assert isinstance(heldout["seed"], int)

    indices = np.array(heldout["test_indices"])
    images = torch.from_numpy(data.data[indices].reshape(-1, 8, 8).astype(np.float32))
    _, label = run(load_model(repo / "digits"), [images])
    accuracy = float((label[:, 0].numpy() == data.target[indices]).mean())

    assert accuracy == pytest.approx(heldout["accuracy"], abs=1e-12)
    assert accuracy >= 0.93
    config = load_config(repo / "digits")
    assert config.parameters["heldout_accuracy"] == f"{heldout['accuracy']:.4f}"


def test_describe_lists_every_model() -> None:
    text = describe()
    assert set(DEMO_MODELS) == set(MODELS)
    for name in MODELS:
        assert f"{name}:" in text
