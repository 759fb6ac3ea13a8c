"""A stream's requests are answered from their waiters' callbacks, without a task each:
when the stream goes away, what it left queued is withdrawn and never runs."""

from __future__ import annotations

import queue

import numpy as np
import tritonclient.grpc as tc

from tests.gated import GatedLoader, write_model
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [-1]}]
outputs: [{name: y, datatype: FP32, dims: [-1]}]
dynamic_batching: {max_queue_delay_us: 100}
"""


def x_input(value: float) -> tc.InferInput:
    x = tc.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.full((1, 3), value, np.float32))
    return x


def test_a_stream_that_goes_away_leaves_nothing_queued_to_run(tmp_path):
    write_model(tmp_path, "gated", CONFIG)
    loader = GatedLoader()
    with InProcessServer(tmp_path, loader) as server:
        model = loader.modules["gated"]
        model.hold()
        answers: queue.Queue = queue.Queue()
        with tc.InferenceServerClient(server.grpc_target) as client:
            client.start_stream(lambda result, error: answers.put((result, error)))
            client.async_stream_infer("gated", [x_input(1.0)], request_id="running")
            model.wait_batches(1)  # running and held: the one instance is busy
            client.async_stream_infer("gated", [x_input(2.0)], request_id="queued")
            server.wait_queued("gated", 1)
            client.stop_stream(cancel_requests=True)
            server.wait_queued("gated", 0)  # withdrawn when the stream went away
            model.open()
            # The server still answers, and the queued request never ran.
            again = client.infer("gated", [x_input(3.0)], request_id="after")
        np.testing.assert_array_equal(again.as_numpy("y"), np.full((1, 3), 6.0, np.float32))
        assert model.ran == {1.0, 3.0}  # the held one and "after"; never the queued 2.0
        scheduler = server.scheduler("gated")
        server.call(scheduler.wait_until(lambda: not scheduler.queue and not scheduler.in_flight))
