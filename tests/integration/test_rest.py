"""The v2 REST API on a real Salvo, tritonclient.http (sync and aio, JSON and binary
tensors, gzip and deflate) as the client and tritonclient.grpc's answers as the reference;
bad requests refused naming the field while the server keeps serving; tokens, rate limits,
repository rights and CORS as on the gRPC port; a caller that disconnects withdraws its
queued request."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from tritonclient.utils import InferenceServerException

from tests.gated import GatedLoader, serving
from tests.servers import InProcessServer

MODELS = ("digits", "mlp", "resnet")


def http_target(port: int) -> str:
    return f"127.0.0.1:{port}"


def ints(value: Any, key: str = "") -> Any:
    """tritonclient.grpc's JSON writes int64 (shapes, dims) as strings; HTTP's are numbers."""
    if isinstance(value, dict):
        return {k: ints(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [ints(v, key) for v in value]
    return int(value) if key in ("shape", "dims") else value


def random_inputs(metadata: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i["name"]: rng.standard_normal([2 if d == -1 else d for d in i["shape"]]).astype(np.float32)
        for i in metadata["inputs"]
    }


@pytest.fixture(scope="module")
def clients(demo_server):
    h = thttp.InferenceServerClient(http_target(demo_server.http_port))
    g = tgrpc.InferenceServerClient(demo_server.grpc_target)
    yield h, g
    h.close()
    g.close()


def test_server_and_model_documents_are_grpcs(clients) -> None:
    h, g = clients
    assert h.is_server_live() and h.is_server_ready()
    assert h.get_server_metadata() == g.get_server_metadata(as_json=True)
    for model in MODELS:
        assert h.is_model_ready(model) and h.is_model_ready(model, "1")
        assert h.get_model_metadata(model) == ints(g.get_model_metadata(model, as_json=True))
        config = h.get_model_config(model)
        want = ints(g.get_model_config(model, as_json=True)["config"])
        for key in ("name", "platform", "backend", "max_batch_size", "input", "output"):
            assert config[key] == want[key], key
        assert config["max_batch_size"] > 0 and config["input"][0]["data_type"] == "TYPE_FP32"
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == int(
            want["dynamic_batching"].get("max_queue_delay_microseconds", 0)
        )
    assert not h.is_model_ready("nope")
    index = {m["name"]: m for m in h.get_model_repository_index()}
    assert set(MODELS) <= set(index) and index["mlp"]["state"] == "READY"


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True])
def test_every_demo_model_answers_as_over_grpc(clients, binary, compression) -> None:
    h, g = clients
    for seed, model in enumerate(MODELS):
        metadata = h.get_model_metadata(model)
        arrays = random_inputs(metadata, seed)
        inputs_h, inputs_g = [], []
        for name, array in arrays.items():
            inputs_h.append(thttp.InferInput(name, list(array.shape), "FP32"))
            inputs_h[-1].set_data_from_numpy(array, binary_data=binary)
            inputs_g.append(tgrpc.InferInput(name, list(array.shape), "FP32"))
            inputs_g[-1].set_data_from_numpy(array)
        outputs = [thttp.InferRequestedOutput(o["name"], binary_data=binary)
                   for o in metadata["outputs"]]  # fmt: skip
        got = h.infer(
            model, inputs_h, outputs=outputs, request_id=f"r{seed}",
            request_compression_algorithm=compression,
            response_compression_algorithm=compression,
        )  # fmt: skip
        want = g.infer(model, inputs_g)
        assert got.get_response()["id"] == f"r{seed}"
        assert got.get_response()["model_version"] == "1"
        for o in metadata["outputs"]:
            assert got.as_numpy(o["name"]).dtype == want.as_numpy(o["name"]).dtype
            np.testing.assert_allclose(
                got.as_numpy(o["name"]), want.as_numpy(o["name"]), rtol=1e-5, atol=1e-6
            )


def test_the_aio_client_and_all_outputs_in_binary(demo_server, clients) -> None:
    h, g = clients
    x = random_inputs(h.get_model_metadata("digits"), 7)["image"]

    async def main() -> thttp.InferResult:
        async with thttp_aio.InferenceServerClient(http_target(demo_server.http_port)) as c:
            assert await c.is_server_ready()
            tensor = thttp_aio.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return await c.infer("digits", [tensor])  # no outputs named: all, binary

    got = asyncio.run(main())
    tensor = tgrpc.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    want = g.infer("digits", [tensor])
    np.testing.assert_array_equal(got.as_numpy("label"), want.as_numpy("label"))
    np.testing.assert_allclose(got.as_numpy("logits"), want.as_numpy("logits"), rtol=1e-5)


def test_statistics_count_rest_requests(clients) -> None:
    h, _ = clients
    before = h.get_inference_statistics("mlp")["model_stats"][0]["inference_stats"]
    x = np.ones((1, 64), np.float32)
    tensor = thttp.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    h.infer("mlp", [tensor])
    stats = h.get_inference_statistics("mlp")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("mlp", "1")]
    after = stats[0]["inference_stats"]
    assert after["success"]["count"] == before["success"]["count"] + 1
    assert after["success"]["ns"] > before["success"]["ns"]
    every = h.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} >= set(MODELS)


def raw(port: int, method: str, path: str, body: bytes = b"", **headers: str):
    """One plain HTTP call: (status, headers, parsed JSON or bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body, headers)
        reply = connection.getresponse()
        data = reply.read()
    finally:
        connection.close()
    kind = reply.getheader("content-type", "")
    return reply.status, reply, json.loads(data) if kind == "application/json" else data


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [
        ("/v2/models/nope/infer", b"{}", {}, 404, "nope"),
        ("/v2/models/mlp/versions/9/infer", b"{}", {}, 404, "version 9"),
        ("/v2/models/mlp/infer", b"{", {}, 400, "not valid JSON"),
        ("/v2/models/mlp/infer", b'{"inputs": 3}', {}, 400, "'inputs' must be a list"),
        (
            "/v2/models/mlp/infer",
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],'
            b' "data": [1, 2, 3]}]}',
            {},
            400,
            "input 'input': expected shape [-1, 64]",
        ),
        (
            "/v2/models/mlp/infer",
            b'{"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 64],'
            b' "parameters": {"binary_data_size": 64}}]}' + b"\0" * 64,
            {"Inference-Header-Content-Length": "90000"},
            400,
            "Inference-Header-Content-Length",
        ),
        ("/v2/models/mlp/infer", b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        ("/v2/models/mlp/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
        ("/v2/nowhere", b"", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_status_and_a_message_naming_the_field(
    demo_server, clients, path, body, headers, status, words
) -> None:
    method = "POST" if path.endswith("/infer") else "GET"
    got, _, answer = raw(demo_server.http_port, method, path, body, **headers)
    assert got == status, answer
    assert words in answer["error"], answer
    h, _ = clients
    assert h.is_server_ready()
    tensor = thttp.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    assert h.infer("mlp", [tensor]).as_numpy("output").shape == (1, 10)


def test_tritonclient_sees_the_error_message(clients) -> None:
    h, _ = clients
    tensor = thttp.InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        h.infer("mlp", [tensor])
    assert refused.value.status() == "400"
    assert "input 'input'" in refused.value.message()


@pytest.fixture(scope="module")
def mlp_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rest-repo")
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    shutil.copytree(demo_repo / "digits", root / "digits")
    return root


def mlp_body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    ).encode()


def test_bodies_over_the_limit_are_refused_and_others_served(mlp_repo) -> None:
    with InProcessServer(mlp_repo, max_message_bytes=4096) as server:
        port = server.server.http_port
        big = mlp_body() + b" " * 4096  # valid JSON, past the limit
        status, _, answer = raw(port, "POST", "/v2/models/mlp/infer", big)
        assert status == 413 and "limit of 4096 bytes" in answer["error"]
        import gzip

        bomb = gzip.compress(b" " * 100_000)  # small on the wire, large inflated
        status, _, answer = raw(port, "POST", "/v2/models/mlp/infer", bomb,
                                **{"Content-Encoding": "gzip"})  # fmt: skip
        assert status == 413, answer
        status, _, answer = raw(port, "POST", "/v2/models/mlp/infer", mlp_body())
        assert status == 200 and len(answer["outputs"][0]["data"]) == 10


def test_tokens_model_rights_and_rate_limits_as_on_grpc(mlp_repo, tmp_path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({
        "all-token": {"name": "all", "models": "*", "repository": True},
        "mlp-token": {"name": "mlp-only", "models": ["mlp"]},
    }))  # fmt: skip
    with InProcessServer(
        mlp_repo, auth_tokens_file=tokens, rate_limit_per_s=1.0, rate_limit_burst=2
    ) as server:
        port = server.server.http_port
        infer = "/v2/models/mlp/infer"
        status, _, answer = raw(port, "POST", infer, mlp_body())
        assert status == 401 and "authorization" in answer["error"]
        status, _, answer = raw(port, "POST", infer, mlp_body(), Authorization="Bearer wrong")
        assert status == 401 and "invalid bearer token" in answer["error"]
        # Health stays open, as gRPC's does.
        assert raw(port, "GET", "/v2/health/ready")[0] == 200
        mlp_only = {"Authorization": "Bearer mlp-token"}
        status, _, answer = raw(port, "GET", "/v2/models/digits", **mlp_only)
        assert status == 403 and "may not use model 'digits'" in answer["error"]
        status, _, answer = raw(port, "POST", "/v2/repository/index", **mlp_only)
        assert status == 403 and "repository rights" in answer["error"]
        # Past the burst of 2 (refused calls spend nothing), a call is shed with a wait.
        served = 0
        while (call := raw(port, "POST", infer, mlp_body(), **mlp_only))[0] == 200:
            served += 1
            assert served <= 10, "never shed"
        status, reply, answer = call
        assert status == 429 and served >= 2, answer
        assert "rate limit" in answer["error"] and int(reply.getheader("Retry-After")) >= 1
        # Another client has its own bucket.
        everything = {"Authorization": "Bearer all-token"}
        status, _, answer = raw(port, "POST", infer, mlp_body(), **everything)
        assert status == 200, answer
        status, _, answer = raw(port, "POST", "/v2/repository/index", **everything)
        assert status == 200 and {m["name"] for m in answer} == {"mlp", "digits"}


def test_repository_changes_follow_the_same_rule(mlp_repo) -> None:
    with InProcessServer(mlp_repo, repository_rpcs="disabled") as server:
        port = server.server.http_port
        status, _, answer = raw(port, "POST", "/v2/repository/models/mlp/unload")
        assert status == 403 and "disabled on this server" in answer["error"]
    with InProcessServer(mlp_repo, repository_rpcs="enabled") as server:
        h = thttp.InferenceServerClient(http_target(server.server.http_port))
        h.unload_model("digits")
        assert not h.is_model_ready("digits")
        h.load_model("digits")
        assert h.is_model_ready("digits")
        h.close()


def test_cors_is_off_unless_origins_are_configured(mlp_repo) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with InProcessServer(mlp_repo) as server:
        _, reply, _ = raw(server.server.http_port, "OPTIONS", "/v2/models/mlp/infer",
                          **preflight)  # fmt: skip
        assert reply.getheader("access-control-allow-origin") is None
    with InProcessServer(mlp_repo, http_cors_origins=("https://app.example",)) as server:
        port = server.server.http_port
        status, reply, _ = raw(port, "OPTIONS", "/v2/models/mlp/infer", **preflight)
        assert status == 200
        assert reply.getheader("access-control-allow-origin") == "https://app.example"
        _, reply, _ = raw(port, "POST", "/v2/models/mlp/infer", mlp_body(),
                          Origin="https://app.example")  # fmt: skip
        assert reply.getheader("access-control-allow-origin") == "https://app.example"
        _, reply, _ = raw(port, "OPTIONS", "/v2/models/mlp/infer",
                          **{**preflight, "Origin": "https://evil.example"})  # fmt: skip
        assert reply.getheader("access-control-allow-origin") is None


GATED = """max_batch_size: 4
inputs: [{name: x, datatype: FP32, dims: [1]}]
outputs: [{name: y, datatype: FP32, dims: [1]}]
dynamic_batching: {max_queue_delay_us: 0}
"""


def gated_body(row: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [row]}]}
    ).encode()


