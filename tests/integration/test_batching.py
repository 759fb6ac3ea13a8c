"""The dynamic batcher, made deterministic by a model whose forward waits for the test.

A real Salvo runs in-process (real sockets, tritonclient as the client); only the model is
Python, so the test can hold a forward pass and see exactly what queued behind it.
"""

from __future__ import annotations

import queue
from unittest.mock import ANY

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from tests.gated import POISON, GatedLoader, serving


def config(max_batch_size=8, batching="{max_queue_delay_us: 100}", dims="[-1]"):
    return (
        f"max_batch_size: {max_batch_size}\n"
        f"inputs: [{{name: x, datatype: FP32, dims: {dims}}}]\n"
        f"outputs: [{{name: y, datatype: FP32, dims: {dims}}}]\n"
        f"dynamic_batching: {batching}\n"
    )


MODELS = {
    "batch": config(),
    "bounded": config(batching="{max_queue_size: 4}"),
    "cancel": config(),
    "timeout": config(),
    "faulty": config(),
    "shapes": config(),
    "patient": config(batching="{max_queue_delay_us: 60000000}"),
    "priority": config(
        max_batch_size=1, batching="{priority_levels: 2, default_priority_level: 2}"
    ),
    # Holds that end only when their rows come (a minute of quiet or the cap).
    "hold_bounded": config(batching="{max_queue_delay_us: 60000000}"),
    "hold_until_quiet": config(
        batching="{max_queue_delay_us: 60000000, hold_for_returns: until_quiet}"
    ),
}


@pytest.fixture(scope="module")
def loader():
    return GatedLoader()


@pytest.fixture(scope="module")
def server(tmp_path_factory, loader):
    with serving(tmp_path_factory.mktemp("gated-repo"), loader, MODELS) as server:
        yield server


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(server.grpc_target) as c:
        yield c


class Sender:
    """Fires requests without waiting; answers arrive on `results` as (id, output, error)."""

    def __init__(self, client: tc.InferenceServerClient, model: str):
        self.client = client
        self.model = model
        self.results: queue.Queue = queue.Queue()

    def send(self, row_id: float, rows: int = 1, width: int = 1, **kwargs):
        x = tc.InferInput("x", [rows, width], "FP32")
        x.set_data_from_numpy(np.full((rows, width), row_id, np.float32))

        def done(result, error, row_id=row_id):
            self.results.put((row_id, None if error else result.as_numpy("y"), error))

        return self.client.async_infer(self.model, [x], done, request_id=str(row_id), **kwargs)

    def send_in_order(self, server, calls, already_queued: int = 0) -> None:
        """Send each (row_id, kwargs) once the one before it is queued: arrival order is the
        order sent (concurrent calls from the client race one another)."""
        for n, (row_id, kwargs) in enumerate(calls, start=already_queued + 1):
            self.send(row_id, **kwargs)
            server.wait_queued(self.model, n)

    def collect(self, count: int) -> dict[float, tuple]:
        answers = [self.results.get(timeout=30) for _ in range(count)]
        return {row_id: (out, err) for row_id, out, err in answers}


def stats(client, model):
    s = client.get_inference_statistics(model).model_stats[0]
    return s, {b.batch_size: b.compute_infer.count for b in s.batch_stats}


def test_concurrent_requests_form_the_predicted_batches(server, client, loader):
    model = loader.modules["batch"]
    model.hold()
    sender = Sender(client, "batch")
    sender.send(0)  # an idle server runs it at once; it holds the only instance
    model.wait_batches(1)
    # One at a time, so that arrival order is the order sent (the client's calls race).
    for queued, row_id in enumerate((1, 2, 3, 4, 5), start=1):
        sender.send(row_id)
        server.wait_queued("batch", queued)
    sender.send(6, rows=3)  # rows, not requests: 5 + 3 = 8 = max_batch_size
    server.wait_queued("batch", 6)
    sender.send(7)  # the ninth row waits for the next batch
    server.wait_queued("batch", 7)
    model.release(3)
    answers = sender.collect(8)
    assert all(err is None for _, err in answers.values()), answers
    for row_id, (out, _) in answers.items():
        np.testing.assert_array_equal(out, np.full_like(out, 2 * row_id))
    assert answers[6][0].shape == (3, 1)
    assert model.batches == [[0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0], [7.0]]
    s, batch_counts = stats(client, "batch")
    assert batch_counts == {1: 2, 8: 1}
    assert s.inference_count == 10 and s.execution_count == 3
    assert s.inference_stats.success.count == 8


