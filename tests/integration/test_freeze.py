"""`optimization.freeze`: the demo resnet (which ships frozen) served over gRPC to
concurrent tritonclient callers answers as the model as saved, unfrozen, does."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as tc

from salvo.domain.config import load_config
from salvo.engine.backend import LoadedModel
from tests.servers import InProcessServer


def test_frozen_resnet_answers_like_the_model_as_saved(demo_repo, tmp_path):
    # On the CPU, where the tolerance holds (cuDNN's TF32 moves logits by about 1e-3).
    shutil.copytree(demo_repo / "resnet", tmp_path / "resnet")
    config_file = tmp_path / "resnet" / "config.yaml"
    config_file.write_text(config_file.read_text() + "device: cpu\n")
    config = load_config(tmp_path / "resnet")
    assert config.optimization.freeze  # the demo's resnet is frozen at load
    unfrozen = config.optimization.model_copy(update={"freeze": False})
    as_saved = LoadedModel.load(
        config.model_copy(update={"optimization": unfrozen}), demo_repo / "resnet" / "1"
    )
    assert "prim::GetAttr" in str(as_saved.module.graph)  # really not frozen

    def call(seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(seed).standard_normal((1 + seed % 3, 3, 64, 64))
        x = x.astype(np.float32)
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with tc.InferenceServerClient(server.grpc_target) as client:
            return x, client.infer("resnet", [tensor]).as_numpy("output")

    with InProcessServer(tmp_path) as server:
        served = server.server.router.route("resnet").model.module
        assert "prim::GetAttr" not in str(served.graph)  # frozen: the weights are constants
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(24)))
    for x, got in answers:
        (want,), _ = as_saved.run(as_saved.assemble([[x]]))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
