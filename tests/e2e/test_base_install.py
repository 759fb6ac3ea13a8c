"""The base install alone (no extras, so no torch) is a working client.

A fresh venv gets `pip install` of the project with no extras, then runs an inference
against the demo server with `salvo_client.InferenceClient`. Set SALVO_SKIP_BASE_INSTALL=1
to skip it where nothing can be installed; CI runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.environ.get("SALVO_SKIP_BASE_INSTALL") == "1",
    reason="SALVO_SKIP_BASE_INSTALL=1",
)

SCRIPT = """
import importlib.metadata, importlib.util, sys
import numpy as np
from salvo_client import InferenceClient, NotFound

assert importlib.util.find_spec("torch") is None, "torch is installed"
requires = importlib.metadata.requires("salvo") or []
base = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip()
              for r in requires if "extra ==" not in r)
assert base == ["grpcio", "numpy", "protobuf"], base
with InferenceClient(sys.argv[1], timeout_s=30) as client:
    assert client.server_ready()
    out = client.infer("mlp", {"input": np.ones((2, 64), np.float32)})
    assert out["output"].shape == (2, 10) and out["output"].dtype == np.float32
    try:
        client.infer("nope", {"input": np.ones((1, 64), np.float32)})
    except NotFound as exc:
        assert exc.message == "unknown model 'nope'", exc.message
    else:
        raise AssertionError("no NotFound")
import salvo_client.commands
assert salvo_client.commands.main(["models", "--url", sys.argv[1]]) == 0
assert "torch" not in sys.modules
print("ok", salvo_client.__file__, out["output"].tolist())
"""


def _copy_project(dest: Path) -> Path:
    """The files a build needs, copied so that building leaves the work tree untouched."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "server" / "salvo", dest / "server" / "salvo", ignore=ignore)
    shutil.copytree(
        ROOT / "client" / "salvo_client", dest / "client" / "salvo_client", ignore=ignore
    )
    return dest


def test_base_install_runs_an_inference_without_torch(tmp_path, demo_server):
    project = _copy_project(tmp_path / "project")
    venv = tmp_path / "venv"
    # Only the variables a pip and a client need: nothing that points into this checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(project)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run(
        [str(python), "-c", SCRIPT, demo_server.grpc_target],
        env=env,
        cwd=tmp_path,  # not the checkout, whose packages would shadow the installed ones
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1].startswith(f"ok {venv}")  # the installed package, not the checkout
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "READY", "REASON"]
    assert ["mlp", "1", "READY", "yes"] in [line.split() for line in lines]
