"""deploy/nginx sheds calls past its in-flight limit: RESOURCE_EXHAUSTED with push-back, at
once, and the replica never sees them.

One replica (the demo's mlp and the `gated` stand-in of tests/e2e/hooks, held through a FIFO)
behind nginx rendered with `--max-in-flight 1`: a call held in the gated model's forward pass
fills the limit, so every other call is nginx's to refuse. tritonclient is the client; a raw
grpc stub reads the push-back trailer; h2load, the overload bench's generator, sends a burst
whose every call nginx's access log must account for. What the limit does to a 5x burst:
benchmarks/overload.py --generator h2load.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import h2load
from tests.e2e.gate import Gate, write_model
from tests.nginx import NGINX, Nginx
from tests.servers import ServerProcess
from tests.tools import require

pytestmark = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="nginx not installed: tools/check_deploy.sh install (or apt-get install nginx)",
)

SHED = "StatusCode.RESOURCE_EXHAUSTED"


@pytest.fixture
def held(demo_repo: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Gate, Nginx]]:
    root = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    write_model(root, "gated")
    gate = Gate(tmp_path / "gate")
    server = ServerProcess(root, "--torch-threads", "1", env=gate.env()).start()
    try:
        (tmp_path / "nginx").mkdir()
        proxy = Nginx(tmp_path / "nginx", [server.grpc_target], max_in_flight=1).start()
        try:
            yield server, gate, proxy
        finally:
            proxy.stop()
    finally:
        server.stop(signal.SIGKILL)


def _mlp(value: float) -> list[tc.InferInput]:
    x = tc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.full((1, 64), value, dtype=np.float32))
    return [x]


def _gated(target: str, value: float) -> np.ndarray:
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    with tc.InferenceServerClient(target) as client:
        return client.infer("gated", [x], client_timeout=60).as_numpy("y")


def _mlp_message(value: float) -> bytes:
    """A serialized ModelInferRequest for mlp, as a raw gRPC client sends it."""
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.full((1, 64), value, dtype=np.float32).tobytes())
    return request.SerializeToString()


def _served(server: ServerProcess, model: str) -> int:
    """Requests the replica itself has answered for `model` (its statistics)."""
    with tc.InferenceServerClient(server.grpc_target) as client:
        stats = client.get_inference_statistics(model, as_json=True, client_timeout=10)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


def test_a_call_past_the_limit_is_shed_with_push_back_and_never_reaches_the_replica(
    held,
) -> None:
    server, gate, proxy = held
    with tc.InferenceServerClient(proxy.target) as client:
        # Under the limit, calls pass through.
        assert client.infer("mlp", _mlp(1.0), client_timeout=10).as_numpy("output").shape == (1, 10)
        proxy.wait_logged(1)  # and nginx has let go of it
        served_before = _served(server, "mlp")

        with ThreadPoolExecutor(1) as pool:
            # One call held in the gated model's forward pass: the one slot is taken.
            logged = len(proxy.access)
            first = pool.submit(_gated, proxy.target, 3.0)
            server.wait_for_line(r"gated forward")

            for value in range(5):
                with pytest.raises(InferenceServerException) as shed:
                    client.infer("mlp", _mlp(value), client_timeout=10)
                assert shed.value.status() == SHED
                assert "too many calls in flight" in str(shed.value.message())

            # The push-back a retry policy honours, in the same form Salvo's full queue sends.
            with grpc.insecure_channel(proxy.target) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as raw:
                    stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(raw.value.trailing_metadata() or ())
            assert trailers.get("grpc-retry-pushback-ms") == "100", trailers

            # None of them reached the replica, and the held call was untouched by them.
            assert _served(server, "mlp") == served_before
            assert not first.done()
            gate.release()
            np.testing.assert_array_equal(first.result(30), np.full((1, 4), 6.0))
            # nginx frees the slot as it logs the call, a moment after the answer left.
            proxy.wait_logged(logged + 7)  # the held call, the 5 shed ModelInfers, ServerLive

        # The slot is free again: calls pass.
        for value in range(5):
            result = client.infer("mlp", _mlp(value), client_timeout=10)
            assert result.as_numpy("output").shape == (1, 10)
        assert _served(server, "mlp") == served_before + 5

    # nginx's access log tells shed calls (status 8, from no upstream) from served ones.
    proxy.stop()
    log = "".join(proxy.access)
    shed_lines = [x for x in proxy.access if "grpc_status=8 " in x]
    assert len(shed_lines) == 6, log
    assert all(re.search(r"upstream=- ", x) for x in shed_lines), shed_lines
    assert len(re.findall(r"ModelInfer HTTP/2.0\" 200 grpc_status=0 upstream=127", log)) == 7, log


def test_h2load_burst_is_shed_and_nginx_log_accounts_for_every_call(held, tmp_path) -> None:
    """The overload bench's instruments, checked against a known answer: h2load's calls, and
    nginx's access log as tests/h2load.py reads it."""
    require("h2load")
    server, gate, proxy = held
    body = tmp_path / "body"
    body.write_bytes(h2load.grpc_body(_mlp_message(4.0)))
    served_before = _served(server, "mlp")

    def burst(calls: int, concurrency: int) -> h2load.Logged:
        start = len(proxy.access)
        run = h2load.drive(
            proxy.target,
            body,
            0,
            tmp_path / "h2load.log",
            concurrency=concurrency,
            connections=min(concurrency, 4),
            requests=calls,
        )
        assert len(run.latency_ns) == calls  # h2load finished every call
        # nginx logs a call as it ends, after its answer left: wait for all of them.
        proxy.wait_logged(start + calls)
        return h2load.logged(proxy.access[start:])

    with ThreadPoolExecutor(1) as pool:
        logged = len(proxy.access)
        first = pool.submit(_gated, proxy.target, 3.0)
        server.wait_for_line(r"gated forward")
        # The slot is held: 16 at a time from h2load, every one shed.
        shed = burst(200, 16)
        assert shed.statuses == {"RESOURCE_EXHAUSTED": 200}, shed.statuses
        assert len(shed.ok_ns) == 0
        assert _served(server, "mlp") == served_before
        gate.release()
        np.testing.assert_array_equal(first.result(30), np.full((1, 4), 6.0))
        proxy.wait_logged(logged + 201)  # the held call and the burst: the slot is free

    # One at a time, every call is served, and nginx's log says so.
    served = burst(50, 1)
    assert served.statuses == {"OK": 50}, served.statuses
    assert len(served.ok_ns) == 50 and len(served.ok_at_s) == 50
    assert _served(server, "mlp") == served_before + 50
