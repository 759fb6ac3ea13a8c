"""The pure parts of security and admission: token files, rights, the token bucket, which
interceptors and connection options a configuration gets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from salvo.core.admission import Admission, Principal, RateLimiter, Tokens, load_tokens
from salvo.domain.status import ConfigError, Status
from salvo.frontends.grpc.access import AccessInterceptor, build_interceptors, peer_host, refusal_of
from salvo.frontends.grpc.transport import grpc_options
from salvo.ops.access import admission_from, repository_changes_allowed
from salvo.ops.settings import Settings
from salvo_client.proto import grpc_service_pb2 as pb


def test_tokens_file_yaml_and_json(tmp_path: Path):
    (tmp_path / "t.yaml").write_text(
        "abc: {name: team-a, models: [mlp, digits]}\n"
        "xyz: {name: ops, models: '*', repository: true}\n"
    )
    (tmp_path / "t.json").write_text('{"abc": {"name": "team-a", "models": ["mlp", "digits"]}}')
    parsed = load_tokens(tmp_path / "t.yaml")
    assert parsed["abc"] == Principal("team-a", frozenset({"mlp", "digits"}), False)
    assert parsed["xyz"] == Principal("ops", None, True)
    assert load_tokens(tmp_path / "t.json")["abc"] == parsed["abc"]
    tokens = Tokens(parsed)
    assert tokens.get("xyz") == parsed["xyz"] and tokens.get("xy") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "expected a mapping"),
        ("123: {name: a}", "a token must be a non-empty string"),
        ("abc: {models: '*'}", r"entry 1: 'name' must be"),
        ("abc: {name: a, models: mlp}", r"entry 1 \('a'\): 'models' must be"),
        ("abc: {name: a, repository: 'yes'}", "'repository' must be true or false"),
        ("abc: {name: a, model: [mlp]}", r"unknown field\(s\) \['model'\]"),
        ("abc: {name: a", "cannot read it"),
    ],
)
def test_a_bad_tokens_file_names_the_entry_and_never_the_token(tmp_path, text, message):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_tokens(path)
    assert str(path) in str(error.value)
    assert "abc" not in str(error.value).replace(str(path), "")


def test_rights_per_model_and_for_the_repository():
    admission = Admission(Tokens({}), None)
    team = Principal("team-a", frozenset({"mlp"}), False)

    def refusal(principal, rpc, request):
        return refusal_of(admission, principal, principal.name, rpc, request)

    assert refusal(team, "ModelInfer", pb.ModelInferRequest(model_name="mlp")) is None
    denied = refusal(team, "ModelConfig", pb.ModelConfigRequest(name="resnet"))
    assert denied is not None and denied.status is Status.PERMISSION_DENIED
    assert "model 'resnet'" in denied.message
    every = refusal(team, "ModelStatistics", pb.ModelStatisticsRequest())
    assert every is not None and "every model" in every.message
    index = refusal(team, "RepositoryIndex", pb.RepositoryIndexRequest())
    assert index is not None and "RepositoryIndex" in index.message
    assert refusal(team, "ServerMetadata", pb.ServerMetadataRequest()) is None
    ops = Principal("ops", None, True)
    load = pb.RepositoryModelLoadRequest(model_name="resnet")
    assert refusal(ops, "RepositoryModelLoad", load) is None


def test_the_rate_limit_refuses_with_the_wait_to_push_back():
    admission = Admission(None, RateLimiter(rate_per_s=2, burst=1))
    assert admission.check(None, "peer", "ModelInfer", "mlp", now=0.0) is None
    refused = admission.check(None, "peer", "ModelInfer", "mlp", now=0.0)
    assert refused is not None and refused.status is Status.RESOURCE_EXHAUSTED
    assert refused.retry_after_ms == 500 and "client 'peer'" in refused.message


def test_peer_identity_leaves_out_the_port():
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_token_bucket_per_identity():
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.admit("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.admit("a", 0.0) == 500  # one token comes back in 1/2 s
    assert limiter.admit("b", 0.0) == 0  # a's flood costs b nothing
    assert limiter.admit("a", 0.25) == 250
    assert limiter.admit("a", 0.5) == 0
    assert limiter.admit("a", 100.0) == 0  # refilled, but never above the burst
    assert [limiter.admit("a", 100.0) for _ in range(3)] == [0, 0, 500]
    assert RateLimiter(rate_per_s=0.5).burst == 1 and RateLimiter(rate_per_s=10).burst == 10


def test_idle_buckets_are_forgotten_beyond_the_cap():
    limiter = RateLimiter(rate_per_s=1, burst=2, max_identities=2)
    limiter.admit("a", 0.0)
    limiter.admit("b", 1.5)
    limiter.admit("c", 2.5)  # a has refilled (2 s at 1/s): forgotten; b has not
    assert len(limiter) == 2
    assert limiter.admit("b", 2.5) == 0 and limiter.admit("b", 2.5) == 0
    assert limiter.admit("b", 2.5) > 0  # b kept its state


def test_interceptor_only_when_configured(tmp_path):
    assert admission_from(Settings()) is None and build_interceptors(None) == []
    (interceptor,) = build_interceptors(admission_from(Settings(rate_limit_per_s=5)))
    assert isinstance(interceptor, AccessInterceptor) and interceptor.admission.tokens is None
    (interceptor,) = build_interceptors(admission_from(Settings(auth_token="s3cret")))
    admission = interceptor.admission
    assert admission.limiter is None
    assert admission.tokens is not None and admission.tokens.get("s3cret") is not None


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        ({}, True),  # 127.0.0.1
        ({"host": "0.0.0.0"}, False),
        ({"host": "0.0.0.0", "auth_token": "t"}, True),
        ({"host": "::1"}, True),
        ({"host": "0.0.0.0", "repository_rpcs": "enabled"}, True),
        ({"repository_rpcs": "disabled", "auth_token": "t"}, False),
    ],
)
def test_repository_rpcs_auto_is_off_on_a_network_without_auth(settings, allowed):
    assert repository_changes_allowed(Settings(**settings)) is allowed


def test_connection_options():
    options = dict(grpc_options(Settings()))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert "grpc.max_connection_age_grace_ms" not in options  # inf: never cut a call
    assert options["grpc.keepalive_permit_without_calls"] == 1
    # gRPC core refuses calls past the pending backlog, rising to all of them at 3x it.
    assert options["grpc.server.max_pending_requests"] == 1000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 3000
    options = dict(grpc_options(Settings(max_pending_rpcs=100)))
    assert options["grpc.server.max_pending_requests_hard_limit"] == 300
    options = dict(grpc_options(Settings(max_connection_age_s=0, max_connection_age_grace_s=5)))
    assert "grpc.max_connection_age_ms" not in options
    options = dict(grpc_options(Settings(max_connection_age_s=60, max_connection_age_grace_s=5)))
    assert options["grpc.max_connection_age_grace_ms"] == 5000
    assert math.isinf(Settings().max_connection_age_grace_s)


def test_tls_files_come_in_pairs(tmp_path):
    with pytest.raises(ValidationError, match="set together"):
        Settings(tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        Settings(tls_client_ca_file=tmp_path / "ca.pem")
