"""The demo model repository behind `salvo demo-repo DIR`: three small models, built offline.

    digits/  config.yaml, heldout.json, 1/model.pt2  an MLP trained on scikit-learn's digits
    mlp/     config.yaml, 1/model.pt                 64 -> 256 -> 256 -> 10, overhead-bound
    resnet/  config.yaml, 1/model.pt                 ResNet-18 layout on 3x64x64, compute-bound

Every weight comes from a fixed seed and the build runs single-threaded with deterministic
algorithms, so two builds give the same outputs for the same input. The caller's RNG, thread
count and determinism flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from salvo.domain.config import (
    DynamicBatchingConfig,
    ModelConfig,
    OptimizationConfig,
    TensorConfig,
    write_config,
)

SEED = 0
DIGITS_SPLIT = "train_test_split(test_size=0.25, random_state=0, stratify=y)"
DIGITS_TRAIN_STEPS = 300

DEMO_MODELS: dict[str, str] = {
    "digits": "torch.export MLP trained on sklearn's 8x8 digits: image FP32 [8,8] (pixels 0..16)"
    " -> logits FP32 [10], label INT64 [1]",
    "mlp": "TorchScript MLP 64 -> 256 -> 256 -> 10 with seeded weights: input FP32 [64]"
    " -> output FP32 [10]; overhead-bound",
    "resnet": "TorchScript ResNet-18 layout with seeded weights: input FP32 [3,64,64]"
    " -> output FP32 [10]; compute-bound",
}


def describe() -> str:
    """One line per demo model: its name and what it takes and returns."""
    return "\n".join(f"{name}: {summary}" for name, summary in DEMO_MODELS.items())


def build_demo_repo(root: Path) -> None:
    """Write the demo model repository under `root` (created if missing; files overwritten)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        _build_digits(root / "digits")
        _build_mlp(root / "mlp")
        _build_resnet(root / "resnet")


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Single thread, deterministic kernels, a forked RNG; the caller's settings come back after.

    One thread because reductions split across threads may sum in another order, and the
    trained digits weights would then differ from build to build.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _save_version(model_dir: Path, config: ModelConfig) -> Path:
    """Write the config and return the version-1 directory, created."""
    write_config(model_dir, config)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    return version_dir


