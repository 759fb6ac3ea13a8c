"""Models held by the test, for `salvo serve` processes started with this folder on PYTHONPATH.

Python imports `sitecustomize` at start-up. When SALVO_TEST_GATE names a FIFO (see
tests/e2e/gate.py), Salvo's TorchScript loader is wrapped so that:

- a model named `gated` is y = 2x whose every forward pass writes "gated forward" to stdout
  and then waits for one byte on the FIFO: the test lets each pass through;
- a model named `slow` writes "slow load" and does not finish loading until a byte arrives.

Everything else in the process is the real server; only these models are stand-ins (as
tests/gated.py is for servers in the test's own process).
"""

from __future__ import annotations

import os
import sys


def _install(gate_path: str) -> None:
    from salvo.engine import backend

    gate = os.open(gate_path, os.O_RDWR)  # read-write: opening never waits for a writer
    load_torchscript = backend.load_torchscript

    def gated(x):
        sys.stdout.write(f"gated forward rows={x.shape[0]}\n")
        sys.stdout.flush()
        os.read(gate, 1)
        return x * 2

    def load(path, device):
        model = path.parent.parent.name
        if model == "slow":
            sys.stdout.write("slow load\n")
            sys.stdout.flush()
            os.read(gate, 1)
        if model == "gated":
            return gated
        return load_torchscript(path, device)

    backend.load_torchscript = load


if os.environ.get("SALVO_TEST_GATE"):
    _install(os.environ["SALVO_TEST_GATE"])
