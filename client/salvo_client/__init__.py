"""Salvo's Python client: the v2 inference protocol, typed, with numpy in and out.

It needs only grpcio, protobuf and numpy (no torch), so services install it light:

    from salvo_client import InferenceClient

    with InferenceClient("127.0.0.1:8001") as client:
        outputs = client.infer("mlp", {"input": x})

`AsyncInferenceClient` is the asyncio twin, with `pipelined()` for many concurrent calls
over one stream. Failures raise the typed exceptions of `salvo_client.errors`. The v2 stubs
are in `salvo_client.proto`, in a private descriptor pool.
"""

from salvo_client.aio import AsyncInferenceClient, AsyncInferStream
from salvo_client.client import InferenceClient, InferStream
from salvo_client.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SalvoClientError,
    Unauthenticated,
    Unavailable,
)
from salvo_client.messages import StreamResult
from salvo_client.pipeline import Pipeline
from salvo_client.retry import RetryPolicy
from salvo_client.tensors import datatype_of

__all__ = [
    "AsyncInferStream",
    "AsyncInferenceClient",
    "Cancelled",
    "DeadlineExceeded",
    "InferStream",
    "InferenceClient",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Pipeline",
    "ResourceExhausted",
    "RetryPolicy",
    "SalvoClientError",
    "StreamResult",
    "Unauthenticated",
    "Unavailable",
    "datatype_of",
]