def test_full_queue_rejects_exactly_the_overflow_with_pushback(server, client, loader):
    model = loader.modules["bounded"]
    model.hold()
    sender = Sender(client, "bounded")
    sender.send(0)
    model.wait_batches(1)
    sender.send_in_order(server, [(row_id, {}) for row_id in (1, 2, 3, 4)])  # max_queue_size 4
    for row_id in (5, 6, 7):  # k = 3 more
        sender.send(row_id)
    # The overflow is answered at once, while the model is still held.
    rejected = sender.collect(3)
    assert set(rejected) == {5, 6, 7}
    for _, err in rejected.values():
        assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue full" in err.message()
    # The push-back travels in trailing metadata (raw stub: tritonclient hides trailers).
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = pb.ModelInferRequest(model_name="bounded")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"].isdigit()
    model.open()
    served = sender.collect(5)
    assert set(served) == {0, 1, 2, 3, 4}
    assert all(err is None for _, err in served.values())
    assert model.ran == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_cancelled_queued_request_never_runs(server, client, loader):
    model = loader.modules["cancel"]
    model.hold()
    sender = Sender(client, "cancel")
    sender.send(0)
    model.wait_batches(1)
    call = sender.send(1)
    server.wait_queued("cancel", 1)
    call.cancel()
    server.wait_queued("cancel", 0)  # the server saw the cancel and dropped it
    sender.send(2)
    server.wait_queued("cancel", 1)
    model.open()
    answers = sender.collect(3)
    assert answers[1][1].status() == "StatusCode.CANCELLED"
    assert answers[0][1] is None and answers[2][1] is None
    assert model.ran == {0.0, 2.0}


def test_request_past_its_timeout_is_answered_and_never_runs(server, client, loader):
    model = loader.modules["timeout"]
    model.hold()
    sender = Sender(client, "timeout")
    sender.send(0)
    model.wait_batches(1)
    sender.send(1, timeout=1000)  # the v2 `timeout` parameter: 1 ms in the queue at most
    (row_id, _, err) = sender.results.get(timeout=30)  # answered while the model is held
    assert row_id == 1 and err.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out" in err.message()
    sender.send(2, client_timeout=0.2)  # a gRPC deadline does the same
    (row_id, _, err) = sender.results.get(timeout=30)
    assert row_id == 2 and err.status() == "StatusCode.DEADLINE_EXCEEDED"
    server.wait_queued("timeout", 0)
    sender.send(3)
    server.wait_queued("timeout", 1)
    model.open()
    answers = sender.collect(2)
    assert answers[0][1] is None and answers[3][1] is None
    assert model.ran == {0.0, 3.0}


def test_a_raising_batch_fails_only_its_own_requests(server, client, loader):
    model = loader.modules["faulty"]
    sender = Sender(client, "faulty")
    sender.send(POISON)
    ((_, (_, err)),) = sender.collect(1).items()
    assert err.status() == "StatusCode.INTERNAL"
    assert "model 'faulty' raised RuntimeError: poisoned batch" in err.message()
    assert "Traceback" not in err.message()

    model.hold()
    sender.send(0)
    model.wait_batches(2)
    sender.send_in_order(server, [(POISON, {}), (2, {})])
    model.release()  # batch [0] finishes; [POISON, 2] starts and waits
    model.wait_batches(3)
    sender.send(3)
    server.wait_queued("faulty", 1)
    model.open()
    answers = sender.collect(4)
    assert answers[0][1] is None and answers[3][1] is None
    assert answers[POISON][1].status() == "StatusCode.INTERNAL"
    assert answers[2][1].status() == "StatusCode.INTERNAL"
    assert model.batches[-3:] == [[0.0], [POISON, 2.0], [3.0]]
    s, _ = stats(client, "faulty")
    assert s.inference_stats.fail.count == 3 and s.inference_stats.success.count == 2


