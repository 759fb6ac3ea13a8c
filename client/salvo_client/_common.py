"""What the sync and asyncio clients share: the tensor codec, request and result building,
and the channel set-up (target, credentials, options, service config, metadata).

Kept free of any server code: the server has its own codec (`salvo.codec`), and this
package must install and import with grpcio, protobuf and numpy alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import secrets
import socket
import struct
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from salvo_client.errors import (
    STREAM_STATUS_PARAMETER,
    InternalError,
    SalvoClientError,
    from_stream_error,
)
from salvo_client.proto import grpc_service_pb2 as pb

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_URL",
    "ChannelSetup",
    "RetryPolicy",
    "StreamResult",
    "build_request",
    "datatype_of",
    "decode_outputs",
    "decode_tensor",
    "encode_tensor",
    "result_of",
]

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "inference.GRPCInferenceService"
MIN_BACKOFF_S = 0.01
"""The shortest retry backoff allowed (see RetryPolicy)."""
Param = bool | int | float | str
"""A request parameter's value: InferParameter's bool, int64, double or string."""

# --------------------------------------------------------------------------- tensor codec

_WIRE_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # bit patterns: numpy has no bfloat16
    "BYTES": np.dtype(object),
}
"""How each v2 datatype travels (little-endian) and how outputs come back in numpy."""
WIRE_DTYPES = _WIRE_DTYPES

_BY_KIND: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}

_TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_U32 = struct.Struct("<I")
_U32_MAX = 2**32 - 1


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype; TypeError for dtypes the protocol cannot carry.

    Object, bytes (`S`) and str (`U`) arrays are BYTES; ml_dtypes' bfloat16 is BF16.
    """
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    datatype = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"numpy dtype {dtype} has no v2 datatype")
    return datatype


def _element_bytes(what: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise TypeError(f"{what}: BYTES elements must be bytes or str, got {type(item).__name__}")


def encode_tensor(name: str, array: np.ndarray) -> tuple[str, bytes]:
    """`array` as (v2 datatype, raw bytes): little-endian and row-major whatever its layout;
    BYTES elements each prefixed with their length as 4 little-endian bytes."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"input '{name}': expected a numpy array, got {type(array).__name__}")
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.flat:  # row-major, as the protocol orders elements
            data = _element_bytes(f"input '{name}'", item)
            if len(data) > _U32_MAX:
                raise ValueError(f"input '{name}': a BYTES element of {len(data)} bytes is > 4 GiB")
            parts.append(_U32.pack(len(data)))
            parts.append(data)
        return datatype, b"".join(parts)
    if datatype == "BF16":
        array = array.view(np.uint16)
    wire = _WIRE_DTYPES[datatype]
    if array.dtype != wire:
        array = array.astype(wire)  # only the byte order differs
    return datatype, array.tobytes(order="C")


def _split_bytes(name: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    end = len(raw)
    # Every element needs its 4-byte length: check before allocating `count` slots.
    ok = count * 4 <= end
    out = np.empty(count if ok else 0, dtype=object)
    offset = 0
    for i in range(len(out)):
        if offset + 4 > end:
            ok = False
            break
        (size,) = _U32.unpack_from(raw, offset)
        offset += 4
        if offset + size > end:
            ok = False
            break
        out[i] = raw[offset : offset + size]
        offset += size
    if not ok or offset != end:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': malformed BYTES contents for shape {list(shape)} ({end} bytes)",
        )
    return out.reshape(shape)


def decode_tensor(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Decode one raw tensor. Fixed-width datatypes become a read-only numpy view of `raw`
    (no copy); BYTES becomes an object array of bytes; BF16 comes back as uint16 bits.

    A malformed answer raises InternalError: it is the server's bug, not the caller's.
    """
    wire = _WIRE_DTYPES.get(datatype)
    dims = tuple(int(d) for d in shape)
    if wire is None or any(d < 0 for d in dims):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': cannot decode datatype {datatype!r} of shape {list(dims)}",
        )
    if datatype == "BYTES":
        return _split_bytes(name, dims, raw)
    needed = int(np.prod(dims, dtype=np.int64)) * wire.itemsize
    if len(raw) != needed:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': {len(raw)} raw bytes, but shape {list(dims)} of {datatype} "
            f"needs {needed}",
        )
    return np.frombuffer(raw, dtype=wire).reshape(dims)


