"""External programs the tests drive. `make test` installs them (tools/check_deploy.sh), so
under CI (`CI` set, as .ci/run does) a missing one fails the test instead of skipping it:
a skip there would be a hole in what CI proves."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(tool: str) -> str:
    """The path of `tool`; outside CI a test without it is skipped."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed: run tools/check_deploy.sh install (as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path
