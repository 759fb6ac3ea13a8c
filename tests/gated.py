"""A model for deterministic batching tests: it records what it ran and, while held, waits
for the test to release each forward pass.

It is called through Salvo's real LoadedModel (conversions, row checks, timings), so only
the network in the middle is replaced by a Python function.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from salvo.domain.config import ModelConfig
from salvo.engine.backend import LoadedModel

POISON = -1.0
"""A request carrying this value makes its batch raise."""


class GatedModule:
    """y = 2x, over whatever batch arrives; every batch recorded as the list of its row ids."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.threads: list[int] = []
        """The thread each forward pass ran on (threading.get_ident)."""
        self._held = False
        self._tokens = threading.Semaphore(0)
        self._changed = threading.Condition()

    def hold(self) -> None:
        """From now on each forward pass waits for `release`."""
        self._held = True

    def release(self, batches: int = 1) -> None:
        for _ in range(batches):
            self._tokens.release()

    def open(self) -> None:
        """Stop holding; let any waiting pass go."""
        self._held = False
        self.release(64)

    def wait_batches(self, count: int, timeout_s: float = 30) -> None:
        """Block until `count` forward passes have started."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.batches) >= count, timeout_s):
                raise AssertionError(f"only {len(self.batches)} batches ran, wanted {count}")

    @property
    def ran(self) -> set[float]:
        """Every row id that reached a forward pass."""
        return {row for batch in self.batches for row in batch}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._changed:
            self.batches.append([float(v) for v in x.reshape(x.shape[0], -1)[:, 0]])
            self.threads.append(threading.get_ident())
            self.shapes.append(tuple(x.shape))
            self._changed.notify_all()
        if self._held and not self._tokens.acquire(timeout=60):
            raise RuntimeError("gated model was never released")
        if bool((x == POISON).any()):
            raise RuntimeError("poisoned batch")
        return x * 2


class GatedLoader:
    """A ModelManager loader that gives every model a GatedModule (kept in `modules`)."""

    def __init__(self) -> None:
        self.modules: dict[str, GatedModule] = {}

    def __call__(self, config: ModelConfig, version_dir: Path) -> LoadedModel:
        module = self.modules.setdefault(config.name, GatedModule())
        return LoadedModel(config, version_dir / "model.pt", module, torch.device("cpu"))


def write_model(root: Path, name: str, config_yaml: str) -> None:
    """A model directory for the gated loader: a config and an empty version directory."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.yaml").write_text(config_yaml)


@contextlib.contextmanager
def serving(root: Path, loader: GatedLoader, models: dict[str, str]) -> Iterator[Any]:
    """A real in-process Salvo serving `models` (name: config YAML) from a new repository
    under `root`, every model a GatedModule from `loader`."""
    from tests.servers import InProcessServer

    for name, text in models.items():
        write_model(root, name, text)
    with InProcessServer(root, loader) as server:
        yield server
