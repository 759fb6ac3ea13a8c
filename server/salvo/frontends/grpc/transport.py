"""How the gRPC port is served: connection options and TLS, both from the settings.

Connection age, keepalive and the message-size limit are gRPC core's own channel arguments,
so they cost the request path nothing; see `Settings` for what each default is for.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import grpc

from salvo.domain.status import ConfigError
from salvo.ops.settings import Settings

log = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_options(s: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments."""
    options = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", int(s.reuse_port)),  # workers share the port (salvo.workers)
        ("grpc.keepalive_time_ms", _ms(s.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(s.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(s.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(s.keepalive_min_ping_interval_s)),
        # Otherwise gRPC stops its keepalive pings after two on a connection without data.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.server.max_pending_requests", s.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", 3 * s.max_pending_rpcs),
    ]
    if s.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", _ms(s.max_connection_age_s)))
        if math.isfinite(s.max_connection_age_grace_s):
            options.append(("grpc.max_connection_age_grace_ms", _ms(s.max_connection_age_grace_s)))
    return options


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: cannot read it: {exc.strerror}") from None


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (mutual TLS with a client CA), or None for plaintext."""
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    cert = _read("tls_cert_file", s.tls_cert_file)
    key = _read("tls_key_file", s.tls_key_file)
    client_ca = (
        None if s.tls_client_ca_file is None else _read("tls_client_ca_file", s.tls_client_ca_file)
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def bind(server: grpc.aio.Server, s: Settings) -> int:
    """Add the gRPC port to `server`, over TLS when configured; returns the bound port."""
    address = f"{s.host}:{s.grpc_port}"
    credentials = server_credentials(s)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:
            # gRPC says only "failed to bind" when it cannot use the certificate or key.
            raise ConfigError(
                f"cannot serve TLS on {address} with {s.tls_cert_file} and {s.tls_key_file}:"
                " not a PEM certificate chain and its private key, or the port is taken"
            ) from None
    if not port:
        raise OSError(f"cannot bind gRPC port {address}")
    tls = "off" if credentials is None else "mutual" if s.tls_client_ca_file else "on"
    log.info("grpc transport: tls=%s", tls)
    return port
