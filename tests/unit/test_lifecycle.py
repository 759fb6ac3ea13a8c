"""The shutdown gate: handlers that cost nothing until it closes, then refuse; running calls
found by grpc.aio's task names. Real processes are signalled in tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from salvo.frontends.grpc.gate import Gate

SERVICE = "inference.GRPCInferenceService"


async def _unary(request, context):
    return request


async def _stream(requests, context):
    async for request in requests:
        yield request


def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    return {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(_unary, bytes, bytes),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_stream, bytes, bytes),
    }


class _Context:
    """Records an abort as grpc.aio's context would end the call."""

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_wrapped_handlers_serve_unchanged_until_the_gate_closes() -> None:
    gate = Gate(SERVICE)
    handlers = gate.wrap(_handlers())
    unary, stream = handlers["ModelInfer"], handlers["ModelStreamInfer"]
    # No wrapper in the way: grpc.aio calls the servicer's own functions.
    assert unary.unary_unary is _unary and unary.request_deserializer is bytes
    assert stream.stream_stream is _stream and stream.request_streaming
    copy = unary._replace(response_serializer=str)  # type: ignore[attr-defined]
    assert copy.unary_unary is _unary and copy.response_serializer is str

    gate.close("the server is shutting down")
    for handler in (unary, stream, copy):
        behaviours = [handler.unary_unary, handler.stream_stream]
        assert [b for b in behaviours if b is not None] == [gate._refuse]
    # Serialization is untouched: the request is still read, then refused.
    assert copy.response_serializer is str and unary.request_deserializer is bytes
    # A copy made after closing (an interceptor wrapping late) refuses as well.
    late = stream._replace(response_serializer=str)  # type: ignore[attr-defined]
    assert late.stream_stream == gate._refuse


async def test_a_closed_gate_answers_unavailable_naming_the_reason() -> None:
    gate = Gate(SERVICE)
    handler = gate.wrap(_handlers())["ModelInfer"]
    gate.close("the server is shutting down")
    context = _Context()
    with pytest.raises(RuntimeError, match="aborted"):
        await handler.unary_unary(b"request", context)
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


async def test_running_calls_are_found_by_their_task_names() -> None:
    gate = Gate(SERVICE)
    gate.wrap(_handlers())
    hold = asyncio.Event()
    names = [
        f"HandleExceptions[/{SERVICE}/ModelInfer]",
        f"HandleExceptions[/{SERVICE}/ModelStreamInfer]",
        "HandleExceptions[/grpc.health.v1.Health/Watch]",
        "some other task",
    ]
    tasks = [asyncio.create_task(hold.wait(), name=name) for name in names]
    unary, streams = gate.calls()
    assert unary == {tasks[0]} and streams == {tasks[1]}
    hold.set()
    await asyncio.gather(*tasks)
    assert gate.calls() == (set(), set())
