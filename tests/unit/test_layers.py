"""The import contracts (pyproject's [tool.importlinter]) hold, and would catch a break.

`lint-imports` runs over a copy of the two packages, first as they are, then with one
forbidden import added per case: each must break the contract that forbids it, by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages and the contracts, importable from its own folder."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "server" / "salvo", root / "salvo")
    shutil.copytree(ROOT / "client" / "salvo_client", root / "salvo_client")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    # The copy comes first on the path, ahead of the installed (editable) packages.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_packages_keep_every_contract(tree: Path):
    run = lint(tree)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("engine/batches.py", "import grpc", "import no gRPC, protobuf or stubs"),
        ("core/router.py", "from google.protobuf import message", "import no gRPC, protobuf"),
        ("domain/types.py", "from salvo_client.proto import grpc_service_pb2", "or stubs"),
        ("frontends/grpc/codec.py", "import torch", "Front ends use no torch"),
        ("frontends/http/server.py", "from salvo.engine import scheduler", "no engine"),
        ("core/dataplane.py", "from salvo.frontends.grpc import wire", "Layers"),
        ("engine/repository.py", "from salvo.core import cache", "Layers"),
        ("frontends/http/status.py", "from salvo.frontends.grpc import status", "know each"),
        ("demo.py", "from salvo.frontends.grpc import codec", "Nothing imports a front end"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tree: Path, module: str, line: str, contract: str):
    path = tree / "salvo" / module
    original = path.read_text()
    head, sep, rest = original.partition("from __future__ import annotations\n")
    path.write_text(f"{head}{sep}\n{line}  # noqa\n{rest}")
    try:
        run = lint(tree)
    finally:
        path.write_text(original)
    assert run.returncode != 0, run.stdout
    broken = run.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, run.stdout
