"""`mlserver start FOLDER` plus the one RPC perf_analyzer needs and MLServer lacks: ModelConfig.

    .venv-mlserver/bin/python benchmarks/mlserver/launch.py FOLDER

perf_analyzer reads a model's Triton ModelConfig before it sends anything, and MLServer has
no ModelConfig RPC, so perf_analyzer refuses it. This adds one generic handler for
`/inference.GRPCInferenceService/ModelConfig` to MLServer's gRPC server, answering from each
model's model-settings.json; ModelInfer and everything else stay MLServer's own, untouched.

The messages come from Salvo's stubs, which live in a private descriptor pool, so they do not
collide with MLServer's own protobuf package `inference` in this process.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client"))

from mlserver.cli.main import main  # noqa: E402
from mlserver.cli.serve import load_settings  # noqa: E402
from mlserver.grpc.server import GRPCServer  # noqa: E402
from mlserver.settings import ModelSettings  # noqa: E402

from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402
from salvo_client.proto import model_config_pb2 as mc  # noqa: E402


def triton_config(model: ModelSettings) -> mc.ModelConfig:
    """The Triton ModelConfig that describes `model` as MLServer serves it.

    With adaptive batching on, the first dimension of each tensor is the batch, which Triton
    leaves out of `dims` and states as `max_batch_size`.
    """
    batched = model.max_batch_size > 0
    config = mc.ModelConfig(
        name=model.name, platform="pytorch_libtorch", max_batch_size=model.max_batch_size
    )
    for tensors, specs in ((config.input, model.inputs), (config.output, model.outputs)):
        for spec in specs:
            tensors.add(
                name=spec.name,
                data_type=mc.DataType.Value(f"TYPE_{spec.datatype}"),
                dims=spec.shape[1:] if batched else spec.shape,
            )
    return config


def model_config_handler(models: list[ModelSettings]) -> grpc.GenericRpcHandler:
    configs = {m.name: pb.ModelConfigResponse(config=triton_config(m)) for m in models}

    async def model_config(request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        if request.name not in configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return configs[request.name]

    method = grpc.unary_unary_rpc_method_handler(
        model_config,
        request_deserializer=pb.ModelConfigRequest.FromString,
        response_serializer=pb.ModelConfigResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelConfig": method}
    )


def add_model_config(folder: str) -> None:
    """Make every gRPC server MLServer creates also answer ModelConfig for `folder`'s models."""
    _, models = asyncio.run(load_settings(folder))
    handler = model_config_handler(models)
    create = GRPCServer._create_server

    def create_server(self: GRPCServer):
        server = create(self)
        # MLServer's own service handler answers None for a method it does not know, so
        # gRPC goes on to this one.
        server.add_generic_rpc_handlers((handler,))
        return server

    GRPCServer._create_server = create_server  # type: ignore[method-assign]


if __name__ == "__main__":
    add_model_config(sys.argv[1])
    sys.argv = ["mlserver", "start", sys.argv[1]]
    main()