@contextlib.contextmanager
def first_call_held(tmp_path: Path) -> Iterator[tuple[Any, Any, int, list[Any], threading.Thread]]:
    """The gated model `g` served, its first call (row 1) running and held, so that the
    next call waits in the queue: (server, module, HTTP port, answers, the first's thread)."""
    loader = GatedLoader()
    with serving(tmp_path, loader, {"g": GATED}) as server:
        module = loader.modules["g"]
        module.hold()
        port = server.server.http_port
        answers: list[Any] = []
        first = threading.Thread(
            target=lambda: answers.append(raw(port, "POST", "/v2/models/g/infer", gated_body(1)))
        )
        first.start()
        module.wait_batches(1)
        yield server, module, port, answers, first


def test_a_caller_that_disconnects_withdraws_its_queued_request(tmp_path) -> None:
    with first_call_held(tmp_path) as (server, module, port, answers, first):
        body = gated_body(2)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v2/models/g/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        server.wait_queued("g", 1)
        sock.close()  # the caller goes away
        server.wait_queued("g", 0)  # withdrawn, not run
        module.open()
        first.join(30)
        assert answers and answers[0][0] == 200 and answers[0][2]["outputs"][0]["data"] == [2.0]
        status, _, answer = raw(port, "POST", "/v2/models/g/infer", gated_body(3))
        assert status == 200 and answer["outputs"][0]["data"] == [6.0]
        assert module.ran == {1.0, 3.0}


