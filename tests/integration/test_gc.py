"""The collector and a long-lived server: start-up's objects are frozen out of its full
passes, and thawed when a model is reloaded or unloaded so the old model can be freed."""

from __future__ import annotations

import gc

import tritonclient.grpc as tc

from tests.gated import GatedLoader, write_model
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [-1]}]
outputs: [{name: y, datatype: FP32, dims: [-1]}]
"""


def test_start_up_objects_are_frozen_until_a_model_is_swapped(tmp_path):
    gc.unfreeze()
    write_model(tmp_path, "m", CONFIG)
    with (
        InProcessServer(tmp_path, GatedLoader()) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
    ):
        assert client.is_server_ready()
        assert gc.get_freeze_count() > 0
        client.load_model("m")  # a reload: the old version must be collectable
        assert gc.get_freeze_count() == 0
        assert client.is_model_ready("m")
