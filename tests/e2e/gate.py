"""Holding models inside `salvo serve` processes: the test side of tests/e2e/hooks.

A Gate is a FIFO that one server process reads: each forward pass of its `gated` model, and
the end of its `slow` model's load, takes one byte, which `release` writes.
"""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).with_name("hooks")
ROOT = Path(__file__).resolve().parents[2]

GATED_CONFIG = """\
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
dynamic_batching: {max_queue_delay_us: 0}
optimization: {warmup: false}  # a warm-up pass would wait on the gate
"""


def write_model(root: Path, name: str) -> None:
    """A model directory the hooks stand in for (`gated` or `slow`): config, placeholder file."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.yaml").write_text(GATED_CONFIG)
    (root / name / "1" / "model.pt").write_bytes(b"")


class Gate:
    """The FIFO that holds one server's gated passes and slow load."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)

    def env(self) -> dict[str, str]:
        """Environment for a ServerProcess: the hooks on its path, reading this gate."""
        path = os.pathsep.join(
            p for p in (str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH")) if p
        )
        return {"PYTHONPATH": path, "SALVO_TEST_GATE": str(self.path)}

    def release(self, passes: int = 1) -> None:
        """Let `passes` forward passes (or a slow load) through; the server must be running."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"x" * passes)
        finally:
            os.close(fd)
