"""The CUDA path: models resident on the GPU give the CPU's answers, through a real server.

Skipped where there is no GPU; run on a GPU machine with `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import collections
import queue
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from salvo.domain.config import ModelConfig, TensorConfig, load_config
from salvo.domain.status import ConfigError
from salvo.engine.backend import LoadedModel
from tests.servers import InProcessServer, ServerProcess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# cuDNN runs FP32 convolutions in TF32 on Ampere and newer by default (torch's default),
# which moves resnet's logits by up to about 3e-3; the tolerance allows for that.
TOLERANCE = {"rtol": 1e-2, "atol": 1e-2}

SHAPES = {"digits": (8, 8), "mlp": (64,), "resnet": (3, 64, 64)}


def _inputs(model: str, rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (rows, *SHAPES[model])).astype(np.float32)


def _on_cuda(config: ModelConfig, **optimization: object) -> ModelConfig:
    update = config.optimization.model_copy(update=optimization)
    return config.model_copy(update={"device": "cuda", "optimization": update})


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


def test_assembled_inputs_are_pinned_and_reused_per_instance(demo_repo):
    config = load_config(demo_repo / "mlp").model_copy(
        update={"device": "cuda", "instance_count": 2}
    )
    model = LoadedModel.load(config, demo_repo / "mlp" / "1")
    (first,) = model.assemble([[_inputs("mlp", 2)], [_inputs("mlp", 3, seed=1)]])
    assert isinstance(first, torch.Tensor) and first.is_pinned() and first.shape == (5, 64)
    np.testing.assert_array_equal(first.numpy()[2:], _inputs("mlp", 3, seed=1))
    (again,) = model.assemble([[_inputs("mlp", 7, seed=2)]])
    assert again.data_ptr() == first.data_ptr()  # the same pinned buffer, no allocation
    (other,) = model.assemble([[_inputs("mlp", 7, seed=2)]], instance=1)
    assert other.is_pinned() and other.data_ptr() != first.data_ptr()
    # Each instance runs on a stream of its own, not the default stream.
    streams = {i.stream.cuda_stream for i in model._instances}
    assert len(streams) == 2 and torch.cuda.default_stream().cuda_stream not in streams
    # Outputs are copies: the next batch through the same buffers leaves them alone.
    (out,), _ = model.run(model.assemble([[_inputs("mlp", 4, seed=3)]]))
    kept = out.copy()
    model.run(model.assemble([[_inputs("mlp", 4, seed=4)]]))
    np.testing.assert_array_equal(out, kept)


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "as saved"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_answer_like_eager_at_every_batch_size(demo_repo, precision, freeze):
    config = load_config(demo_repo / "resnet")  # the demo's resnet ships frozen
    eager = LoadedModel.load(
        _on_cuda(config, precision=precision, freeze=freeze), demo_repo / "resnet" / "1"
    )
    graphed = LoadedModel.load(
        _on_cuda(config, precision=precision, cuda_graphs=True, freeze=freeze),
        demo_repo / "resnet" / "1",
    )
    (instance,) = graphed._instances
    assert sorted(instance.graphs) == [1, 2, 4, 8, 16, 32]  # max_batch_size 32
    # Largest first, then fewer rows than the bucket holds: the padding must not leak in.
    for seed, rows in enumerate((32, 3, 17, 1, 8, 5)):
        x = _inputs("resnet", rows, seed=seed)
        assert instance.graph_for(rows).rows >= rows
        (got,), _ = graphed.run(graphed.assemble([[x]]))
        (want,), _ = eager.run(eager.assemble([[x]]))
        assert got.shape == (rows, 10)
        np.testing.assert_allclose(got, want, **TOLERANCE)


def test_server_with_graphs_and_two_instances_answers_concurrent_callers(demo_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo / "resnet", repo / "resnet")
    config = repo / "resnet" / "config.yaml"
    config.write_text(
        config.read_text() + "device: cuda\ninstance_count: 2\noptimization: {cuda_graphs: true}\n"
    )
    reference = LoadedModel.load(
        load_config(demo_repo / "resnet").model_copy(update={"device": "cpu"}),
        demo_repo / "resnet" / "1",
    )

    def call(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rows = 1 + seed % 5
        x = _inputs("resnet", rows, seed=seed)
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with tc.InferenceServerClient(server.grpc_target) as client:
            return x, client.infer("resnet", [tensor]).as_numpy("output")

    with InProcessServer(repo) as server:
        loaded = server.server.router.route("resnet").model
        assert len(loaded._instances) == 2 and all(i.graphs for i in loaded._instances)
        batches = collections.Counter()
        for index, instance in enumerate(loaded._instances):

            def counted(inputs, run=instance.run, index=index):
                batches[index] += 1
                return run(inputs)

            instance.run = counted
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(96)))
    assert batches[0] > 0 and batches[1] > 0, batches  # both instances served
    for x, got in answers:
        (want,), _ = reference.run([x])
        np.testing.assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_model_on_cuda_matches_the_cpu(demo_repo, cuda_graphs):
    config = load_config(demo_repo / "digits")
    compiled = LoadedModel.load(
        _on_cuda(config, compile=True, cuda_graphs=cuda_graphs), demo_repo / "digits" / "1"
    )
    reference = LoadedModel.load(
        config.model_copy(update={"device": "cpu"}), demo_repo / "digits" / "1"
    )
    assert isinstance(compiled.module, torch._dynamo.eval_frame.OptimizedModule)
    (instance,) = compiled._instances
    # The compiled module is what each graph captured (max_batch_size 64).
    assert sorted(instance.graphs) == ([1, 2, 4, 8, 16, 32, 64] if cuda_graphs else [])
    for rows in (1, 5, 64, 3):
        x = _inputs("digits", rows, seed=rows)
        got, _ = compiled.run(compiled.assemble([[x]]))
        want, _ = reference.run([x])
        np.testing.assert_allclose(got[0], want[0], **TOLERANCE)
        np.testing.assert_array_equal(got[1], want[1])


def test_device_memory_reaches_prometheus(demo_repo):
    with ServerProcess(demo_repo, "--torch-threads", "1") as server:
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            families = text_string_to_metric_families(reply.read().decode())
        samples = {(s.name, s.labels.get("device")): s.value for f in families for s in f.samples}
    allocated = samples[("salvo_cuda_memory_allocated_bytes", "cuda:0")]
    reserved = samples[("salvo_cuda_memory_reserved_bytes", "cuda:0")]
    assert 0 < allocated <= reserved  # the demo models' weights, at least


def test_server_batches_on_cuda_and_answers_like_the_cpu(demo_repo):
    config = load_config(demo_repo / "resnet").model_copy(update={"device": "cpu"})
    reference = LoadedModel.load(config, demo_repo / "resnet" / "1")
    with (
        InProcessServer(demo_repo) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
    ):
        assert server.server.router.route("resnet").model.device.type == "cuda"
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
    from salvo.domain.status import Overloaded

    config = load_config(demo_repo / "mlp").model_copy(update={"device": "cuda"})
    model = LoadedModel.load(config, demo_repo / "mlp" / "1")
    torch.cuda.empty_cache()  # warm-up's cached blocks would let the next batch fit
    hogs = []
    try:
        # Take every free byte, in ever smaller pieces down to the allocator's smallest
        # block, on the default stream and then on the instance's own: the allocator keeps
        # each stream's free blocks for that stream, and a hog on the default stream alone
        # left the instance's partly used segments room for the next batch (on an H200).
        for stream in (torch.cuda.current_stream(), model._instances[0].stream):
            with torch.cuda.stream(stream):
                for size in (1 << 30, 1 << 26, 1 << 22, 1 << 20, 1 << 16, 1 << 12, 512):
                    while True:
                        try:
                            hogs.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
                        except torch.cuda.OutOfMemoryError:
                            break
        with pytest.raises(Overloaded, match="ran out of device memory"):
            model.run(model.assemble([[_inputs("mlp", model.config.max_batch_size)]]))
    finally:
        hogs.clear()
        torch.cuda.empty_cache()
    (out,), _ = model.run(model.assemble([[_inputs("mlp", 2)]]))  # and the next one runs
    assert out.shape[0] == 2


class _RowMixer(torch.nn.Module):
    """Each row plus the sum of the batch's rows: padding that is not zero would show."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.sum(0, keepdim=True)


