"""A bare grpc.aio v2 server that answers every inference with one precomputed response.

    .venv/bin/python benchmarks/bare_server.py --model-repository DIR --model mlp

No queue, no model call, no validation: it parses the request, copies its id into a response
computed once at start-up, and sends it. That is as fast as a Python gRPC server can answer,
so benchmarks/compare.py measures it as the ceiling Salvo's overhead is judged against, over
unary ModelInfer and over ModelStreamInfer (`perf_analyzer --streaming`). ModelMetadata and
ModelConfig describe the model as Salvo would, because perf_analyzer reads both before it
starts. The response is the model's true output for an all-zero batch-1 input (what
`perf_analyzer --input-data zero` sends); every other input gets the same wrong answer.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import torch

from salvo.domain.config import ModelConfig, load_config
from salvo.frontends.grpc.codec import config_to_proto
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

LISTENING = "bare server listening grpc={host}:{port}"


def precomputed_response(model_dir: Path, config: ModelConfig) -> pb.ModelInferResponse:
    """The response to an all-zero batch-1 request, from one real forward pass."""
    module = torch.jit.load(str(model_dir / "1" / "model.pt"))
    inputs = [torch.zeros((1, *spec.dims)) for spec in config.inputs]
    with torch.inference_mode():
        outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    response = pb.ModelInferResponse(model_name=config.name, model_version="1")
    for spec, tensor in zip(config.outputs, outputs, strict=True):
        array = tensor.numpy()
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Metadata for one model, and the same answer to every inference request."""

    def __init__(self, config: ModelConfig, response: pb.ModelInferResponse) -> None:
        self.config = config
        self.response = response
        self.metadata = pb.ModelMetadataResponse(
            name=config.name, versions=["1"], platform="pytorch_libtorch"
        )
        batch = [-1] if config.max_batch_size > 0 else []
        for specs, tensors in (
            (config.inputs, self.metadata.inputs),
            (config.outputs, self.metadata.outputs),
        ):
            for spec in specs:
                tensors.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])

    def answer(self, request_id: str) -> pb.ModelInferResponse:
        # perf_analyzer matches responses to requests by id, so the id must come back.
        response = pb.ModelInferResponse()
        response.CopyFrom(self.response)
        response.id = request_id
        return response

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bare")

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.config.name)

    async def ModelMetadata(self, request, context):
        return self.metadata

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=config_to_proto(self.config))

    async def ModelInfer(self, request, context):
        return self.answer(request.id)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self.answer(request.id))


async def serve(model_dir: Path, host: str, port: int) -> None:
    config = load_config(model_dir)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        BareServicer(config, precomputed_response(model_dir, config)), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(LISTENING.format(host=host, port=bound), flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    # SIGTERM's default action ends the process; there is nothing to drain.
    asyncio.run(serve(args.model_repository / args.model, args.host, args.grpc_port))


if __name__ == "__main__":
    main()