def _decode_typed(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """Decode typed `contents`, which other v2 servers may answer with instead of raw."""
    field_name = _TYPED_FIELDS.get(datatype)
    if field_name is None:
        raise InternalError(
            grpc.StatusCode.INTERNAL, f"output '{name}': {datatype} has no typed contents"
        )
    values = list(getattr(contents, field_name))
    dims = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = values
    else:
        out = np.array(values, dtype=_WIRE_DTYPES[datatype])
    if out.size != int(np.prod(dims, dtype=np.int64)):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': {out.size} values for shape {list(dims)}",
        )
    return out.reshape(dims)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of `response` by name, in the order the server sent them."""
    raw = response.raw_output_contents
    outputs = response.outputs
    if raw and len(raw) != len(outputs):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"response has {len(outputs)} outputs but {len(raw)} raw_output_contents",
        )
    result: dict[str, np.ndarray] = {}
    for i, out in enumerate(outputs):
        if raw:
            result[out.name] = decode_tensor(out.name, out.datatype, out.shape, raw[i])
        else:
            result[out.name] = _decode_typed(out.name, out.datatype, out.shape, out.contents)
    return result


# --------------------------------------------------------------------------- requests


def _set_param(target: pb.InferParameter, key: str, value: Param) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(
            f"parameter '{key}': expected bool, int, float or str, got {type(value).__name__}"
        )


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    version: str | int | None = None,
    priority: int | None = None,
    parameters: Mapping[str, Param] | None = None,
    request_id: str | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in `raw_input_contents`.

    `outputs` names the outputs wanted (None: all); `priority` becomes the `priority`
    parameter, which must then not also be in `parameters`.
    """
    request = pb.ModelInferRequest(
        model_name=model,
        model_version="" if version is None else str(version),
        id=request_id or "",
    )
    params = dict(parameters or {})
    if priority is not None:
        if "priority" in params:
            raise ValueError("priority given both as an argument and in parameters")
        params["priority"] = int(priority)
    for key, value in params.items():
        _set_param(request.parameters[key], key, value)
    for name, array in inputs.items():
        datatype, raw = encode_tensor(name, array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    for name in [outputs] if isinstance(outputs, str) else outputs or ():
        request.outputs.add(name=name)
    return request


def _param_value(p: pb.InferParameter) -> object:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One answer from ModelStreamInfer: the outputs of the request sent with `request_id`,
    or the in-band `error` that request got (the stream itself goes on)."""

    request_id: str
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """Empty when `error` is set."""
    error: SalvoClientError | None = None

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error is None

    def unwrap(self) -> dict[str, np.ndarray]:
        """The outputs, or raise the request's error."""
        if self.error is not None:
            raise self.error
        return self.outputs


def result_of(response: pb.ModelStreamInferResponse) -> StreamResult:
    """The StreamResult of one ModelStreamInfer answer."""
    inner = response.infer_response
    if response.error_message:
        declared = inner.parameters.get(STREAM_STATUS_PARAMETER)
        error = from_stream_error(
            response.error_message,
            inner.id,
            None if declared is None else _param_value(declared),
        )
        return StreamResult(inner.id, inner.model_name, inner.model_version, {}, error)
    try:
        outputs = decode_outputs(inner)
    except SalvoClientError as exc:
        exc.request_id = inner.id
        return StreamResult(inner.id, inner.model_name, inner.model_version, {}, exc)
    return StreamResult(inner.id, inner.model_name, inner.model_version, outputs)


class RequestIds:
    """Unique request ids for one client: a random prefix and a counter.

    The prefix keeps ids of different clients apart in the server's logs; `next` is safe
    from several threads (itertools.count is atomic under the GIL).
    """

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new id, never returned before by this generator."""
        return f"{self.prefix}-{next(self._counter)}"


# --------------------------------------------------------------------------- channel


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC's own retries (service config `retryPolicy`), for calls that failed before the
    server started answering.

    Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried by default; INVALID_ARGUMENT is
    refused, since a malformed request fails the same way every time. gRPC honours the
    server's `grpc-retry-pushback-ms` on RESOURCE_EXHAUSTED natively: it waits that long
    instead of the backoff. Requests larger than the channel's retry buffer (set to the
    maximum message size) are sent once.
    """

    max_attempts: int = 3
    """Attempts in all, the first included (2 to 5; gRPC allows no more than 5)."""
    initial_backoff_s: float = 0.1
    """At least 10 ms."""
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2 to 5, got {self.max_attempts}")
        # gRPC (1.72 onwards, grpc/grpc#41036) can hang a call whose retry backoff is a
        # millisecond or so; 10 ms is well clear of it.
        if self.initial_backoff_s < MIN_BACKOFF_S:
            raise ValueError(f"initial_backoff_s must be at least {MIN_BACKOFF_S} s")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")
        names = {code.name for code in grpc.StatusCode}
        for code in self.retryable_status_codes:
            if code not in names or code == "OK":
                raise ValueError(f"unknown status code {code!r}")
            if code == "INVALID_ARGUMENT":
                raise ValueError("INVALID_ARGUMENT must never be retried")
        if not self.retryable_status_codes:
            raise ValueError("retryable_status_codes must not be empty")

    @classmethod
    def of(cls, retries: int | RetryPolicy | None) -> RetryPolicy | None:
        """`retries` as a policy: an int counts retries after the first attempt (0: none)."""
        if retries is None or isinstance(retries, RetryPolicy):
            return retries
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        return None if retries == 0 else cls(max_attempts=retries + 1)

    def to_service_config(self) -> dict[str, Any]:
        """The `retryPolicy` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:.9f}s",
            "maxBackoff": f"{self.max_backoff_s:.9f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }


_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r}: expected host:port")
    return host.strip("[]"), int(port)


def resolve_target(url: str | Sequence[str]) -> str:
    """One gRPC target for `url`.

    A string is used as it is ("host:port", "dns:///name:port", "ipv4:a:p,b:p"…). A list
    of "host:port" becomes a static `ipv4:`/`ipv6:` target listing every address, which the
    channel's round_robin policy spreads calls over. Host names in a list are resolved
    once, here; pass "dns:///name:port" to have gRPC re-resolve them.
    """
    if isinstance(url, str):
        if not url:
            raise ValueError("empty target")
        return url
    targets = list(url)
    if not targets:
        raise ValueError("no targets")
    if len(targets) == 1:
        return targets[0]
    v4: list[str] = []
    v6: list[str] = []
    for target in targets:
        if target.startswith(_SCHEMES):
            raise ValueError(f"target {target!r}: a list takes host:port entries, no schemes")
        host, port = _split_host_port(target)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
            # One family for the whole list (a static target has one): prefer IPv4.
            if any(a.version == 4 for a in addresses):
                addresses = [a for a in addresses if a.version == 4]
            addresses = list(dict.fromkeys(addresses))
        for address in addresses:
            if address.version == 4:
                v4.append(f"{address}:{port}")
            else:
                v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ValueError("targets mix IPv4 and IPv6 addresses; use one family")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def _pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


def _load_inject() -> Callable[[MutableMapping[str, str]], None] | None:
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # optional: tracing is off without OpenTelemetry
        return None
    return inject


_otel_inject = _load_inject()
"""OpenTelemetry's propagator, when it is installed."""


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as W3C `traceparent`/`tracestate` metadata, or nothing
    when OpenTelemetry is not installed or no span is active."""
    inject = _otel_inject
    if inject is None:
        return ()
    carrier: dict[str, str] = {}
    # Telemetry must never fail a call.
    with contextlib.suppress(Exception):
        inject(carrier)
    return tuple((key.lower(), value) for key, value in carrier.items())


@dataclass(frozen=True)
class ChannelSetup:
    """Everything both clients need to open their channel and make calls."""

    target: str
    credentials: grpc.ChannelCredentials | None
    """None for an insecure channel."""
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    """Sent with every call (the bearer token on insecure channels, user headers)."""
    timeout_s: float | None
    retry: RetryPolicy | None

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for one call: the fixed entries plus the current trace context."""
        trace = trace_metadata()
        return self.metadata + trace if trace else self.metadata

    def timeout(self, timeout_s: float | None) -> float | None:
        """The deadline of one call: its own `timeout_s`, else the client's default."""
        return self.timeout_s if timeout_s is None else timeout_s


def channel_setup(
    url: str | Sequence[str],
    *,
    timeout_s: float | None,
    retries: int | RetryPolicy | None,
    tls: bool,
    root_certificates: bytes | str | os.PathLike[str] | None,
    client_certificate: bytes | str | os.PathLike[str] | None,
    client_key: bytes | str | os.PathLike[str] | None,
    tls_server_name: str | None,
    token: str | None,
    headers: Mapping[str, str] | None,
    max_message_bytes: int,
    keepalive_time_s: float | None,
    keepalive_timeout_s: float,
    load_balancing: str,
    channel_options: Sequence[tuple[str, Any]],
) -> ChannelSetup:
    """Work out the channel of a client from its constructor's arguments."""
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mTLS needs both client_certificate and client_key")
    retry = RetryPolicy.of(retries)
    secure = tls or root_certificates is not None or client_certificate is not None
    metadata: list[tuple[str, str]] = [(k.lower(), v) for k, v in (headers or {}).items()]
    credentials: grpc.ChannelCredentials | None = None
    if secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates),
            private_key=_pem(client_key),
            certificate_chain=_pem(client_certificate),
        )
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
    elif token is not None:
        metadata.append(("authorization", f"Bearer {token}"))

    service_config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retry is not None:
        service_config["methodConfig"] = [
            {"name": [{"service": SERVICE}], "retryPolicy": retry.to_service_config()}
        ]
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.service_config", json.dumps(service_config)),
        # The service config is ours: never replaced by one published in DNS.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if keepalive_time_s is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ]
    if tls_server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    # The caller's options come last, so they win.
    options += list(channel_options)
    return ChannelSetup(
        target=resolve_target(url),
        credentials=credentials,
        options=tuple(options),
        metadata=tuple(metadata),
        timeout_s=timeout_s,
        retry=retry,
    )


