"""Overload: a burst far above a tiny queue is shed at once, with push-back, and nothing else
is disturbed.

test_batching.py checks the exact arithmetic of a full queue (max_queue_size + k gets k
rejections). Here the burst is 200 requests deep, every rejection is checked for its
`grpc-retry-pushback-ms` trailer, the server's own accounting (ModelStatistics, the
/metrics gauges) must match what the clients saw, and the server serves normally after.
The long version, 5x the saturating load for 30 s, is `make bench-overload`.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from tests.gated import GatedLoader, write_model
from tests.metrics import gauges
from tests.servers import InProcessServer

MODEL = "bounded"
QUEUE = 4
BURST = 200
CONFIG = (
    "max_batch_size: 4\n"
    "inputs: [{name: x, datatype: FP32, dims: [1]}]\n"
    "outputs: [{name: y, datatype: FP32, dims: [1]}]\n"
    f"dynamic_batching: {{max_queue_size: {QUEUE}, max_queue_delay_us: 100}}\n"
)


@pytest.fixture(scope="module")
def loader():
    return GatedLoader()


@pytest.fixture(scope="module")
def server(tmp_path_factory, loader):
    root = tmp_path_factory.mktemp("overload-repo")
    write_model(root, MODEL, CONFIG)
    with InProcessServer(root, loader) as server:
        yield server


def request(row_id: int) -> pb.ModelInferRequest:
    out = pb.ModelInferRequest(model_name=MODEL, id=str(row_id))
    out.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    out.raw_input_contents.append(np.full((1, 1), row_id, np.float32).tobytes())
    return out


async def answer(call) -> str:
    """ "OK" (output checked), or the status name; a rejection must carry its push-back."""
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            pushback = dict(await call.trailing_metadata()).get("grpc-retry-pushback-ms", "")
            assert pushback.isdigit() and int(pushback) > 0, exc
            assert "queue full" in exc.details()
        return exc.code().name
    value = np.frombuffer(response.raw_output_contents[0], np.float32)
    assert value.tolist() == [2.0 * int(response.id)]
    return "OK"


async def counts(stub) -> tuple[int, int]:
    """(success, failure) counts of the model, from ModelStatistics."""
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=10)
    inference = stats.model_stats[0].inference_stats
    return inference.success.count, inference.fail.count


async def serves_normally(stub) -> None:
    assert await answer(stub.ModelInfer(request(7), timeout=30)) == "OK"


async def test_a_burst_far_above_the_queue_is_shed_at_once_with_pushback(server, loader):
    model = loader.modules[MODEL]
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await serves_normally(stub)
        success, fail = await counts(stub)
        model.hold()
        ran_before = len(model.batches)
        admitted = [stub.ModelInfer(request(0), timeout=60)]
        await asyncio.to_thread(model.wait_batches, ran_before + 1)  # holds the one instance
        admitted += [stub.ModelInfer(request(i), timeout=60) for i in range(1, QUEUE + 1)]
        await asyncio.to_thread(server.wait_queued, MODEL, QUEUE)

        burst = [stub.ModelInfer(request(i), timeout=60) for i in range(100, 100 + BURST)]
        # Every one is answered while the model is still held: shed at once, not queued.
        assert await asyncio.gather(*map(answer, burst)) == ["RESOURCE_EXHAUSTED"] * BURST
        model.open()
        assert await asyncio.gather(*map(answer, admitted)) == ["OK"] * (QUEUE + 1)

        ran = {int(v) for batch in model.batches[ran_before:] for v in batch}
        assert ran == set(range(QUEUE + 1))
        assert await counts(stub) == (success + QUEUE + 1, fail + BURST)
        await asyncio.to_thread(server.wait_queued, MODEL, 0)
        assert gauges(server.server.http_port, MODEL) == {
            "salvo_queue_depth": 0.0,
            "salvo_inflight": 0.0,
        }
        await serves_normally(stub)


async def test_overload_while_the_model_runs_is_accounted_for_exactly(server, loader):
    loader.modules[MODEL].open()
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        success, fail = await counts(stub)
        calls = [stub.ModelInfer(request(i), timeout=60) for i in range(1000, 1000 + 2 * BURST)]
        results = await asyncio.gather(*map(answer, calls))
        assert set(results) <= {"OK", "RESOURCE_EXHAUSTED"}
        # What the server counted is what the clients saw.
        after = await counts(stub)
        assert after == (success + results.count("OK"), fail + results.count("RESOURCE_EXHAUSTED"))
        await asyncio.to_thread(server.wait_queued, MODEL, 0)
        assert gauges(server.server.http_port, MODEL) == {
            "salvo_queue_depth": 0.0,
            "salvo_inflight": 0.0,
        }
        await serves_normally(stub)
