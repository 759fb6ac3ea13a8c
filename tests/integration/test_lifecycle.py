"""The shutdown gate on a real server with auth on: the access interceptor wraps the v2
handlers (and caches its wrappers), and a closed gate must still refuse through them.
Signals and whole drains are tested on processes in tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from salvo_client import InferenceClient, Unavailable
from tests.servers import InProcessServer

TOKEN = "lifecycle-test-token"
X = {"input": np.zeros((1, 64), np.float32)}


def test_a_closed_gate_refuses_through_the_access_interceptor(demo_repo, tmp_path) -> None:
    shutil.copytree(demo_repo / "mlp", tmp_path / "mlp")
    with (
        InProcessServer(Path(tmp_path), auth_token=TOKEN) as server,
        InferenceClient(server.grpc_target, token=TOKEN, retries=0) as client,
    ):
        assert client.infer("mlp", X)["output"].shape == (1, 10)  # the wrapper is now cached

        async def close() -> None:
            server.server.grpc.close("the server is shutting down")

        server.call(close())
        with pytest.raises(Unavailable, match="shutting down"):
            client.infer("mlp", X)