class _Uncapturable(torch.nn.Module):
    """Reads a value back to the host mid-pass, which no CUDA graph can hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum().item())


def _tiny(tmp_path: Path, module: torch.nn.Module, **optimization: object) -> LoadedModel:
    (tmp_path / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(tmp_path / "1" / "model.pt"))
    config = ModelConfig(
        name="tiny",
        max_batch_size=8,
        inputs=(TensorConfig(name="x", datatype="FP32", dims=(4,)),),
        outputs=(TensorConfig(name="y", datatype="FP32", dims=(4,)),),
    )
    return LoadedModel.load(_on_cuda(config, **optimization), tmp_path / "1")


def test_graph_padding_is_zeros_whatever_the_last_batch_left(tmp_path):
    model = _tiny(tmp_path, _RowMixer(), cuda_graphs=True)
    # 4 rows fill the 4-row bucket; 3 rows then run in it with one row of padding, which
    # the row mixer adds into every answer unless it is zero.
    for seed, rows in enumerate((4, 3, 8, 5, 1)):
        x = np.random.default_rng(seed).uniform(1, 2, (rows, 4)).astype(np.float32)
        (got,), _ = model.run(model.assemble([[x]]))
        np.testing.assert_allclose(got, x + x.sum(0, keepdims=True), rtol=1e-5)


def test_a_forward_pass_that_cannot_be_captured_fails_the_load_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match="optimization.cuda_graphs: cannot capture") as info:
        _tiny(tmp_path, _Uncapturable(), cuda_graphs=True)
    assert "model.pt" in str(info.value) and "at batch size 8" in str(info.value)
    # The loading thread is back on the default stream, and CUDA still works.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.ones(2, device="cuda").sum().item() == 2
