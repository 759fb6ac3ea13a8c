"""ModelStreamInferResponse bytes built around an already serialized response."""

from __future__ import annotations

import pytest

from salvo.frontends.grpc.wire import stream_response
from salvo_client.proto import grpc_service_pb2 as pb


@pytest.mark.parametrize("payload_bytes", [0, 1, 127, 128, 16_383, 16_384, 3_000_000])
def test_wrapped_bytes_parse_as_the_message_protobuf_would_build(payload_bytes):
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="42")
    if payload_bytes:
        response.raw_output_contents.append(b"\x01" * payload_bytes)
    serialized = response.SerializeToString()
    wrapped = stream_response(serialized)
    assert wrapped == pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
    assert pb.ModelStreamInferResponse.FromString(wrapped).infer_response == response
