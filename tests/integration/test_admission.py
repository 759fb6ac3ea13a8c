"""Admission and connection limits on a real Salvo: rate limits per client with push-back,
fairness between clients, the concurrent-RPC cap, the message-size limit and connection
age. Salvo's client, tritonclient and bare gRPC stubs (to read trailers) as referees."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from salvo_client import InferenceClient, ResourceExhausted
from salvo_client.messages import build_request
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import InProcessServer

RATE_PER_S = 2.0
BURST = 3
TOKENS = ("flood", "quiet", "solo", "patient", "streamer")
X = np.ones((1, 64), np.float32)


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    return root


@pytest.fixture(scope="module")
def limited(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A rate limit per token: each test uses a token of its own, so a bucket of its own."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(
        "{" + ",".join(f'"{t}-token": {{"name": "{t}", "models": "*"}}' for t in TOKENS) + "}"
    )
    with InProcessServer(
        repo, auth_tokens_file=tokens, rate_limit_per_s=RATE_PER_S, rate_limit_burst=BURST
    ) as server:
        yield server


def stub(target: str) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def call_until_shed(
    infer: pb_grpc.GRPCInferenceServiceStub, metadata: tuple = (), limit: int = 50
) -> tuple[int, grpc.RpcError]:
    """ModelInfer until one is refused; the number that passed and the refusal."""
    request = build_request("mlp", {"input": X})
    for passed in range(limit):
        try:
            infer.ModelInfer(request, metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return passed, exc
    raise AssertionError(f"{limit} calls in a row passed a limit of {RATE_PER_S}/s")


def held(release: threading.Event, *requests: pb.ModelInferRequest):
    """A stream's requests: `requests`, then nothing until `release` is set."""
    yield from requests
    release.wait(60)


def pushback_ms(error: grpc.RpcError) -> int:
    return int(dict(error.trailing_metadata())["grpc-retry-pushback-ms"])  # type: ignore[attr-defined]


def test_over_the_rate_is_shed_with_pushback(limited):
    channel, infer = stub(limited.grpc_target)
    with channel:
        passed, shed = call_until_shed(infer, (("authorization", "Bearer solo-token"),))
    # At least the burst passes; the rest of a quick loop waits on a 2/s refill.
    assert passed >= BURST
    assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "rate limit: client 'solo'" in shed.details()  # type: ignore[attr-defined]
    assert 0 < pushback_ms(shed) <= 1000 / RATE_PER_S


def test_a_client_that_waits_out_the_pushback_is_served(limited):
    """gRPC's retry policy (salvo_client's default) waits the push-back, then succeeds."""
    channel, infer = stub(limited.grpc_target)
    with channel:
        call_until_shed(infer, (("authorization", "Bearer patient-token"),))
    with InferenceClient(limited.grpc_target, token="patient-token", retries=1) as patient:
        # Its first attempt is shed (the bucket refills in 500 ms); the retry waits that out.
        assert patient.infer("mlp", {"input": X})["output"].shape == (1, 10)


def test_a_flooding_client_does_not_starve_another(limited):
    stop = threading.Event()
    shed = threading.Semaphore(0)
    counts: Counter[str] = Counter()

    def flood() -> None:
        noisy = tc.InferenceServerClient(limited.grpc_target)
        x = tc.InferInput("input", [1, 64], "FP32")
        x.set_data_from_numpy(X)
        while not stop.is_set():
            try:
                noisy.infer("mlp", [x], headers={"authorization": "Bearer flood-token"})
                counts["ok"] += 1
            except InferenceServerException as exc:
                counts[exc.status()] += 1
                shed.release()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        assert shed.acquire(timeout=30), "the flood was never shed"
        with InferenceClient(limited.grpc_target, token="quiet-token", retries=0) as quiet:
            answers = [quiet.infer("mlp", {"input": X})["output"] for _ in range(BURST)]
        # The flood went on, and was still being shed, after the quiet client was served.
        assert shed.acquire(timeout=30)
    finally:
        stop.set()
        flooder.join(30)
    assert [a.shape for a in answers] == [(1, 10)] * BURST
    assert set(counts) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}, counts


def test_each_request_of_a_stream_counts_and_is_shed_in_band(limited):
    sent = BURST + 4
    with (
        InferenceClient(limited.grpc_target, token="streamer-token", retries=0) as client,
        client.stream() as stream,
    ):
        for _ in range(sent):
            stream.send("mlp", {"input": X})
        stream.close()
        results = list(stream)
    assert len(results) == sent  # the stream stayed open for every answer
    refused = [r.error for r in results if not r.ok]
    assert sum(r.ok for r in results) >= BURST and refused
    assert all(isinstance(e, ResourceExhausted) and "rate limit" in str(e) for e in refused)


def test_without_auth_the_identity_is_the_peer_address(repo):
    """Two connections from one host share a bucket: a new connection is no way around."""
    with InProcessServer(repo, rate_limit_per_s=RATE_PER_S, rate_limit_burst=BURST) as server:
        first, infer = stub(server.grpc_target)
        second, other = stub(server.grpc_target)
        with first, second:
            passed, shed = call_until_shed(infer)
            assert passed >= BURST
            _, shed_too = call_until_shed(other, limit=1)
    for error in (shed, shed_too):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "client '127.0.0.1'" in error.details()  # type: ignore[attr-defined]
        assert pushback_ms(error) > 0


def test_message_size_limit_and_concurrent_rpc_cap(repo):
    with InProcessServer(repo, max_concurrent_rpcs=2, max_message_bytes=64 * 1024) as server:
        channel, infer = stub(server.grpc_target)
        with channel:
            # 100 rows of 64 FP32 are 25.6 kB; 300 rows (77 kB) are over 64 KiB.
            fits = build_request("mlp", {"input": np.ones((100, 64), np.float32)})
            assert len(infer.ModelInfer(fits, timeout=20).outputs) == 1
            oversize = build_request("mlp", {"input": np.ones((300, 64), np.float32)})
            with pytest.raises(grpc.RpcError) as too_big:
                infer.ModelInfer(oversize, timeout=20)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "larger than max" in too_big.value.details()  # type: ignore[attr-defined]

            release = threading.Event()
            # Two open streams, each answered once so that both surely count, fill the cap.
            streams = [infer.ModelStreamInfer(held(release, fits), timeout=30) for _ in "ab"]
            try:
                for stream in streams:
                    assert not next(stream).error_message
                with pytest.raises(grpc.RpcError) as capped:
                    infer.ServerLive(pb.ServerLiveRequest(), timeout=20)
            finally:
                release.set()
                for stream in streams:
                    stream.cancel()
            assert capped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


def test_an_aged_connection_is_closed_after_its_grace(repo):
    """An idle stream outlives neither max age nor grace; the client then reconnects."""
    with InProcessServer(repo, max_connection_age_s=0.5, max_connection_age_grace_s=0.5) as server:
        channel, infer = stub(server.grpc_target)
        release = threading.Event()
        with channel:
            idle = infer.ModelStreamInfer(held(release), timeout=30)
            with pytest.raises(grpc.RpcError) as ended:
                next(idle)
            release.set()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert infer.ServerLive(pb.ServerLiveRequest(), timeout=20).live