def _save_torchscript(model: nn.Module, path: Path) -> None:
    """Script `model` and save it; TorchScript is one of Salvo's two formats, so torch's
    deprecation notice for it is noise to someone building the demo."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))


# --- digits -------------------------------------------------------------------------------


class DigitsNet(nn.Module):
    """64 -> 64 -> 10 MLP on raw 8x8 digit images; returns (logits, label [batch, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        # Pixels arrive as 0..16; centre them on zero so training converges in few steps.
        return self.net(image / 8.0 - 1.0)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(image)
        return logits, logits.argmax(dim=1, keepdim=True)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits images ([n, 8, 8] float32), labels, and the train and test indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)
    labels = data.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def _build_digits(model_dir: Path) -> None:
    images, labels, train_idx, test_idx = digits_split()
    torch.manual_seed(SEED)
    model = DigitsNet()
    x_train = torch.from_numpy(images[train_idx])
    y_train = torch.from_numpy(labels[train_idx])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    model.train()
    for _ in range(DIGITS_TRAIN_STEPS):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model.logits(x_train), y_train)
        loss.backward()
        optimiser.step()
    model.eval()

    batch = torch.export.Dim("batch", min=1)
    # Batch 2 as the example: export specialises a dimension traced at size 1.
    exported = torch.export.export(
        model, (torch.zeros(2, 8, 8),), dynamic_shapes={"image": {0: batch}}
    )
    # Measured through the exported program, the artifact that is saved and served.
    accuracy = digits_accuracy(exported.module(), images, labels, test_idx)

    config = ModelConfig(
        name="digits",
        max_batch_size=64,
        inputs=(TensorConfig(name="image", datatype="FP32", dims=(8, 8)),),
        outputs=(
            TensorConfig(name="logits", datatype="FP32", dims=(10,)),
            TensorConfig(name="label", datatype="INT64", dims=(1,)),
        ),
        device="auto",
        instance_count=1,
        dynamic_batching=DynamicBatchingConfig(max_queue_delay_us=500),
        parameters={
            "heldout_accuracy": f"{accuracy:.4f}",
            # How `salvo batch` turns an image file into `image` (salvo_client.batch.images):
            # 8x8 grey pixels, 0..255 mapped onto the training data's 0..16, ink bright.
            "image.layout": "HW",
            "image.mode": "L",
            "image.size": "8,8",
            "image.scale": "0,16",
        },
    )
    version_dir = _save_version(model_dir, config)
    torch.export.save(exported, version_dir / "model.pt2")
    heldout = {
        "accuracy": accuracy,
        "test_indices": [int(i) for i in test_idx],
        "seed": SEED,
        "split": DIGITS_SPLIT,
    }
    (model_dir / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")


def digits_accuracy(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> float:
    """Fraction of `indices` whose `label` output from `model` matches the true label."""
    with torch.inference_mode():
        _, predicted = model(torch.from_numpy(images[indices]))
    correct = int((predicted[:, 0].numpy() == labels[indices]).sum())
    return correct / len(indices)


# --- mlp ----------------------------------------------------------------------------------


def _build_mlp(model_dir: Path) -> None:
    torch.manual_seed(SEED + 1)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).eval()
    config = ModelConfig(
        name="mlp",
        max_batch_size=128,
        inputs=(TensorConfig(name="input", datatype="FP32", dims=(64,)),),
        outputs=(TensorConfig(name="output", datatype="FP32", dims=(10,)),),
        device="auto",
        instance_count=1,
        dynamic_batching=DynamicBatchingConfig(max_queue_delay_us=500),
    )
    version_dir = _save_version(model_dir, config)
    _save_torchscript(model, version_dir / "model.pt")


# --- resnet -------------------------------------------------------------------------------


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Conv2d:
    """`conv` followed by eval-mode `bn`, as one conv with a bias: one kernel fewer per layer."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    return fuse_conv_bn_eval(conv, bn)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block; a 1x1 conv projects the shortcut when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    def fold_batchnorm(self) -> None:
        """Fold each eval-mode BatchNorm into the conv before it, leaving Identity behind."""
        self.conv1 = _fold(self.conv1, self.bn1)
        self.bn1 = nn.Identity()
        self.conv2 = _fold(self.conv2, self.bn2)
        self.bn2 = nn.Identity()
        if isinstance(self.shortcut, nn.Sequential):
            self.shortcut = _fold(self.shortcut[0], self.shortcut[1])


class ResNet(nn.Module):
    """ResNet-18's layout (7x7/2 stem, max-pool, 2+2+2+2 blocks, 64..512 channels), 10 classes.

    At 3x64x64 the stages run on 16, 8, 4 and 2 pixels square, about 0.15 GFLOP a sample:
    milliseconds of compute per row, so batching pays off and serving overhead does not show.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.stem_bn: nn.Module = nn.BatchNorm2d(widths[0])
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, 1 if stage == 0 else 2))
            blocks.append(BasicBlock(width, width, 1))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem_bn(self.stem(x))))
        x = self.blocks(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm into its conv; call in eval mode, after calibration."""
        self.stem = _fold(self.stem, self.stem_bn)
        self.stem_bn = nn.Identity()
        for block in self.blocks:
            assert isinstance(block, BasicBlock)
            block.fold_batchnorm()


def _build_resnet(model_dir: Path) -> None:
    torch.manual_seed(SEED + 2)
    model = ResNet()
    # Calibrate BatchNorm on one seeded random batch so that activations stay near unit scale
    # through the residual stack instead of growing block by block with random weights.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the running stats become this batch's
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 64, 64))
    model.eval()
    model.fold_batchnorm()

    config = ModelConfig(
        name="resnet",
        max_batch_size=32,
        inputs=(TensorConfig(name="input", datatype="FP32", dims=(3, 64, 64)),),
        outputs=(TensorConfig(name="output", datatype="FP32", dims=(10,)),),
        device="auto",
        # Two instances: on a CPU they share the cores (each batch on the intra-op threads
        # divided by the instances busy at its start), so that under load one batch runs
        # while the other's requests come in (1.2x at concurrency 64: make bench-instances).
        instance_count=2,
        dynamic_batching=DynamicBatchingConfig(max_queue_delay_us=10000),
        # Frozen and optimized for inference at load: 1.2x served on a 2-core CPU
        # (make bench-freeze).
        optimization=OptimizationConfig(freeze=True),
    )
    version_dir = _save_version(model_dir, config)
    _save_torchscript(model, version_dir / "model.pt")
