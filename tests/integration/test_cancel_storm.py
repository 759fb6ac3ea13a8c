"""Cancellation storm: half of many concurrent requests cancelled, none run after its cancel.

A real Salvo runs in-process with a gated model (tests/gated.py) that records every row it
runs and, while held, runs one batch per release. Clients are grpc.aio calls over a real
socket. Requests are cancelled by the client (call.cancel()) and by deadlines, at moments
drawn by a seeded PRNG: while every request waits in the queue, in between batches, while
their own batch runs, and after they were answered. A request whose cancel or deadline
the server saw while it was queued must never run; afterwards the queue and in-flight
gauges are back to 0, the server loop holds no task it did not hold before, and the model
serves as before. A second storm runs with the model free, cancels interleaved with
completions, to shake out races the gated one cannot reach.
"""

from __future__ import annotations

import asyncio
import collections
import random

import grpc
import numpy as np
import pytest

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from tests.gated import GatedLoader, write_model
from tests.metrics import gauges
from tests.servers import InProcessServer

MODEL = "storm"
CONFIG = (
    "max_batch_size: 8\n"
    "inputs: [{name: x, datatype: FP32, dims: [1]}]\n"
    "outputs: [{name: y, datatype: FP32, dims: [1]}]\n"
    "dynamic_batching: {max_queue_delay_us: 100}\n"
)


@pytest.fixture(scope="module")
def loader():
    return GatedLoader()


@pytest.fixture(scope="module")
def server(tmp_path_factory, loader):
    root = tmp_path_factory.mktemp("storm-repo")
    write_model(root, MODEL, CONFIG)
    with InProcessServer(root, loader) as server:
        yield server


def request(row_id: float, rows: int = 1) -> pb.ModelInferRequest:
    out = pb.ModelInferRequest(model_name=MODEL, id=str(row_id))
    out.inputs.add(name="x", datatype="FP32", shape=[rows, 1])
    out.raw_input_contents.append(np.full((rows, 1), row_id, np.float32).tobytes())
    return out