def test_mixed_shapes_never_share_a_batch(server, client, loader):
    model = loader.modules["shapes"]
    model.hold()
    sender = Sender(client, "shapes")
    sender.send(0, width=2)
    model.wait_batches(1)
    sender.send_in_order(
        server, [(row_id, {"width": width}) for row_id, width in ((1, 2), (2, 3), (3, 2), (4, 3))]
    )
    model.open()
    answers = sender.collect(5)
    assert all(err is None for _, err in answers.values())
    assert answers[2][0].shape == (1, 3)
    assert model.shapes == [(1, 2), (2, 2), (2, 3)]
    assert model.batches == [[0.0], [1.0, 3.0], [2.0, 4.0]]


def test_a_lone_request_on_an_idle_server_does_not_wait_for_the_queue_delay(client):
    # max_queue_delay_us is 60 s; the call's own deadline is 10 s.
    x = tc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1), np.float32))
    result = client.infer("patient", [x], client_timeout=10)
    assert result.as_numpy("y").tolist() == [[2.0]]


def test_higher_priority_runs_first(server, client, loader):
    model = loader.modules["priority"]
    model.hold()
    sender = Sender(client, "priority")
    sender.send(0)
    model.wait_batches(1)
    # 1 has the default level 2; level 1 is the highest.
    sender.send_in_order(server, [(1, {}), (2, {"priority": 1}), (3, {"priority": 2})])
    model.open()
    answers = sender.collect(4)
    assert all(err is None for _, err in answers.values())
    assert model.batches == [[0.0], [2.0], [1.0], [3.0]]


@pytest.mark.parametrize(
    ("mode", "batches"),
    [
        # Holds for the one row it answered; then for the two it answered next.
        ("bounded", [[0.0], [1.0, 2.0], [3.0, 4.0, 5.0]]),
        # And one row more, a probe: it finds row 3, the caller the count missed.
        ("until_quiet", [[0.0], [1.0, 2.0, 3.0]]),
    ],
)
def test_a_free_instance_holds_for_the_rows_it_expects_back(server, client, loader, mode, batches):
    name = f"hold_{mode}"
    model = loader.modules[name]
    model.hold()
    sender = Sender(client, name)
    sender.send(0)  # an idle server runs it at once, expecting nothing
    model.wait_batches(1)
    sender.send(1)  # arrives while nothing is expected back
    server.wait_queued(name, 1)
    model.release(1)
    assert sender.collect(1) == {0.0: (ANY, None)}
    # Row 0 is answered, so its caller is expected back: row 1 waits for it. (A queue that
    # a hold ends is gone at once, so a hold's end is awaited as the batch, not the queue.)
    sender.send(2)
    if mode == "bounded":  # row 2 is the row expected: [1, 2] goes
        model.wait_batches(2)
    else:  # the probe still expects one row more: [1, 2] waits
        server.wait_queued(name, 2)
    sender.send(3)
    if mode == "bounded":  # [1, 2] went without it: row 3 must be queued before they finish
        server.wait_queued(name, 1)
    else:  # row 3 is the probed row: [1, 2, 3] goes
        model.wait_batches(2)
    model.release(1)
    answers = sender.collect(len(batches[1]))
    if mode == "bounded":  # row 3 is held for the two callers just answered
        sender.send_in_order(server, [(4, {})], already_queued=1)
        sender.send(5)  # the last row expected: [3, 4, 5] goes
        model.wait_batches(3)
        model.release(1)
        answers |= sender.collect(3)
    assert all(err is None for _, err in answers.values()), answers
    assert model.batches == batches
