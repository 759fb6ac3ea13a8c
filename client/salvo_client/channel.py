"""The channel both clients open: target resolution, TLS credentials, channel options and
service config, the metadata of every call (with the W3C trace context), and `ClientConfig`,
the constructor the clients share."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from salvo_client.messages import RequestIds
from salvo_client.retry import RetryPolicy

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_URL",
    "ChannelSetup",
    "ClientConfig",
    "channel_setup",
    "resolve_target",
    "trace_metadata",
]

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "inference.GRPCInferenceService"


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