def test_the_timeout_header_bounds_a_call_and_its_queued_request_never_runs(tmp_path) -> None:
    with first_call_held(tmp_path) as (server, module, port, answers, first):
        status, _, answer = raw(
            port, "POST", "/v2/models/g/infer", gated_body(2), **{"Salvo-Timeout-Ms": "50"}
        )
        assert status == 504 and "Salvo-Timeout-Ms" in answer["error"], answer
        server.wait_queued("g", 0)  # withdrawn, not run
        for bad in ("soon", "0", "-5", "nan", "inf"):
            status, _, answer = raw(
                port, "POST", "/v2/models/g/infer", gated_body(3), **{"Salvo-Timeout-Ms": bad}
            )
            assert status == 400 and "header Salvo-Timeout-Ms" in answer["error"], (bad, answer)
        module.open()
        first.join(30)
        assert answers and answers[0][0] == 200
        status, _, answer = raw(
            port, "POST", "/v2/models/g/infer", gated_body(4), **{"Salvo-Timeout-Ms": "30000"}
        )
        assert status == 200 and answer["outputs"][0]["data"] == [8.0]
        assert module.ran == {1.0, 4.0}


def test_answers_leave_without_waiting_for_the_clients_ack(mlp_repo) -> None:
    """TCP_NODELAY on every connection: an answer is written in two parts (head, body), and
    with Nagle's algorithm the second waits for the client's delayed ACK, 40 ms a call."""
    with InProcessServer(mlp_repo) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port)
        connection.request("POST", "/v2/models/mlp/infer", mlp_body())
        assert connection.getresponse().read()

        async def nodelay() -> list[int]:
            state = server.server.http._server.server_state
            return [
                c.transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY
                )
                for c in state.connections
            ]

        flags = server.call(nodelay())
        connection.close()
    assert flags and all(flags), flags


