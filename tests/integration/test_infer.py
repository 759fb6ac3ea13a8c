"""ModelInfer and ModelStreamInfer on the demo models, checked against the model files."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from salvo.frontends.grpc.codec import encode_tensor_typed
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc


def run_file(repo: Path, model: str, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run the model file directly, outside Salvo."""
    version_dir = repo / model / "1"
    if (version_dir / "model.pt").exists():
        module = torch.jit.load(str(version_dir / "model.pt"))
    else:
        module = torch.export.load(str(version_dir / "model.pt2")).module()
    with torch.inference_mode():
        out = module(*(torch.from_numpy(x) for x in inputs))
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]


def rng_input(shape, seed=0, high=1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, high, size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def client(demo_server):
    with tc.InferenceServerClient(demo_server.grpc_target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(demo_server):
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


CASES = [
    ("mlp", "input", (4, 64), ["output"]),
    ("resnet", "input", (2, 3, 64, 64), ["output"]),
    ("digits", "image", (5, 8, 8), ["logits", "label"]),
]


@pytest.mark.parametrize(("model", "name", "shape", "outputs"), CASES)
def test_raw_infer_matches_model_file(client, demo_repo, model, name, shape, outputs):
    x = rng_input(shape, high=16.0 if model == "digits" else 1.0)
    tensor = tc.InferInput(name, list(shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], request_id="req-1")
    assert result.get_response().id == "req-1"
    assert result.get_response().model_version == "1"
    expected = run_file(demo_repo, model, x)
    for out_name, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(result.as_numpy(out_name), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model", "name", "shape", "outputs"), CASES)
def test_typed_contents_match_model_file(stub, demo_repo, model, name, shape, outputs):
    x = rng_input(shape, seed=1, high=16.0 if model == "digits" else 1.0)
    request = pb.ModelInferRequest(model_name=model, id="typed")
    request.inputs.add(name=name, datatype="FP32", shape=shape).contents.CopyFrom(
        encode_tensor_typed("FP32", x)
    )
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed"
    expected = run_file(demo_repo, model, x)
    assert [o.name for o in response.outputs] == outputs
    for out, raw, want in zip(
        response.outputs, response.raw_output_contents, expected, strict=True
    ):
        got = np.frombuffer(raw, dtype=want.dtype).reshape(tuple(out.shape))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_requested_output_subset(client, demo_repo):
    x = rng_input((3, 8, 8), seed=2, high=16.0)
    tensor = tc.InferInput("image", [3, 8, 8], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], outputs=[tc.InferRequestedOutput("label")])
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("logits") is None
    np.testing.assert_array_equal(result.as_numpy("label"), run_file(demo_repo, "digits", x)[1])


def test_digits_accuracy_through_the_server_equals_recorded(client, demo_repo):
    from sklearn.datasets import load_digits

    record = json.loads((demo_repo / "digits" / "heldout.json").read_text())
    data = load_digits()
    indices = np.array(record["test_indices"])
    images = data.images[indices].astype(np.float32)
    labels = data.target[indices]
    predicted = []
    for start in range(0, len(images), 64):
        chunk = images[start : start + 64]
        tensor = tc.InferInput("image", list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk)
        result = client.infer("digits", [tensor], outputs=[tc.InferRequestedOutput("label")])
        predicted.append(result.as_numpy("label").reshape(-1))
    accuracy = float(np.mean(np.concatenate(predicted) == labels))
    assert accuracy == pytest.approx(record["accuracy"], abs=1e-12)
    assert accuracy > 0.9


async def test_asyncio_client_infer(demo_server, demo_repo):
    x = rng_input((2, 64), seed=3)
    async with tc_aio.InferenceServerClient(demo_server.grpc_target) as client:
        tensor = tc_aio.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], request_id="aio")
    assert result.get_response().id == "aio"
    np.testing.assert_allclose(
        result.as_numpy("output"), run_file(demo_repo, "mlp", x)[0], rtol=1e-5
    )


def test_stream_answers_each_request_and_survives_a_bad_one(demo_server, demo_repo):
    answers: queue.Queue = queue.Queue()
    good = rng_input((1, 64), seed=4)
    with tc.InferenceServerClient(demo_server.grpc_target) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, shape in enumerate([(1, 64), (1, 63), (1, 64)]):
            tensor = tc.InferInput("input", list(shape), "FP32")
            tensor.set_data_from_numpy(good if shape == (1, 64) else np.zeros(shape, np.float32))
            client.async_stream_infer("mlp", [tensor], request_id=f"s{i}")
        got = [answers.get(timeout=30) for _ in range(3)]
        client.stop_stream()
    by_id = {}
    for result, error in got:
        if error is None:
            by_id[result.get_response().id] = result
        else:
            by_id["error"] = error
    assert set(by_id) == {"s0", "s2", "error"}
    assert "input 'input': expected shape [-1, 64], got [1, 63]" in by_id["error"].message()
    want = run_file(demo_repo, "mlp", good)[0]
    for key in ("s0", "s2"):
        np.testing.assert_allclose(by_id[key].as_numpy("output"), want, rtol=1e-5)


def test_stream_error_carries_the_request_id(stub):
    def requests():
        yield pb.ModelInferRequest(model_name="nope", id="missing")

    (reply,) = list(stub.ModelStreamInfer(requests(), timeout=30))
    assert reply.infer_response.id == "missing"
    assert "unknown model 'nope'" in reply.error_message
