"""salvo_client against real servers over real sockets.

Every call of both clients runs against `salvo serve` on the demo repository, with
tritonclient as the referee. Retries, credentials and the pipelined stream's failure modes
are driven by small in-test gRPC servers (real sockets too) whose behaviour the test fixes:
a server that fails the first N attempts counts attempts exactly, which a real server
stopped and restarted on the same port cannot do without racing the client's backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as tc

from salvo_client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    SalvoClientError,
    StreamResult,
    Unauthenticated,
    Unavailable,
    commands,
)
from salvo_client import DeadlineExceeded as ClientDeadlineExceeded
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from tests.certs import make_pki
from tests.servers import ServerProcess
from tests.tools import require

CASES = [
    ("mlp", "input", (4, 64)),
    ("resnet", "input", (2, 3, 64, 64)),
    ("digits", "image", (5, 8, 8)),
]
SHAPE_ERROR = "input 'input': expected shape [-1, 64], got [1, 63]"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def rng(shape: tuple[int, ...], seed: int = 0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, high, size=shape).astype(np.float32)


def by_triton(triton: tc.InferenceServerClient, model: str, name: str, x: np.ndarray) -> dict:
    tensor = tc.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton.infer(model, [tensor])
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def assert_outputs_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        # Tolerance only for batching with other requests (a different reduction order).
        np.testing.assert_allclose(got[name], array, rtol=1e-5, atol=1e-6)


def same_message(ours: Any, theirs: Any) -> bool:
    """Equal protobuf messages from two descriptor pools (ours and tritonclient's)."""
    return ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def stats(client: InferenceClient, model: str) -> pb.ModelStatistics:
    (entry,) = client.statistics(model)
    return entry


@pytest.fixture(scope="module")
def client(demo_server) -> Iterator[InferenceClient]:
    with InferenceClient(demo_server.grpc_target, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def triton(demo_server) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(demo_server.grpc_target) as c:
        yield c


@pytest.fixture(scope="module")
def two_servers(demo_repo: Path) -> Iterator[list[ServerProcess]]:
    """Two more `salvo serve` on the demo repository, started side by side."""
    servers = [ServerProcess(demo_repo, "--torch-threads", "1") for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda s: s.start(), servers))
    try:
        yield started
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------- sync calls


def test_health_and_metadata_match_tritonclient(client, triton):
    assert client.server_live() is True
    assert client.server_ready() is True
    assert client.model_ready("mlp") is True
    assert client.model_ready("mlp", version=1) is True
    assert client.model_ready("nope") is False
    assert same_message(client.server_metadata(), triton.get_server_metadata())
    assert client.server_metadata().name == "salvo"
    for model in ("mlp", "digits"):
        assert same_message(client.model_metadata(model), triton.get_model_metadata(model))
        assert same_message(client.model_config(model), triton.get_model_config(model).config)
    assert client.model_metadata("digits", version="1").outputs[1].datatype == "INT64"
    index = client.repository_index()
    assert same_message(
        pb.RepositoryIndexResponse(models=index), triton.get_model_repository_index()
    )
    assert [(m.name, m.state) for m in index] == [
        ("digits", "READY"),
        ("mlp", "READY"),
        ("resnet", "READY"),
    ]
    assert [m.name for m in client.repository_index(ready=True)] == ["digits", "mlp", "resnet"]


def test_statistics(client):
    everything = client.statistics()
    assert sorted(s.name for s in everything) == ["digits", "mlp", "resnet"]
    before = stats(client, "resnet")
    client.infer("resnet", {"input": rng((3, 3, 64, 64))})
    after = client.statistics("resnet", version=1)
    assert [s.name for s in after] == ["resnet"]
    assert after[0].inference_stats.success.count == before.inference_stats.success.count + 1
    assert after[0].inference_count == before.inference_count + 3


@pytest.mark.parametrize(("model", "name", "shape"), CASES)
def test_infer_equals_tritonclient(client, triton, model, name, shape):
    x = rng(shape, seed=1, high=16.0 if model == "digits" else 1.0)
    got = client.infer(model, {name: x}, request_id="c-1")
    assert_outputs_equal(got, by_triton(triton, model, name, x))


def test_requested_output_subset_and_version(client, triton):
    x = rng((3, 8, 8), seed=2, high=16.0)
    got = client.infer("digits", {"image": x}, outputs=["label"], version=1)
    assert list(got) == ["label"]
    np.testing.assert_array_equal(got["label"], by_triton(triton, "digits", "image", x)["label"])
    assert got["label"].dtype == np.int64 and not got["label"].flags.writeable


def test_errors_are_typed_and_carry_the_server_message(client):
    with pytest.raises(NotFound) as missing:
        client.infer("nope", {"input": rng((1, 64))})
    assert missing.value.status is grpc.StatusCode.NOT_FOUND
    assert missing.value.message == "unknown model 'nope'"
    with pytest.raises(InvalidArgument) as bad:
        client.infer("mlp", {"input": rng((1, 63))})
    assert bad.value.status is grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.message == SHAPE_ERROR
    assert isinstance(bad.value, SalvoClientError)
    with pytest.raises(NotFound, match="has no version 7"):
        client.infer("mlp", {"input": rng((1, 64))}, version=7)
    with pytest.raises(NotFound):
        client.model_metadata("nope")
    with pytest.raises(InvalidArgument, match="parameter 'priority' must not be negative"):
        client.infer("mlp", {"input": rng((1, 64))}, priority=-1)


def test_deadline_exceeded_is_typed(client):
    # 1 µs cannot be met: gRPC fails the call locally or the server sees it expired.
    with pytest.raises(ClientDeadlineExceeded) as exc:
        client.infer("resnet", {"input": rng((8, 3, 64, 64))}, timeout_s=1e-6)
    assert exc.value.status is grpc.StatusCode.DEADLINE_EXCEEDED


def test_sync_stream_iterates_results_and_survives_a_bad_request(client):
    good = [rng((1, 64), seed=i) for i in range(3)]
    with client.stream() as stream:
        ids = [
            stream.send("mlp", {"input": good[0]}),
            stream.send("mlp", {"input": rng((1, 63))}, request_id="bad"),
            stream.send("mlp", {"input": good[1]}),
            stream.send("mlp", {"input": good[2]}),
        ]
        stream.close()
        results = {r.request_id: r for r in stream}
    assert ids[1] == "bad" and len(set(ids)) == 4
    assert set(results) == set(ids)
    error = results["bad"].error
    assert isinstance(error, InvalidArgument) and error.message == SHAPE_ERROR
    assert error.request_id == "bad"
    for request_id, x in zip([ids[0], ids[2], ids[3]], good, strict=True):
        assert results[request_id].ok
        assert_outputs_equal(results[request_id].unwrap(), client.infer("mlp", {"input": x}))


def test_sync_stream_with_a_callback(client):
    got: list[StreamResult] = []
    with client.stream(callback=got.append) as stream:
        sent = [stream.send("mlp", {"input": rng((2, 64), seed=i)}) for i in range(5)]
        stream.send("nope", {"input": rng((1, 64))}, request_id="missing")
    # Leaving the block waited for every answer.
    assert sorted(r.request_id for r in got) == sorted([*sent, "missing"])
    (missing,) = [r for r in got if r.request_id == "missing"]
    assert isinstance(missing.error, NotFound)
    assert all(r.ok for r in got if r.request_id != "missing")
    with pytest.raises(RuntimeError, match="closed for sending"):
        stream.send("mlp", {"input": rng((1, 64))})


# --------------------------------------------------------------------------- async calls


async def test_async_client_every_call(demo_server, triton):
    x = rng((2, 3, 64, 64), seed=5)
    async with AsyncInferenceClient(demo_server.grpc_target, timeout_s=30) as client:
        assert await client.server_live() is True
        assert await client.server_ready() is True
        assert await client.model_ready("resnet") is True
        assert await client.model_ready("nope") is False
        assert same_message(await client.server_metadata(), triton.get_server_metadata())
        assert same_message(await client.model_metadata("mlp"), triton.get_model_metadata("mlp"))
        assert same_message(
            await client.model_config("mlp", version=1), triton.get_model_config("mlp").config
        )
        index = await client.repository_index()
        assert same_message(
            pb.RepositoryIndexResponse(models=index), triton.get_model_repository_index()
        )
        assert [s.name for s in await client.statistics("mlp")] == ["mlp"]
        assert len(await client.statistics()) == 3
        got = await client.infer("resnet", {"input": x}, priority=1, request_id="a-1")
        assert_outputs_equal(got, by_triton(triton, "resnet", "input", x))
        digits = await client.infer("digits", {"image": rng((1, 8, 8))}, outputs=["logits"])
        assert list(digits) == ["logits"]
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            await client.infer("nope", {"input": x})
        with pytest.raises(InvalidArgument) as bad:
            await client.infer("mlp", {"input": rng((1, 63))})
        assert bad.value.message == SHAPE_ERROR


async def test_async_stream(demo_server):
    xs = [rng((1, 64), seed=10 + i) for i in range(4)]
    async with AsyncInferenceClient(demo_server.grpc_target) as client:
        async with client.stream() as stream:
            ids = [await stream.send("mlp", {"input": x}) for x in xs]
            await stream.send("mlp", {"input": rng((1, 63))}, request_id="bad")
            await stream.close()
            results = {r.request_id: r async for r in stream}
        assert set(results) == {*ids, "bad"}
        assert isinstance(results["bad"].error, InvalidArgument)
        for request_id, x in zip(ids, xs, strict=True):
            assert_outputs_equal(
                results[request_id].unwrap(), await client.infer("mlp", {"input": x})
            )


# --------------------------------------------------------------------------- pipelined


async def test_pipelined_concurrent_infers_get_their_own_answers(demo_server):
    xs = [rng((1 + i % 3, 64), seed=100 + i) for i in range(200)]
    bad = {17: "shape", 50: "model", 123: "shape"}
    async with AsyncInferenceClient(demo_server.grpc_target, timeout_s=60) as client:
        expected = [await client.infer("mlp", {"input": x}) for x in xs]
        pipeline = client.pipelined()
        assert client.pipelined() is pipeline

        async def call(i: int) -> dict[str, np.ndarray]:
            if bad.get(i) == "shape":
                return await pipeline.infer("mlp", {"input": rng((1, 63))})
            model = "nope" if bad.get(i) == "model" else "mlp"
            return await pipeline.infer(model, {"input": xs[i]})

        results = await asyncio.gather(*(call(i) for i in range(len(xs))), return_exceptions=True)
        assert pipeline.streams_opened == 1 and pipeline.in_flight == 0
    for i, result in enumerate(results):
        if bad.get(i) == "shape":
            assert isinstance(result, InvalidArgument) and result.message == SHAPE_ERROR
            assert result.request_id
        elif bad.get(i) == "model":
            assert isinstance(result, NotFound) and result.message == "unknown model 'nope'"
        else:
            assert isinstance(result, dict), result
            assert_outputs_equal(result, expected[i])


class FakeStream(pb_grpc.GRPCInferenceServiceServicer):
    """A ModelStreamInfer whose first stream misbehaves as told; later ones echo at once.

    `hold`: the first stream answers nothing until `gate` is set, then echoes in order.
    `break_after`: the first stream sends its headers, reads that many requests, answers
    none, and aborts.
    """

    def __init__(self, hold: bool = False, break_after: int | None = None) -> None:
        self.hold = hold
        self.break_after = break_after
        self.gate = asyncio.Event()
        self.received: asyncio.Queue[pb.ModelInferRequest] = asyncio.Queue()
        self.streams = 0

    async def ModelStreamInfer(self, request_iterator, context):
        self.streams += 1
        first = self.streams == 1
        count = 0
        if first and self.break_after is not None:
            # Headers commit the call: gRPC would otherwise retry the whole stream
            # (UNAVAILABLE is retryable) and replay what it buffered.
            await context.send_initial_metadata(())
        async for request in request_iterator:
            count += 1
            self.received.put_nowait(request)
            if first and self.break_after is not None:
                if count == self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake: connection reset")
                continue
            if first and self.hold:
                await self.gate.wait()
            yield pb.ModelStreamInferResponse(infer_response=echo(request))


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The request's first input, answered as output 'echo'."""
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    tensor = request.inputs[0]
    response.outputs.add(name="echo", datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.append(request.raw_input_contents[0])
    return response


@contextlib.asynccontextmanager
async def fake_aio_server(servicer: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_pipelined_cancelled_caller_leaves_the_stream_intact():
    fake = FakeStream(hold=True)
    async with fake_aio_server(fake) as target, AsyncInferenceClient(target) as client:
        pipeline = client.pipelined()
        first = asyncio.create_task(pipeline.infer("m", {"x": np.arange(3.0)}))
        sent = await asyncio.wait_for(fake.received.get(), 30)  # on the server, unanswered
        assert pipeline.in_flight == 1
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pipeline.in_flight == 0
        second = asyncio.create_task(pipeline.infer("m", {"x": np.arange(4, dtype=np.int8)}))
        fake.gate.set()  # the first answer arrives for a caller that left, then the second
        got = await asyncio.wait_for(second, 30)
        np.testing.assert_array_equal(got["echo"], np.arange(4, dtype=np.int8))
        assert (await fake.received.get()).id != sent.id
        assert pipeline.streams_opened == 1 and fake.streams == 1


async def test_pipelined_deadline_is_local_and_sent_to_the_server():
    fake = FakeStream(hold=True)
    async with fake_aio_server(fake) as target, AsyncInferenceClient(target) as client:
        pipeline = client.pipelined()
        with pytest.raises(ClientDeadlineExceeded) as exc:
            await pipeline.infer("m", {"x": np.zeros(2)}, timeout_s=0.2, request_id="slow")
        assert exc.value.request_id == "slow"
        request = fake.received.get_nowait()
        assert request.id == "slow"
        assert request.parameters["timeout"].int64_param == 200_000
        fake.gate.set()
        got = await pipeline.infer("m", {"x": np.ones(2)})
        np.testing.assert_array_equal(got["echo"], np.ones(2))
        assert pipeline.streams_opened == 1


async def test_pipelined_broken_stream_fails_pending_calls_and_reopens():
    fake = FakeStream(break_after=3)
    async with fake_aio_server(fake) as target, AsyncInferenceClient(target) as client:
        pipeline = client.pipelined()
        calls = [pipeline.infer("m", {"x": np.full(2, i)}) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results), results
        assert {r.request_id for r in results if isinstance(r, Unavailable)} == {
            fake.received.get_nowait().id for _ in range(3)
        }
        assert "fake: connection reset" in str(results[0])
        got = await pipeline.infer("m", {"x": np.full(2, 7)})
        np.testing.assert_array_equal(got["echo"], np.full(2, 7))
        assert pipeline.streams_opened == 2 and fake.streams == 2


# --------------------------------------------------------------------------- retries


class Flaky(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer fails its first `failures` attempts with `code`, then echoes; ServerLive
    checks the bearer token. Every attempt and its metadata is recorded."""

    def __init__(
        self,
        failures: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        pushback_ms: int | None = None,
    ) -> None:
        self.failures = failures
        self.code = code
        self.pushback_ms = pushback_ms
        self.attempts = 0
        self.metadata: list[dict[str, str]] = []

    def ModelInfer(self, request, context):
        self.attempts += 1
        if self.attempts <= self.failures:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            context.abort(self.code, f"fake failure {self.attempts}")
        return echo(request)

    def ServerLive(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        token = metadata.get("authorization")
        if token is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        if token != "Bearer s3cret":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong token")
        return pb.ServerLiveResponse(live=True)


@contextlib.contextmanager
def fake_server(servicer: Any, credentials: grpc.ServerCredentials | None = None) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_unavailable_is_retried_until_it_succeeds():
    flaky = Flaky(failures=2)
    with fake_server(flaky) as target, InferenceClient(target, retries=FAST_RETRY) as client:
        got = client.infer("m", {"x": np.arange(5, dtype=np.int32)})
    np.testing.assert_array_equal(got["echo"], np.arange(5, dtype=np.int32))
    assert flaky.attempts == 3


def test_retries_stop_at_max_attempts_with_the_last_error():
    flaky = Flaky(failures=5)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    with (
        fake_server(flaky) as target,
        InferenceClient(target, retries=policy) as client,
        pytest.raises(Unavailable) as exc,
    ):
        client.infer("m", {"x": np.zeros(1)})
    assert exc.value.message == "fake failure 2"
    assert flaky.attempts == 2


def test_no_retries_when_disabled():
    flaky = Flaky(failures=1)
    with (
        fake_server(flaky) as target,
        InferenceClient(target, retries=0) as client,
        pytest.raises(Unavailable, match="fake failure 1"),
    ):
        client.infer("m", {"x": np.zeros(1)})
    assert flaky.attempts == 1


def test_resource_exhausted_is_retried_after_the_server_push_back():
    flaky = Flaky(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=300)
    with fake_server(flaky) as target, InferenceClient(target, retries=FAST_RETRY) as client:
        started = time.monotonic()
        client.infer("m", {"x": np.zeros(1)})
        elapsed_s = time.monotonic() - started
    assert flaky.attempts == 2
    # Backoff alone would have waited at most 10 ms: gRPC waited for the push-back.
    assert elapsed_s >= 0.29


def test_resource_exhausted_without_retries_is_typed():
    flaky = Flaky(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=1)
    with (
        fake_server(flaky) as target,
        InferenceClient(target, retries=0) as client,
        pytest.raises(ResourceExhausted, match="fake failure 1"),
    ):
        client.infer("m", {"x": np.zeros(1)})


async def test_async_client_retries_too():
    flaky = Flaky(failures=2)
    with fake_server(flaky) as target:
        async with AsyncInferenceClient(target, retries=FAST_RETRY) as client:
            got = await client.infer("m", {"x": np.ones(3, np.float16)})
    np.testing.assert_array_equal(got["echo"], np.ones(3, np.float16))
    assert flaky.attempts == 3


def test_invalid_argument_is_never_retried():
    flaky = Flaky(failures=5, code=grpc.StatusCode.INVALID_ARGUMENT)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02)
    with (
        fake_server(flaky) as target,
        InferenceClient(target, retries=policy) as client,
        pytest.raises(InvalidArgument, match="fake failure 1"),
    ):
        client.infer("m", {"x": np.zeros(1)})
    assert flaky.attempts == 1


def test_invalid_argument_is_sent_once_to_a_real_server(two_servers):
    target = two_servers[0].grpc_target
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02)
    with InferenceClient(target, retries=policy) as client:
        before = stats(client, "mlp").inference_stats.fail.count
        with pytest.raises(InvalidArgument, match=r"expected shape \[-1, 64\]"):
            client.infer("mlp", {"input": rng((1, 63))})
        assert stats(client, "mlp").inference_stats.fail.count == before + 1


def test_unreachable_server_is_unavailable():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        InferenceClient(f"127.0.0.1:{port}", retries=FAST_RETRY, timeout_s=10) as client,
        pytest.raises(Unavailable),
    ):
        client.server_live()


# --------------------------------------------------------------------------- several targets


def test_round_robin_spreads_calls_over_two_servers(two_servers):
    calls = 40
    targets = [s.grpc_target for s in two_servers]
    clients = [InferenceClient(t) for t in targets]
    before = [stats(c, "mlp") for c in clients]
    with InferenceClient(targets) as client:
        assert client.target == "ipv4:" + ",".join(targets)
        for i in range(calls):
            client.infer("mlp", {"input": rng((1, 64), seed=i)})
    after = [stats(c, "mlp") for c in clients]
    for c in clients:
        c.close()
    served = [a.inference_count - b.inference_count for a, b in zip(after, before, strict=True)]
    requests = [
        a.inference_stats.success.count - b.inference_stats.success.count
        for a, b in zip(after, before, strict=True)
    ]
    assert all(n > 0 for n in served), served
    assert sum(served) == calls and sum(requests) == calls


def test_dns_target(two_servers):
    port = two_servers[1].grpc_port
    with InferenceClient(f"dns:///127.0.0.1:{port}") as client:
        assert client.model_ready("mlp")


# --------------------------------------------------------------------------- load, unload


def test_load_and_unload(two_servers):
    target = two_servers[1].grpc_target
    with InferenceClient(target) as client:
        client.unload_model("resnet")
        assert client.model_ready("resnet") is False
        states = {m.name: m.state for m in client.repository_index()}
        assert states["resnet"] == "UNAVAILABLE"
        with pytest.raises(Unavailable, match="resnet"):
            client.infer("resnet", {"input": rng((1, 3, 64, 64))}, timeout_s=10)
        client.load_model("resnet")
        assert client.model_ready("resnet") is True
        assert client.infer("resnet", {"input": rng((1, 3, 64, 64))})["output"].shape == (1, 10)
        with pytest.raises(NotFound):
            client.load_model("nope")


# --------------------------------------------------------------------------- credentials


def test_bearer_token_on_an_insecure_channel():
    flaky = Flaky()
    with fake_server(flaky) as target:
        with InferenceClient(target, token="s3cret", headers={"X-Team": "t"}) as client:
            assert client.server_live() is True
        assert flaky.metadata[-1]["authorization"] == "Bearer s3cret"
        assert flaky.metadata[-1]["x-team"] == "t"
        with InferenceClient(target) as client, pytest.raises(Unauthenticated, match="no token"):
            client.server_live()
        with (
            InferenceClient(target, token="nope") as client,
            pytest.raises(PermissionDenied, match="wrong token"),
        ):
            client.server_live()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and a client certificate (tests.certs)."""
    require("openssl")
    folder = tmp_path_factory.mktemp("tls")
    make_pki(folder)
    return folder


def test_mutual_tls_with_a_token(certificates):
    d = certificates
    credentials = grpc.ssl_server_credentials(
        [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
        root_certificates=(d / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    flaky = Flaky()
    with fake_server(flaky, credentials) as target:
        mtls = {
            "root_certificates": d / "ca.pem",
            "client_certificate": d / "client.pem",
            "client_key": (d / "client.key").read_bytes(),
            "tls_server_name": "localhost",
        }
        with InferenceClient(target, token="s3cret", **mtls) as client:
            assert client.server_live() is True
        assert flaky.metadata[-1]["authorization"] == "Bearer s3cret"
        # Without a client certificate the handshake fails.
        with (
            InferenceClient(
                target,
                root_certificates=(d / "ca.pem").read_text(),
                tls_server_name="localhost",
                token="s3cret",
                retries=0,
                timeout_s=10,
            ) as client,
            pytest.raises(Unavailable),
        ):
            client.server_live()


# --------------------------------------------------------------------------- trace context


def test_trace_context_travels_in_metadata():
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    flaky = Flaky()
    with (
        fake_server(flaky) as target,
        InferenceClient(target, token="s3cret") as client,
        trace.use_span(trace.NonRecordingSpan(context)),
    ):
        client.server_live()
    assert flaky.metadata[-1]["traceparent"] == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )


# --------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = commands.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_infer_from_npy_and_json(demo_server, client, capsys, tmp_path):
    url = ["--url", demo_server.grpc_target]
    x = rng((2, 64), seed=7)
    np.save(tmp_path / "x.npy", x)
    want = client.infer("mlp", {"input": x})["output"]

    code, out, _ = run_cli(capsys, "infer", "mlp", f"input={tmp_path / 'x.npy'}", *url)
    assert code == 0
    printed = json.loads(out)["output"]
    assert printed["shape"] == [2, 10] and printed["dtype"] == "float32"
    np.testing.assert_allclose(np.array(printed["data"]).reshape(2, 10), want, rtol=1e-5)

    image = rng((1, 8, 8), seed=8, high=16.0)
    inline = "image=" + json.dumps(image.tolist())
    code, out, _ = run_cli(capsys, "infer", "digits", inline, "--output", "label", *url)
    assert code == 0
    label = client.infer("digits", {"image": image}, outputs=["label"])["label"]
    assert json.loads(out) == {"label": {"shape": [1, 1], "dtype": "int64", "data": [label.item()]}}

    out_dir = tmp_path / "out"
    code, out, _ = run_cli(
        capsys, "infer", "mlp", f"input={tmp_path / 'x.npy'}", "--output-dir", str(out_dir), *url
    )
    assert code == 0 and "output: [2, 10] float32" in out
    np.testing.assert_allclose(np.load(out_dir / "output.npy"), want, rtol=1e-5)

    code, _, err = run_cli(capsys, "infer", "mlp", "input=[[1, 2]]", "--timeout-s", "10", *url)
    assert code == 1
    assert (
        err.strip() == "error: INVALID_ARGUMENT: input 'input': expected shape [-1, 64], got [1, 2]"
    )


def test_cli_models_and_stats(demo_server, capsys):
    url = ["--url", demo_server.grpc_target]
    code, out, _ = run_cli(capsys, "models", *url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "READY", "REASON"]
    assert [line.split() for line in lines[1:]] == [
        ["digits", "1", "READY", "yes"],
        ["mlp", "1", "READY", "yes"],
        ["resnet", "1", "READY", "yes"],
    ]
    code, out, _ = run_cli(capsys, "models", "--json", *url)
    assert [(m["name"], m["ready"]) for m in json.loads(out)] == [
        ("digits", True),
        ("mlp", True),
        ("resnet", True),
    ]
    code, out, _ = run_cli(capsys, "models", "--metadata", "digits", *url)
    metadata = json.loads(out)
    assert code == 0 and [o["name"] for o in metadata["outputs"]] == ["logits", "label"]

    code, out, _ = run_cli(capsys, "stats", "--json", "--model", "mlp", *url)
    (summary,) = json.loads(out)
    assert code == 0 and summary["model"] == "mlp" and summary["version"] == "1"
    assert summary["requests"] == summary["success"] + summary["fail"] > 0
    code, out, _ = run_cli(capsys, "stats", *url)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["MODEL", "VERSION", "REQUESTS"]
    assert sorted(line.split()[0] for line in out.splitlines()[1:]) == ["digits", "mlp", "resnet"]

    code, _, err = run_cli(capsys, "stats", "--model", "nope", *url)
    assert code == 1 and err.strip() == "error: NOT_FOUND: unknown model 'nope'"


def test_client_and_cli_import_without_torch():
    script = (
        "import sys, salvo_client, salvo_client.commands, salvo_client.aio;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert not any(m == 'salvo' or m.startswith('salvo.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