def test_the_openapi_document_lists_the_v2_routes(demo_server) -> None:
    status, _, document = raw(demo_server.http_port, "GET", "/v2/docs/openapi.json")
    assert status == 200
    paths = document["paths"]
    for path in (
        "/v2", "/v2/models/{model}", "/v2/models/{model}/versions/{version}/infer",
        "/v2/models/{model}/config", "/v2/models/stats", "/v2/repository/index",
        "/v2/repository/models/{model}/load",
    ):  # fmt: skip
        assert path in paths, path
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"
    }
    answers = infer["responses"]
    assert answers["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceResponse"
    }
    assert {"400", "404", "413", "429", "503", "504"} <= set(answers)
    assert "Retry-After" in answers["429"]["headers"]
    examples = infer["requestBody"]["content"]["application/json"]["examples"]
    assert set(MODELS) <= set(examples)
    for model in MODELS:  # each model's example is a request that model answers
        body = json.dumps(examples[model]["value"]).encode()
        status, _, answer = raw(demo_server.http_port, "POST", f"/v2/models/{model}/infer", body)
        assert status == 200 and answer["model_name"] == model, answer
    status, _, page = raw(demo_server.http_port, "GET", "/v2/docs")
    assert status == 200 and b"/v2/docs/openapi.json" in page


