"""Root spans sampled by Salvo itself under the parent-based ratio samplers.

`Telemetry` is built from the OTEL_* environment here, as `salvo serve` builds it; the OTLP
endpoint is a closed port (nothing is exported: these tests look at the decisions only).
"""

from __future__ import annotations

import random
import socket

import pytest

from salvo.observability.telemetry import Telemetry

METHOD = "inference.GRPCInferenceService/ModelInfer"
SAMPLED_PARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
UNSAMPLED_PARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def telemetry_with(monkeypatch):
    built: list[Telemetry] = []

    def build(sampler: str, arg: str | None = None) -> Telemetry:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
        if arg is None:
            monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
        else:
            monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
        telemetry = Telemetry()
        built.append(telemetry)
        return telemetry

    yield build
    for telemetry in built:
        telemetry.shutdown(timeout_s=0.5)


def started(telemetry: Telemetry, metadata=()) -> bool:
    span = telemetry.start_rpc(METHOD, lambda: metadata)
    if span is None:
        return False
    assert span.is_recording()
    span.end()
    return True


def test_ratio_zero_drops_every_root_but_follows_a_sampled_parent(telemetry_with):
    telemetry = telemetry_with("parentbased_traceidratio", "0")
    assert not any(started(telemetry) for _ in range(200))
    assert started(telemetry, SAMPLED_PARENT)
    assert not started(telemetry, UNSAMPLED_PARENT)


def test_ratio_one_keeps_every_root_and_follows_an_unsampled_parent(telemetry_with):
    telemetry = telemetry_with("parentbased_traceidratio", "1.0")
    assert all(started(telemetry) for _ in range(200))
    assert not started(telemetry, UNSAMPLED_PARENT)


def test_a_ratio_keeps_that_share_of_roots(telemetry_with):
    telemetry = telemetry_with("parentbased_traceidratio", "0.25")
    random.seed(7)
    kept = sum(started(telemetry) for _ in range(4000))
    # Binomial(4000, 0.25): mean 1000, standard deviation 27; seeded, so exact each run.
    assert 900 < kept < 1100
    # Every root Salvo keeps reaches the exporter's processor: none is dropped a second
    # time by the SDK's own ratio sampler (that would keep 1 in 16 here, not 1 in 4).


def test_always_off_drops_roots_and_follows_a_sampled_parent(telemetry_with):
    telemetry = telemetry_with("parentbased_always_off")
    assert not started(telemetry)
    assert started(telemetry, SAMPLED_PARENT)


@pytest.mark.parametrize(
    ("sampler", "arg"),
    [("always_on", None), ("traceidratio", "0.5"), ("parentbased_traceidratio", "2")],
)
def test_other_samplers_are_left_to_the_sdk(telemetry_with, sampler, arg):
    telemetry = telemetry_with(sampler, arg)
    assert telemetry._root_ratio is None
    if sampler == "always_on":
        assert started(telemetry)
