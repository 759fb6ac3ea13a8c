"""`optimization.compile`: a torch.export model run through torch.compile, served over gRPC,
answers as the model does uncompiled."""

from __future__ import annotations

import numpy as np
import torch
import tritonclient.grpc as tc

from tests.servers import InProcessServer

CONFIG = """max_batch_size: 16
inputs: [{name: x, datatype: FP32, dims: [12]}]
outputs: [{name: y, datatype: FP32, dims: [5]}]
device: cpu
dynamic_batching: {max_queue_delay_us: 500}
optimization: {compile: true}
"""


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x), dim=-1)


def test_compiled_model_answers_like_the_model(tmp_path):
    net = Net().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(net, (torch.zeros(2, 12),), dynamic_shapes=({0: batch},))
    (tmp_path / "net" / "1").mkdir(parents=True)
    torch.export.save(program, str(tmp_path / "net" / "1" / "model.pt2"))
    (tmp_path / "net" / "config.yaml").write_text(CONFIG)

    with (
        InProcessServer(tmp_path) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
    ):
        module = server.server.router.route("net").model.module
        assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
        for rows in (1, 3, 16, 7):  # compiled at load for 1 and 16; dynamic in between
            x = np.random.default_rng(rows).standard_normal((rows, 12)).astype(np.float32)
            tensor = tc.InferInput("x", [rows, 12], "FP32")
            tensor.set_data_from_numpy(x)
            got = client.infer("net", [tensor]).as_numpy("y")
            with torch.inference_mode():
                want = net(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
