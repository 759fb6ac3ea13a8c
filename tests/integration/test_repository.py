"""Loading and unloading through the repository RPCs, while other models keep serving; bad
model directories (pickles, checkpoints, config errors) are refused with clear reasons."""

from __future__ import annotations

import shutil
import threading

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import ServerProcess

MLP_CONFIG = """max_batch_size: 8
inputs: [{name: input, datatype: FP32, dims: [64]}]
outputs: [{name: output, datatype: FP32, dims: [10]}]
"""


def _status(exc: tc.InferenceServerException) -> str:
    return exc.status().removeprefix("StatusCode.")


@pytest.fixture()
def repo(tmp_path, demo_repo):
    root = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    shutil.copytree(demo_repo / "digits", root / "digits")
    # A pickle, under a name a user might try.
    (root / "pickled" / "1").mkdir(parents=True)
    (root / "pickled" / "config.yaml").write_text(MLP_CONFIG)
    (root / "pickled" / "1" / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    # A torch.save checkpoint (a pickle inside a zip) posing as model.pt.
    (root / "ckpt" / "1").mkdir(parents=True)
    (root / "ckpt" / "config.yaml").write_text(MLP_CONFIG)
    torch.save({"w": torch.zeros(2)}, root / "ckpt" / "1" / "model.pt")
    # A config error.
    shutil.copytree(demo_repo / "mlp" / "1", root / "badconfig" / "1")
    (root / "badconfig" / "config.yaml").write_text(
        MLP_CONFIG.replace("FP32, dims: [64]", "FP23, dims: [64]")
    )
    return root


def mlp_input(value: float = 1.0) -> tc.InferInput:
    x = tc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.full((1, 64), value, np.float32))
    return x


def _start(repo) -> ServerProcess:
    # With broken models the server is live but never ready (strict readiness), so wait
    # for the end of start-up in its log instead of for health SERVING.
    server = ServerProcess(repo).start(wait_ready=False)
    server.wait_for_line(r'"ready: ')
    return server


def test_refusals_load_unload_and_readiness(repo):
    server = _start(repo)
    try:
        with tc.InferenceServerClient(server.grpc_target) as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert index["mlp"].state == "READY" and index["digits"].state == "READY"
            assert index["pickled"].state == "UNAVAILABLE"
            assert "model.pkl: refusing a pickle file" in index["pickled"].reason
            assert index["ckpt"].state == "UNAVAILABLE"
            assert "torch.save checkpoint" in index["ckpt"].reason
            assert "config.yaml: field 'inputs.0.datatype'" in index["badconfig"].reason
            assert "FP23" in index["badconfig"].reason

            # Strict readiness: live, not ready, yet the good models serve; the "liveness"
            # health service stays SERVING (orchestrators must not restart this process).
            assert client.is_server_live() and not client.is_server_ready()
            with grpc.insecure_channel(server.grpc_target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                statuses = {
                    name: health.Check(health_pb2.HealthCheckRequest(service=name)).status
                    for name in ("", "liveness")
                }
            assert statuses == {
                "": health_pb2.HealthCheckResponse.NOT_SERVING,
                "liveness": health_pb2.HealthCheckResponse.SERVING,
            }
            assert client.infer("mlp", [mlp_input()]).as_numpy("output").shape == (1, 10)

            with pytest.raises(tc.InferenceServerException) as info:
                client.load_model("pickled")
            assert _status(info.value) == "UNAVAILABLE"
            assert "refusing a pickle file" in info.value.message()
            with pytest.raises(tc.InferenceServerException) as info:
                client.infer("ckpt", [mlp_input()])
            assert _status(info.value) == "UNAVAILABLE"

            # Fix the config on disk and load: it serves.
            (repo / "badconfig" / "config.yaml").write_text(MLP_CONFIG)
            client.load_model("badconfig")
            assert client.is_model_ready("badconfig")
            assert client.infer("badconfig", [mlp_input()]).as_numpy("output").shape == (1, 10)

            # Unload the two that cannot load: every wanted model is ready, health SERVING.
            client.unload_model("pickled")
            client.unload_model("ckpt")
            server.wait_health(health_pb2.HealthCheckResponse.SERVING, 30)
            assert client.is_server_ready()

            # Unload mlp: not ready, inference UNAVAILABLE; load again: it serves.
            client.unload_model("mlp")
            assert not client.is_model_ready("mlp")
            with pytest.raises(tc.InferenceServerException) as info:
                client.infer("mlp", [mlp_input()])
            assert _status(info.value) == "UNAVAILABLE"
            states = {m.name: m.state for m in client.get_model_repository_index().models}
            assert states["mlp"] == "UNAVAILABLE"
            client.load_model("mlp")
            assert client.infer("mlp", [mlp_input()]).as_numpy("output").shape == (1, 10)

            # A path-like name never reaches the file system.
            with pytest.raises(tc.InferenceServerException) as info:
                client.load_model("../mlp")
            assert _status(info.value) == "INVALID_ARGUMENT"
            with pytest.raises(tc.InferenceServerException) as info:
                client.load_model("absent")
            assert _status(info.value) == "NOT_FOUND"
    finally:
        server.stop()


def test_failed_reload_keeps_serving_and_loads_happen_while_serving(repo):
    for name in ("pickled", "ckpt", "badconfig"):
        shutil.rmtree(repo / name)
    with ServerProcess(repo) as server, tc.InferenceServerClient(server.grpc_target) as client:
        before = client.infer("mlp", [mlp_input(0.5)]).as_numpy("output")

        failures: list[BaseException] = []
        served = 0
        stop = threading.Event()

        def hammer() -> None:
            nonlocal served
            with tc.InferenceServerClient(server.grpc_target) as c:
                while not stop.is_set():
                    try:
                        c.infer("digits", [_digits_input()])
                        served += 1
                    except Exception as exc:  # collected and asserted below
                        failures.append(exc)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            # Break mlp's file, reload: refused, and the loaded version keeps serving.
            (repo / "mlp" / "1" / "model.pt").write_bytes(b"\x80\x04K\x01.")
            with pytest.raises(tc.InferenceServerException) as info:
                client.load_model("mlp")
            assert "refusing to load" in info.value.message()
            assert client.is_model_ready("mlp")
            np.testing.assert_array_equal(
                client.infer("mlp", [mlp_input(0.5)]).as_numpy("output"), before
            )
            # Unload and load digits' neighbour while digits serves under load.
            client.unload_model("mlp")
            shutil.copy(repo / "digits" / "1" / "model.pt2", repo / "digits" / "1" / "copy.bin")
            client.load_model("digits")
        finally:
            stop.set()
            worker.join(30)
        assert not failures, failures[:3]
        assert served > 0
        assert client.is_model_ready("digits")


def _digits_input() -> tc.InferInput:
    x = tc.InferInput("image", [1, 8, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 8, 8), np.float32))
    return x
