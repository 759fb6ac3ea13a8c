"""The CUDA path: models resident on the GPU give the CPU's answers, through a real server.

Skipped where there is no GPU; run on a GPU machine with `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

from salvo.backend import LoadedModel
from salvo.config import load_config
from tests.servers import InProcessServer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# cuDNN runs FP32 convolutions in TF32 on Ampere and newer by default (torch's default),
# which moves resnet's logits by up to about 3e-3; the tolerance allows for that.
TOLERANCE = {"rtol": 1e-2, "atol": 1e-2}

SHAPES = {"digits": (8, 8), "mlp": (64,), "resnet": (3, 64, 64)}


def _inputs(model: str, rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (rows, *SHAPES[model])).astype(np.float32)


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_model_on_cuda_matches_cpu(demo_repo, model):
    config = load_config(demo_repo / model)
    on_gpu = LoadedModel.load(config.model_copy(update={"device": "cuda"}), demo_repo / model / "1")
    on_cpu = LoadedModel.load(config.model_copy(update={"device": "cpu"}), demo_repo / model / "1")
    assert on_gpu.device.type == "cuda"
    x = _inputs(model, 5)
    got, _ = on_gpu.run(on_gpu.assemble([[x[:2]], [x[2:]]]))
    want, _ = on_cpu.run([x])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **TOLERANCE)


def test_assembled_inputs_are_pinned(demo_repo):
    config = load_config(demo_repo / "mlp").model_copy(update={"device": "cuda"})
    model = LoadedModel.load(config, demo_repo / "mlp" / "1")
    (buffer,) = model.assemble([[_inputs("mlp", 2)], [_inputs("mlp", 3, seed=1)]])
    assert isinstance(buffer, torch.Tensor) and buffer.is_pinned() and buffer.shape == (5, 64)


def test_server_batches_on_cuda_and_answers_like_the_cpu(demo_repo):
    config = load_config(demo_repo / "resnet").model_copy(update={"device": "cpu"})
    reference = LoadedModel.load(config, demo_repo / "resnet" / "1")
    with (
        InProcessServer(demo_repo) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
    ):
        assert server.server.models.get("resnet").model.device.type == "cuda"
        kind = client.get_model_config("resnet").config.instance_group[0].kind
        assert kind == tc.model_config_pb2.ModelInstanceGroup.KIND_GPU
        answers: queue.Queue = queue.Queue()
        sent = {}
        for i in range(32):
            x = _inputs("resnet", 1, seed=i)
            sent[str(i)] = x
            tensor = tc.InferInput("input", [1, 3, 64, 64], "FP32")
            tensor.set_data_from_numpy(x)
            client.async_infer(
                "resnet",
                [tensor],
                lambda result, error: answers.put((result, error)),
                request_id=str(i),
            )
        for _ in range(32):
            result, error = answers.get(timeout=30)
            assert error is None, error
            (want,), _ = reference.run([sent[result.get_response().id]])
            np.testing.assert_allclose(result.as_numpy("output"), want, **TOLERANCE)
        stats = client.get_inference_statistics("resnet").model_stats[0]
        assert stats.inference_count == 32
        assert stats.execution_count < 32  # concurrent requests shared batches


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lower_precision_on_cuda_stays_close_to_fp32(demo_repo, precision):
    config = load_config(demo_repo / "resnet").model_copy(update={"device": "cuda"})
    fp32 = LoadedModel.load(config, demo_repo / "resnet" / "1")
    optimization = config.optimization.model_copy(
        update={"precision": precision, "channels_last": True}
    )
    low = LoadedModel.load(
        config.model_copy(update={"optimization": optimization}), demo_repo / "resnet" / "1"
    )
    x = _inputs("resnet", 8)
    (got,), _ = low.run(low.assemble([[x]]))
    (want,), _ = fp32.run(fp32.assemble([[x]]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1)
    # Same predicted class for nearly every row: precision moved values, not answers.
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def test_a_batch_that_exhausts_device_memory_fails_alone(demo_repo):
    from salvo.errors import Overloaded

    config = load_config(demo_repo / "mlp").model_copy(update={"device": "cuda"})
    model = LoadedModel.load(config, demo_repo / "mlp" / "1")
    free, _ = torch.cuda.mem_get_info()
    hog = None
    try:
        # Leave less than one batch's activations free: the next forward pass cannot fit.
        hog = torch.empty(max(free - (1 << 20), 0), dtype=torch.uint8, device="cuda")
        with pytest.raises(Overloaded, match="ran out of device memory"):
            model.run(model.assemble([[_inputs("mlp", model.config.max_batch_size)]]))
    finally:
        del hog
        torch.cuda.empty_cache()
    (out,), _ = model.run(model.assemble([[_inputs("mlp", 2)]]))  # and the next one runs
    assert out.shape[0] == 2
