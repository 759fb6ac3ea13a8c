"""Export requirement lists from pyproject.toml for the image's dependency layers.

The Dockerfiles install dependencies from these lists before the wheel, so that a code change
rebuilds only the small wheel layer and never reinstalls torch or grpcio. pyproject.toml stays
the one place dependencies are declared: this only reads it.

Usage: python requirements.py PYPROJECT OUT_DIR
Writes OUT_DIR/runtime.txt (base dependencies plus the `server` extra, without torch, which
each image installs from its own index: CPU or CUDA) and OUT_DIR/build.txt (the build backend
and the pinned grpcio-tools that regenerates the stubs). Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# Installed from the PyTorch index by the image itself (its CUDA or CPU build, pinned there).
SEPARATE = {"torch"}
BUILD_TOOLS = {"grpcio-tools"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def export(pyproject: Path) -> tuple[list[str], list[str]]:
    """The runtime and build requirement lines declared by `pyproject`."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    extras = project.get("optional-dependencies", {})
    runtime = [r for r in [*project["dependencies"], *extras["server"]] if _name(r) not in SEPARATE]
    build = [
        *data["build-system"]["requires"],
        *(r for r in extras.get("dev", []) if _name(r) in BUILD_TOOLS),
    ]
    if not any(_name(r) in BUILD_TOOLS for r in build):
        raise SystemExit("pyproject.toml: the dev extra must pin grpcio-tools (stub generation)")
    return runtime, build


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    runtime, build = export(Path(argv[1]))
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.txt").write_text("\n".join(runtime) + "\n")
    (out / "build.txt").write_text("\n".join(build) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
