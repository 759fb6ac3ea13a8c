"""TLS, mutual TLS and bearer tokens against a real `salvo serve`, with Salvo's client and
tritonclient as referees: right credentials work, anything else fails with its status."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from salvo.domain.status import ConfigError
from salvo.ops.settings import Settings
from salvo.server import SalvoServer
from salvo_client import (
    InferenceClient,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from tests.certs import Pki, make_pki
from tests.servers import InProcessServer, ServerProcess
from tests.tools import require

ADMIN = "admin-0c9f1e7d52a84b6b"
MLP_ONLY = "mlp-only-3b1d8a0e6f2c47d5"
ENV_TOKEN = "env-7e4a2c9b1f0d4e8a"
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mlp and resnet only: digits (torch.export) takes seconds to load and adds nothing."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("mlp", "resnet"):
        shutil.copytree(demo_repo / name, root / name)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    """mTLS and tokens, configured as a user would: flags and SALVO_AUTH_TOKEN."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                ADMIN: {"name": "admin", "models": "*", "repository": True},
                MLP_ONLY: {"name": "mlp-team", "models": ["mlp"]},
            }
        )
    )
    process = ServerProcess(
        repo,
        "--torch-threads", "1",
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-client-ca-file", str(pki.ca),
        "--auth-tokens-file", str(tokens),
        env={"SALVO_AUTH_TOKEN": ENV_TOKEN},
    )  # fmt: skip
    # Health over plaintext cannot reach a TLS port: wait for the log line instead.
    process.start(wait_ready=False)
    try:
        process.wait_for_line(r"ready: mlp=READY, resnet=READY")
        yield process
    finally:
        process.stop()


def client(server: ServerProcess, pki: Pki, token: str | None = None, **tls) -> InferenceClient:
    """Salvo's client with the right client certificate unless `tls` says otherwise."""
    options = {
        "root_certificates": pki.ca,
        "client_certificate": pki.client_cert,
        "client_key": pki.client_key,
        **tls,
    }
    options = {k: v for k, v in options.items() if v is not None}
    return InferenceClient(server.grpc_target, token=token, retries=0, timeout_s=20, **options)


def triton(server: ServerProcess, pki: Pki, **overrides) -> tc.InferenceServerClient:
    tls = {
        "ssl": True,
        "root_certificates": str(pki.ca),
        "private_key": str(pki.client_key),
        "certificate_chain": str(pki.client_cert),
        **overrides,
    }
    return tc.InferenceServerClient(server.grpc_target, **tls)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def triton_input() -> tc.InferInput:
    x = tc.InferInput("input", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    return x


def test_right_credentials_work_with_both_clients(server, pki):
    with client(server, pki, MLP_ONLY) as salvo:
        ours = salvo.infer("mlp", {"input": X})["output"]
    theirs = triton(server, pki).infer("mlp", [triton_input()], headers=bearer(ADMIN))
    np.testing.assert_allclose(theirs.as_numpy("output"), ours, rtol=1e-6)
    # The token from SALVO_AUTH_TOKEN has every right.
    with client(server, pki, ENV_TOKEN) as salvo:
        assert salvo.model_metadata("resnet").name == "resnet"
        assert {m.name for m in salvo.repository_index()} == {"mlp", "resnet"}


def test_plaintext_client_is_refused(server, pki):
    with (
        InferenceClient(server.grpc_target, token=ADMIN, retries=0, timeout_s=10) as plain,
        pytest.raises(Unavailable),
    ):
        plain.server_live()
    with pytest.raises(InferenceServerException) as refused:
        tc.InferenceServerClient(server.grpc_target).is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_a_server_certificate_from_another_ca_is_refused(server, pki):
    with (
        client(server, pki, ADMIN, root_certificates=pki.wrong_ca) as salvo,
        pytest.raises(Unavailable),
    ):
        salvo.server_live()
    with pytest.raises(InferenceServerException) as refused:
        triton(server, pki, root_certificates=str(pki.wrong_ca)).is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize("certificate", ["none", "from another CA"])
def test_mutual_tls_needs_a_client_certificate_from_the_ca(server, pki, certificate):
    wrong = (
        {"client_certificate": None, "client_key": None}
        if certificate == "none"
        else {"client_certificate": pki.wrong_client_cert, "client_key": pki.wrong_client_key}
    )
    with client(server, pki, ADMIN, **wrong) as salvo, pytest.raises(Unavailable):
        salvo.server_live()
    triton_wrong = {
        "private_key": None if certificate == "none" else str(pki.wrong_client_key),
        "certificate_chain": None if certificate == "none" else str(pki.wrong_client_cert),
    }
    with pytest.raises(InferenceServerException) as refused:
        triton(server, pki, **triton_wrong).is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing 'authorization: Bearer <token>'"), ("not-a-token", "invalid bearer token")],
)
def test_missing_or_wrong_token_is_unauthenticated(server, pki, token, message):
    with client(server, pki, token) as salvo:
        with pytest.raises(Unauthenticated, match=message):
            salvo.infer("mlp", {"input": X})
        with pytest.raises(Unauthenticated, match=message):
            salvo.server_metadata()
        # A stream is refused when it opens.
        with salvo.stream() as stream, pytest.raises(Unauthenticated, match=message):
            stream.send("mlp", {"input": X})
            list(stream)
    headers = None if token is None else bearer(token)
    with pytest.raises(InferenceServerException) as refused:
        triton(server, pki).infer("mlp", [triton_input()], headers=headers)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"


