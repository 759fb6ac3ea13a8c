"""Health, metadata, config and statistics of the demo models, through tritonclient."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

DEMO = {
    "digits": (
        {"image": ("FP32", [-1, 8, 8])},
        {"logits": ("FP32", [-1, 10]), "label": ("INT64", [-1, 1])},
    ),
    "mlp": ({"input": ("FP32", [-1, 64])}, {"output": ("FP32", [-1, 10])}),
    "resnet": ({"input": ("FP32", [-1, 3, 64, 64])}, {"output": ("FP32", [-1, 10])}),
}


@pytest.fixture(scope="module")
def client(demo_server):
    with tc.InferenceServerClient(demo_server.grpc_target) as c:
        yield c


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "salvo"
    assert "model_repository" in meta.extensions


@pytest.mark.parametrize("model", sorted(DEMO))
def test_model_ready_metadata_and_config(client, model):
    inputs, outputs = DEMO[model]
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta.name == model and list(meta.versions) == ["1"]
    assert {t.name: (t.datatype, list(t.shape)) for t in meta.inputs} == inputs
    assert {t.name: (t.datatype, list(t.shape)) for t in meta.outputs} == outputs
    config = client.get_model_config(model).config
    assert config.name == model and config.max_batch_size > 0
    # Triton's ModelConfig: dims without the batch dimension, datatypes as TYPE_* enums.
    assert {i.name: list(i.dims) for i in config.input} == {k: v[1][1:] for k, v in inputs.items()}
    assert {o.name: list(o.dims) for o in config.output} == {
        k: v[1][1:] for k, v in outputs.items()
    }
    assert config.input[0].data_type == tc.model_config_pb2.TYPE_FP32
    assert config.HasField("dynamic_batching")


async def test_asyncio_client(demo_server):
    async with tc_aio.InferenceServerClient(demo_server.grpc_target) as client:
        assert await client.is_server_live()
        assert await client.is_model_ready("mlp")
        meta = await client.get_model_metadata("mlp")
        assert meta.inputs[0].name == "input"


def test_unknown_model_is_not_ready_and_not_found(client):
    assert not client.is_model_ready("nope")
    with pytest.raises(tc.InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "nope" in info.value.message()
    with pytest.raises(tc.InferenceServerException) as info:
        client.get_model_metadata("mlp", "7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "version 7" in info.value.message()


def test_repository_index_lists_demo_models(client):
    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} == {
        (name, "1", "READY") for name in DEMO
    }


def test_grpc_health_and_reflection(demo_server):
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="inference.GRPCInferenceService"
                ),
            ]
        )
        listed, described = list(reflect.ServerReflectionInfo(requests, timeout=5))
        names = {s.name for s in listed.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        assert described.file_descriptor_response.file_descriptor_proto


def test_http_health_and_metrics(demo_server):
    for path, expected in (("/v2/health/live", b"live\n"), ("/v2/health/ready", b"ready\n")):
        with urllib.request.urlopen(demo_server.http_url + path, timeout=5) as reply:
            assert reply.status == 200 and reply.read() == expected
    with urllib.request.urlopen(demo_server.http_url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert 'salvo_model_ready{model="mlp"} 1.0' in text
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(demo_server.http_url + "/nope", timeout=5)
    assert info.value.code == 404


def test_statistics_count_an_inference(client):
    import numpy as np

    before = client.get_inference_statistics("mlp").model_stats[0]
    x = tc.InferInput("input", [3, 64], "FP32")
    x.set_data_from_numpy(np.zeros((3, 64), np.float32))
    client.infer("mlp", [x])
    after = client.get_inference_statistics("mlp").model_stats[0]
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert any(b.batch_size == 3 for b in after.batch_stats)
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} == set(DEMO)


def test_server_metadata_json_roundtrip(client):
    # as_json is how many scripts read metadata; it must parse.
    meta = client.get_model_metadata("digits", as_json=True)
    assert json.loads(json.dumps(meta))["name"] == "digits"