def output(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


async def on_server(server: InProcessServer, coro):
    """Await `coro` on the server's loop without blocking this (the client's) loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, server.loop))


async def _tasks() -> collections.Counter[str]:
    """The server loop's tasks by coroutine. grpc.aio keeps one task waiting for the next
    call, a new one after each call, so tasks are compared by what they run."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    return collections.Counter(t.get_coro().__qualname__ for t in others)


async def until_on_server(server: InProcessServer, predicate, timeout_s: float = 30) -> None:
    """Until `predicate()` holds, checked on the server's loop each time the queue changes."""
    scheduler = server.scheduler(MODEL)
    await on_server(server, asyncio.wait_for(scheduler.wait_until(predicate), timeout_s))


async def queued_ids(server: InProcessServer) -> set[str]:
    scheduler = server.scheduler(MODEL)

    async def ids() -> set[str]:
        return {e.request.id for e in scheduler.queue}

    return await on_server(server, ids())


async def settle(server: InProcessServer, baseline: collections.Counter[str]) -> None:
    """Queue and in-flight at 0 (scheduler and /metrics), and no task left over."""
    scheduler = server.scheduler(MODEL)
    await until_on_server(server, lambda: not scheduler.queue and not scheduler.in_flight)
    assert gauges(server.server.http_port, MODEL) == {
        "salvo_queue_depth": 0.0,
        "salvo_inflight": 0.0,
    }

    async def leftovers() -> collections.Counter[str]:
        # An RPC's task ends a moment after its status went out: wait for it, a bounded
        # number of loop turns, and name whatever outlives them.
        for _ in range(10_000):
            extra = await _tasks() - baseline
            if not extra:
                break
            await asyncio.sleep(0)
        return extra

    assert not await on_server(server, leftovers())


async def outcome(call) -> tuple[str, pb.ModelInferResponse | None]:
    try:
        return "OK", await call
    except asyncio.CancelledError:
        return "CANCELLED", None
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, None


async def serves_normally(stub) -> None:
    response = await stub.ModelInfer(request(21.0, 2), timeout=30)
    assert output(response).tolist() == [42.0, 42.0]


async def test_cancelled_or_expired_in_the_queue_never_runs(server, loader):
    rng = random.Random(20261126)
    model = loader.modules[MODEL]
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await serves_normally(stub)  # lazily created server state exists before the baseline
        baseline = await on_server(server, _tasks())

        model.hold()
        ran_before = len(model.batches)
        first = stub.ModelInfer(request(1000.0), timeout=60)
        await asyncio.to_thread(model.wait_batches, ran_before + 1)  # holds the instance

        ids = list(range(1, 97))
        rows = {i: rng.randint(1, 3) for i in ids}
        doomed = rng.sample(ids, len(ids) // 2)  # half the requests get cancelled
        by_deadline = set(doomed[:12])
        while_queued = set(doomed[12:30])
        during_drain = doomed[30:]
        calls = {
            i: stub.ModelInfer(request(i, rows[i]), timeout=60) for i in ids if i not in by_deadline
        }
        await until_on_server(server, lambda: len(server.scheduler(MODEL).queue) == len(calls))
        # Deadlines pass while they wait behind the held instance.
        expiring = {
            i: stub.ModelInfer(request(i, rows[i]), timeout=rng.uniform(0.05, 0.3))
            for i in by_deadline
        }
        for i, call in expiring.items():
            assert (await outcome(call))[0] == "DEADLINE_EXCEEDED", i
        await until_on_server(server, lambda: len(server.scheduler(MODEL).queue) == len(calls))

        for i in while_queued:
            calls[i].cancel()
        gone = {str(i) for i in while_queued}
        await until_on_server(
            server, lambda: not gone & {e.request.id for e in server.scheduler(MODEL).queue}
        )

        # The drain: one batch per release, cancels at random points in between.
        cancelled_queued = set(by_deadline | while_queued)
        cancelled_late: set[int] = set()  # its batch had started, or it was answered
        pending_cancels = list(during_drain)
        while await queued_ids(server) or pending_cancels:
            if pending_cancels and rng.random() < 0.5:
                i = pending_cancels.pop()
                queued = await queued_ids(server)
                calls[i].cancel()
                if str(i) in queued:
                    cancelled_queued.add(i)
                    await until_on_server(
                        server,
                        lambda i=i: (
                            str(i) not in {e.request.id for e in server.scheduler(MODEL).queue}
                        ),
                    )
                else:
                    cancelled_late.add(i)
                continue
            started = len(model.batches)
            more = bool(await queued_ids(server))
            model.release()
            if more:  # the next batch starts as soon as this one ends
                await asyncio.to_thread(model.wait_batches, started + 1)
        model.open()

        results = {i: await outcome(call) for i, call in calls.items()}
        assert (await outcome(first))[0] == "OK"
        ran = {int(v) for batch in model.batches[ran_before:] for v in batch if v != 1000.0}
        executed_after_cancel = cancelled_queued & ran
        assert executed_after_cancel == set()
        assert len(cancelled_queued) + len(cancelled_late) == len(doomed)
        for i, (status, response) in results.items():
            if i in cancelled_queued:
                assert status == "CANCELLED", (i, status)
                continue
            # A late cancel may beat the answer to the client, never the forward pass.
            assert status == "OK" or (i in cancelled_late and status == "CANCELLED"), (i, status)
            assert i in ran
            if status == "CANCELLED":
                continue
            assert output(response).tolist() == [2.0 * i] * rows[i]
        await settle(server, baseline)
        await serves_normally(stub)


async def test_a_free_running_storm_leaves_nothing_behind(server, loader):
    rng = random.Random(7)
    loader.modules[MODEL].open()
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await serves_normally(stub)
        baseline = await on_server(server, _tasks())
        calls = {}
        for i in range(1, 201):
            timeout = rng.uniform(0.001, 0.05) if rng.random() < 0.15 else 60
            calls[i] = stub.ModelInfer(request(i, rng.randint(1, 3)), timeout=timeout)
        doomed = set(rng.sample(sorted(calls), 70))
        # Cancels land between completions: wherever the server happens to be.
        tasks = [asyncio.ensure_future(outcome(call)) for call in calls.values()]
        for done in asyncio.as_completed(tasks):
            _, response = await done
            if doomed:
                calls[doomed.pop()].cancel()
            if response is not None:
                assert set(output(response).tolist()) == {2.0 * int(response.id)}
        results = [task.result()[0] for task in tasks]
        assert set(results) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, results
        assert results.count("CANCELLED") > 0 and results.count("OK") > 0
        await settle(server, baseline)
        await serves_normally(stub)