def test_a_token_without_rights_to_a_model_is_denied_naming_it(server, pki):
    denied = "token 'mlp-team' may not use model 'resnet'"
    with client(server, pki, MLP_ONLY) as salvo:
        image = np.zeros((1, 3, 64, 64), np.float32)
        with pytest.raises(PermissionDenied, match=denied):
            salvo.infer("resnet", {"input": image})
        for call in (salvo.model_metadata, salvo.model_config, salvo.model_ready):
            with pytest.raises(PermissionDenied, match=denied):
                call("resnet")
        with pytest.raises(PermissionDenied, match=denied):
            salvo.statistics("resnet")
        with pytest.raises(PermissionDenied, match="for every model"):
            salvo.statistics()
        assert [s.name for s in salvo.statistics("mlp")] == ["mlp"]
        assert salvo.model_ready("mlp") is True
        # On a stream the refusal is in-band: the other requests are served.
        with salvo.stream() as stream:
            ids = [
                stream.send("mlp", {"input": X}),
                stream.send("resnet", {"input": image}),
                stream.send("mlp", {"input": X}),
            ]
            stream.close()
            results = {r.request_id: r for r in stream}
    assert set(results) == set(ids)
    assert results[ids[0]].ok and results[ids[2]].ok
    assert isinstance(results[ids[1]].error, PermissionDenied)
    assert denied in results[ids[1]].error.message
    with pytest.raises(InferenceServerException) as refused:
        triton(server, pki).get_model_metadata("resnet", headers=bearer(MLP_ONLY))
    assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "resnet" in refused.value.message()


def test_repository_rpcs_need_the_repository_right(server, pki):
    with client(server, pki, MLP_ONLY) as salvo:
        for rpc, call in (
            ("RepositoryIndex", lambda: salvo.repository_index()),
            ("RepositoryModelLoad", lambda: salvo.load_model("mlp")),
            ("RepositoryModelUnload", lambda: salvo.unload_model("mlp")),
        ):
            with pytest.raises(PermissionDenied, match=f"may not call {rpc}"):
                call()
        assert salvo.model_ready("mlp") is True
    admin = triton(server, pki)
    admin.unload_model("resnet", headers=bearer(ADMIN))
    assert not admin.is_model_ready("resnet", headers=bearer(ADMIN))
    admin.load_model("resnet", headers=bearer(ADMIN))
    assert admin.is_model_ready("resnet", headers=bearer(ADMIN))


def test_probes_and_reflection_need_no_token(server, pki):
    with client(server, pki) as salvo:
        assert salvo.server_live() and salvo.server_ready()
    probe = triton(server, pki)
    assert probe.is_server_live() and probe.is_server_ready()
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(server.grpc_target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "inference.GRPCInferenceService" in services


def rest_call(server: ServerProcess, pki: Pki, client_cert: bool = True, token: str = ADMIN):
    """POST an mlp inference over HTTPS: (status, JSON answer)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    connection = http.client.HTTPSConnection(
        "localhost", server.http_port, context=context, timeout=20
    )
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X.ravel().tolist()}
            ]
        }
    )
    try:
        connection.request("POST", "/v2/models/mlp/infer", body, bearer(token))
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def test_the_rest_api_is_served_over_the_same_mutual_tls_and_tokens(server, pki):
    status, answer = rest_call(server, pki)
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 10]
    status, answer = rest_call(server, pki, token="wrong")
    assert status == 401 and "invalid bearer token" in answer["error"]
    # No client certificate: the handshake fails, as on the gRPC port.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        rest_call(server, pki, client_cert=False)
    # Plaintext reaches no REST API on a TLS port.
    plain = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/v2/health/live")
        plain.getresponse().read()
    plain.close()


def test_server_only_tls_and_disabled_repository_rpcs(repo, pki):
    """TLS without client certificates; no auth, so no interceptor; load/unload refused."""
    with InProcessServer(
        repo,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        repository_rpcs="disabled",
    ) as server:
        target = server.grpc_target
        with InferenceClient(target, root_certificates=pki.ca, retries=0, timeout_s=20) as salvo:
            assert salvo.infer("mlp", {"input": X})["output"].shape == (1, 10)
            with pytest.raises(PermissionDenied, match="RepositoryModelUnload is disabled"):
                salvo.unload_model("mlp")
            assert salvo.model_ready("mlp") is True
        referee = tc.InferenceServerClient(target, ssl=True, root_certificates=str(pki.ca))
        assert referee.infer("mlp", [triton_input()]).as_numpy("output").shape == (1, 10)
        with pytest.raises(InferenceServerException) as refused:
            referee.load_model("mlp")
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"


def test_unusable_tls_files_stop_start_up_naming_them(repo, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for cert, key, message in (
        (garbage, pki.server_key, "garbage.pem.*not a PEM certificate chain"),
        (pki.server_cert, tmp_path / "absent.key", "tls_key_file .*absent.key: cannot read it"),
    ):
        settings = Settings(
            model_repository=repo, grpc_port=0, http_port=0, tls_cert_file=cert, tls_key_file=key
        )
        server = SalvoServer(settings)
        with pytest.raises(ConfigError, match=message):
            asyncio.run(server.start())
