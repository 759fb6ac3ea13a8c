"""gRPC and REST share one event loop: a flood on either port does not starve the other.

h2load keeps a closed loop of calls in flight on one port until the test ends it; a client
on the other port makes its calls one after another meanwhile. Every probe must be
answered (each within a generous deadline), and the flood must keep being served while
they run: the model's statistics count more calls than the probes made.
"""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from salvo_client.proto import grpc_service_pb2 as pb
from tests import h2load
from tests.servers import InProcessServer
from tests.tools import require

PROBES = 50
FLOOD = 32
DEADLINE_S = 10.0
ROW = np.full((1, 64), 0.5, np.float32)


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    import shutil

    root = tmp_path_factory.mktemp("shared-loop")
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    with InProcessServer(root) as running:
        yield running


def served(server) -> int:
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        stats = client.get_inference_statistics("mlp", as_json=True)["model_stats"]
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def flood(tool: str, body: Path, headers: list[str], url: str, h1: bool) -> subprocess.Popen:
    """h2load holding FLOOD calls in flight for up to a minute (the test stops it)."""
    cmd = [tool, *(["--h1"] if h1 else []), "-c", "1" if not h1 else str(FLOOD),
           "-m", str(FLOOD) if not h1 else "1", "-D", "60", "-d", str(body),
           *[arg for header in headers for arg in ("-H", header)], url]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rest_body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                     "data": ROW.ravel().tolist()}]}
    ).encode()  # fmt: skip


def probe_while(load: subprocess.Popen, server, probe) -> int:
    """Run PROBES probes while `load` floods the server; the calls served meanwhile."""
    before = served(server)
    try:
        for _ in range(PROBES):
            probe()
        assert load.poll() is None, f"the flood ended early:\n{load.communicate()[0]}"
        return served(server) - before
    finally:
        load.terminate()
        load.communicate(timeout=30)


def test_a_rest_flood_does_not_starve_grpc(server, tmp_path) -> None:
    tool = require("h2load")
    body = tmp_path / "body.json"
    body.write_bytes(rest_body())
    url = f"http://127.0.0.1:{server.server.http_port}/v2/models/mlp/infer"
    load = flood(tool, body, ["content-type: application/json"], url, h1=True)
    client = tgrpc.InferenceServerClient(server.grpc_target)
    request = tgrpc.InferInput("input", [1, 64], "FP32")
    request.set_data_from_numpy(ROW)

    def probe() -> None:
        answer = client.infer("mlp", [request], client_timeout=DEADLINE_S)
        assert answer.as_numpy("output").shape == (1, 10)

    try:
        during = probe_while(load, server, probe)
    finally:
        client.close()
    assert during > 2 * PROBES, during  # REST kept being served alongside


def test_a_grpc_flood_does_not_starve_rest(server, tmp_path) -> None:
    tool = require("h2load")
    message = pb.ModelInferRequest(model_name="mlp")
    message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(ROW.tobytes())
    body = tmp_path / "body.grpc"
    body.write_bytes(h2load.grpc_body(message.SerializeToString()))
    url = f"http://{server.grpc_target}{h2load.INFER_PATH}"
    headers = ["content-type: application/grpc", "te: trailers"]
    load = flood(tool, body, headers, url, h1=False)
    port = server.server.http_port

    def probe() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        try:
            connection.request("POST", "/v2/models/mlp/infer", rest_body())
            reply = connection.getresponse()
            answer = json.loads(reply.read())
        finally:
            connection.close()
        assert reply.status == 200 and answer["outputs"][0]["shape"] == [1, 10], answer

    during = probe_while(load, server, probe)
    assert during > 2 * PROBES, during  # gRPC kept being served alongside
