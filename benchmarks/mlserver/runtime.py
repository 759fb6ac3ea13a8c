"""An MLServer runtime for TorchScript models, so MLServer serves the very `model.pt` Salvo does.

MLServer ships no PyTorch runtime; this is the custom runtime its documentation describes: an
`MLModel` subclass with `load` and `predict`. Each model's `model-settings.json` points at it
(`"implementation": "runtime.TorchScriptModel"`) and at the file (`parameters.uri`);
`parameters.extra.torch_threads` sets torch's intra-op threads in the process that runs the
model (0 keeps torch's default), the same knob as `salvo serve --torch-threads`;
`parameters.extra.freeze` freezes the module and optimizes it for inference at load, as
Salvo's `optimization.freeze` does, so that both serve the same frozen model.

Only the first input is used and one output is returned, which is what `mlp` and `resnet`
take and give. Runs inside .venv-mlserver (benchmarks/setup_mlserver.sh), never in .venv.
"""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class TorchScriptModel(MLModel):
    """A TorchScript module run under `torch.inference_mode` on the CPU."""

    async def load(self) -> bool:
        extra = (self.settings.parameters and self.settings.parameters.extra) or {}
        threads = int(extra.get("torch_threads", 0))
        if threads:
            torch.set_num_threads(threads)
        self._module = torch.jit.load(await get_model_uri(self.settings), map_location="cpu")
        self._module.eval()
        if extra.get("freeze"):
            self._module = torch.jit.optimize_for_inference(torch.jit.freeze(self._module))
        self._output = self.settings.outputs[0].name if self.settings.outputs else "output"
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # With adaptive batching on, `payload` is the requests of one batch stacked on dim 0,
        # and MLServer splits the response back into one per request.
        array = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        with torch.inference_mode():
            result = self._module(torch.from_numpy(array))
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output, result.numpy())],
        )