def test_the_examples_list_only_the_models_a_token_may_use(mlp_repo, tmp_path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alpha": {"name": "a", "models": ["mlp"]}}))
    with InProcessServer(mlp_repo, auth_tokens_file=tokens) as server:
        port = server.server.http_port

        def examples(**headers: str) -> set[str]:
            status, _, document = raw(port, "GET", "/v2/docs/openapi.json", **headers)
            assert status == 200
            content = document["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
            return set(content["content"]["application/json"].get("examples", {}))

        assert examples(authorization="Bearer alpha") == {"mlp"}
        assert examples() == set() and examples(authorization="Bearer wrong") == set()


# Every datatype a PyTorch model can take (BYTES cannot feed one), echoed back.
ECHO_TYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
              "INT64", "FP16", "FP32", "FP64", "BF16")  # fmt: skip
ECHO = "max_batch_size: 4\ninputs: [{}]\noutputs: [{}]\n".format(
    ", ".join(f"{{name: in_{t}, datatype: {t}, dims: [3]}}" for t in ECHO_TYPES),
    ", ".join(f"{{name: out_{t}, datatype: {t}, dims: [3]}}" for t in ECHO_TYPES),
)


class EchoLoader:
    """Every model answers its inputs as they came, one output per input."""

    def __call__(self, config, version_dir: Path):
        import torch

        from salvo.engine.backend import LoadedModel

        def echo(*tensors):
            return tuple(t.clone() for t in tensors)

        return LoadedModel(config, version_dir / "model.pt", echo, torch.device("cpu"))


def echo_values(datatype: str) -> np.ndarray:
    """Two rows of three values of `datatype`, reaching to its range's ends (BF16 as
    ml_dtypes.bfloat16, as tritonclient takes it)."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, True, True]])
    dtype = (
        ml_dtypes.bfloat16
        if datatype == "BF16"
        else np.dtype(datatype.lower().replace("fp", "float"))
    )
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        finfo = ml_dtypes.finfo(dtype)
        return np.array([[finfo.min, -1.5, 0.0], [finfo.tiny, 2.25, finfo.max]], dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [info.max, 1, info.min]], dtype)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips_as_over_grpc(tmp_path, binary) -> None:
    with serving(tmp_path, EchoLoader(), {"echo": ECHO}) as server:  # type: ignore[arg-type]
        values = {t: echo_values(t) for t in ECHO_TYPES}
        h = thttp.InferenceServerClient(http_target(server.server.http_port))
        g = tgrpc.InferenceServerClient(server.grpc_target)
        try:
            http_inputs, grpc_inputs = [], []
            for t, x in values.items():
                http_input = thttp.InferInput(f"in_{t}", list(x.shape), t)
                http_input.set_data_from_numpy(x, binary_data=binary or t == "BF16")
                http_inputs.append(http_input)
                grpc_input = tgrpc.InferInput(f"in_{t}", list(x.shape), t)
                grpc_input.set_data_from_numpy(x)
                grpc_inputs.append(grpc_input)
            outputs = [thttp.InferRequestedOutput(f"out_{t}", binary_data=binary or t == "BF16")
                       for t in ECHO_TYPES]  # fmt: skip
            over_http = h.infer("echo", http_inputs, outputs=outputs)
            over_grpc = g.infer("echo", grpc_inputs)
        finally:
            h.close()
            g.close()
        for t, x in values.items():
            got, reference = over_http.as_numpy(f"out_{t}"), over_grpc.as_numpy(f"out_{t}")
            assert got is not None and got.shape == x.shape, t
            np.testing.assert_array_equal(got, x, err_msg=t)
            np.testing.assert_array_equal(got, reference, err_msg=t)
