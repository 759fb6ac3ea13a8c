"""Request templates through a real server and tritonclient: repeated requests are decoded
from their bytes and answered as parsed ones are, whatever their ids and tensors; each
connection and each stream learns its own; a replaced model's template is not used; bytes
that only look like a template's get the parse's error."""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

from salvo.domain.config import ModelConfig
from salvo.engine.backend import LoadedModel
from salvo.frontends.grpc.wire.templates import Matched
from salvo_client.proto import grpc_service_pb2 as pb
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
dynamic_batching: {max_queue_delay_us: 100}
"""
INFER = "/inference.GRPCInferenceService/ModelInfer"


class Scale(torch.nn.Module):
    """y = x times the version's number: an answer says which version gave it."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def load(config: ModelConfig, version_dir: Path) -> LoadedModel:
    module = Scale(int(version_dir.name))
    return LoadedModel(config, version_dir / "model.pt", module, torch.device("cpu"))


@pytest.fixture()
def repo(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.yaml").write_text(CONFIG)
    return tmp_path


@pytest.fixture()
def matches(monkeypatch):
    """Whether each request read from a template's bytes was prepared from them (False: its
    template's version was replaced, so it was parsed)."""
    counted = []
    prepared = Matched.prepared

    def counting(self, plan):
        request = prepared(self, plan)
        counted.append(request is not None)
        return request

    monkeypatch.setattr(Matched, "prepared", counting)
    return counted


def x_input(x: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1 + seed % 2, 4)).astype(np.float32)


def test_repeated_requests_are_answered_from_their_bytes_like_parsed_ones(repo, matches):
    with InProcessServer(repo, load) as server, tc.InferenceServerClient(server.grpc_target) as c:
        for seed in range(12):  # one row and two rows: two templates, one learnt each
            x = rows(seed)
            result = c.infer("m", [x_input(x)], request_id=f"u{seed}" if seed % 3 else "")
            np.testing.assert_array_equal(result.as_numpy("y"), x)
            assert result.get_response().id == (f"u{seed}" if seed % 3 else "")
        assert matches == [True] * 10  # every request after each shape's first

        answers: queue.Queue = queue.Queue()
        c.start_stream(lambda result, error: answers.put((result, error)))
        try:
            for seed in range(12, 24):
                c.async_stream_infer("m", [x_input(rows(seed))], request_id=f"s{seed}")
            for _ in range(12):
                result, error = answers.get(timeout=30)
                assert error is None
                seed = int(result.get_response().id.removeprefix("s"))
                np.testing.assert_array_equal(result.as_numpy("y"), rows(seed))
        finally:
            c.stop_stream()
    # A stream learns its own: again the first request of each shape is parsed.
    assert matches == [True] * 20


def test_a_replaced_model_is_not_answered_through_an_old_template(repo, matches):
    x = rows(0)
    with InProcessServer(repo, load) as server, tc.InferenceServerClient(server.grpc_target) as c:
        for _ in range(2):
            np.testing.assert_array_equal(c.infer("m", [x_input(x)]).as_numpy("y"), x)
        assert matches == [True]
        (repo / "m" / "2").mkdir()
        c.load_model("m")  # version 2 replaces version 1 (the latest one serves)
        for _ in range(2):
            np.testing.assert_array_equal(c.infer("m", [x_input(x)]).as_numpy("y"), 2 * x)
    # The old template was refused once (parsed instead), then version 2's was learnt.
    assert matches == [True, False, True]


def test_bytes_that_only_look_like_a_template_get_the_parses_answer(repo, matches):
    x = rows(0)
    request = pb.ModelInferRequest(model_name="m", id="ab")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(x.tobytes())
    data = request.SerializeToString()
    with InProcessServer(repo, load) as server, grpc.insecure_channel(server.grpc_target) as ch:
        infer = ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        for _ in range(2):
            answer = pb.ModelInferResponse.FromString(infer(data, timeout=30))
            assert answer.id == "ab" and answer.raw_output_contents[0] == x.tobytes()
        assert matches == [True]
        # An id that is not UTF-8, in bytes otherwise the template's.
        with pytest.raises(grpc.RpcError) as refused:
            infer(data.replace(b"ab", b"\xff\xfe", 1), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request message" in refused.value.details()
        # Four bytes short: not the template's length, so parsed, and refused by the
        # general path naming the input.
        short = request.__deepcopy__()
        short.raw_input_contents[0] = x.tobytes()[:-4]
        with pytest.raises(grpc.RpcError) as refused:
            infer(short.SerializeToString(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'x'" in refused.value.details()
        # And the server still answers the template's requests from their bytes.
        answer = pb.ModelInferResponse.FromString(infer(data, timeout=30))
        assert answer.raw_output_contents[0] == x.tobytes()
    assert matches == [True, True]


def test_each_connection_learns_its_own_templates(repo, matches):
    """What one connection sent never decides how another's bytes are read."""
    x = rows(0)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(x.tobytes())
    data = request.SerializeToString()
    # A subchannel pool of its own: otherwise two channels to one target share a connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with InProcessServer(repo, load) as server:
        for _ in range(2):
            with grpc.insecure_channel(server.grpc_target, options=options) as channel:
                infer = channel.unary_unary(INFER)
                for _ in range(3):
                    answer = pb.ModelInferResponse.FromString(infer(data, timeout=30))
                    assert answer.raw_output_contents[0] == x.tobytes()
    # On each connection, the first request parsed and learnt, the next two matched.
    assert matches == [True] * 4