class ClientConfig:
    """The constructor both clients share; subclasses open their channel in `_open_channel`.

    Args:
        url: "host:port", any gRPC target ("dns:///name:port", "ipv4:a:p,b:p"), or a list
            of "host:port" to spread calls over (round_robin).
        timeout_s: the deadline of every call unless the call passes its own; None: none.
        retries: retries after the first attempt on UNAVAILABLE and RESOURCE_EXHAUSTED
            (0: none), or a RetryPolicy.
        tls: use TLS (with the system's roots unless `root_certificates` is given).
        root_certificates, client_certificate, client_key: PEM bytes or text, or file
            paths; a client certificate and key make it mTLS.
        tls_server_name: the name to check the server's certificate against, when it is
            not the target's host.
        token: a bearer token sent as `authorization: Bearer <token>` on every call.
        headers: more metadata sent on every call.
        max_message_bytes: the largest message sent or received (default 64 MiB).
        keepalive_time_s: seconds between HTTP/2 keepalive pings on an active connection
            (None: no pings). Servers refuse pings more often than they permit (5 min by
            default in gRPC), so lower it only where the server allows.
        keepalive_timeout_s: how long a ping may go unanswered before the connection is
            closed.
        load_balancing: the gRPC load-balancing policy (default round_robin).
        channel_options: extra gRPC channel options; they override the ones above.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout_s: float | None = 60.0,
        retries: int | RetryPolicy | None = 2,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        client_certificate: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float | None = 300.0,
        keepalive_timeout_s: float = 20.0,
        load_balancing: str = "round_robin",
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._setup = channel_setup(
            url,
            timeout_s=timeout_s,
            retries=retries,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
            token=token,
            headers=headers,
            max_message_bytes=max_message_bytes,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            load_balancing=load_balancing,
            channel_options=channel_options,
        )
        self._ids = RequestIds()
        self._open_channel()

    def _open_channel(self) -> None:
        """Open the client's channel and stub from `self._setup` (each client its own kind)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target the channel connects to."""
        return self._setup.target


def version_str(version: str | int | None) -> str:
    """A model version as the protocol carries it ("" for the server's choice)."""
    return "" if version is None else str(version)
