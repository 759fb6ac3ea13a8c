"""Shared fixtures; tests are marked unit / integration / e2e / gpu by their folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import ServerProcess

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.fspath).relative_to(TESTS).parts
        if parts and parts[0] in ("unit", "integration", "e2e", "gpu"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model repository, built once per pytest run exactly as `salvo demo-repo`."""
    from salvo.demo import build_demo_repo

    root = tmp_path_factory.mktemp("demo-repo")
    build_demo_repo(root)
    return root


@pytest.fixture(scope="session")
def demo_server(demo_repo: Path):
    """`salvo serve` on the demo repository, shared by the tests that only read from it."""
    with ServerProcess(demo_repo, "--torch-threads", "1") as server:
        yield server
