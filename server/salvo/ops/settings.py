"""Salvo's settings: environment variables with the SALVO_ prefix, overridden by CLI flags."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings. `salvo serve --help` lists the matching flags."""

    model_config = SettingsConfigDict(env_prefix="SALVO_", extra="ignore")

    model_repository: Path = Path("models")
    """Directory holding one subdirectory per model."""
    repository_poll_s: float = Field(default=0.0, ge=0)
    """Every this many seconds, load new models, reload those whose versions or config
    changed (new versions warm up before they take traffic; the old ones drain), unload
    those whose directory went; 0: never."""
    host: str = "127.0.0.1"
    """Address both ports bind to; 0.0.0.0 to serve other hosts."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port (Triton's default); 0 picks a free port, logged at start-up."""
    http_port: int = Field(default=8002, ge=0, le=65535)
    """HTTP port: the v2 REST API, /metrics and /v2/health/*; 0 picks a free port."""
    http_cors_origins: tuple[str, ...] = ()
    """Origins browsers may call the REST API from (CORS), e.g. `["https://app.example"]`
    (JSON in SALVO_HTTP_CORS_ORIGINS); none by default."""
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    """On SIGTERM or SIGINT, how long new calls are still served while health reports
    NOT_SERVING, so that load balancers move away first; a second signal cuts it short."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """After that grace, how long queued and running requests get to finish."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent, and largest HTTP request body (inflated)."""
    stream_max_in_flight: int = Field(default=256, ge=1)
    """Requests of one ModelStreamInfer stream being served at once; more wait (backpressure)."""
    cache_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Bytes the response cache may hold, all models together (models opt in with
    `response_cache: {enable: true}`); 0 turns the cache off."""
    telemetry_enabled: bool = True
    """Metrics, traces and access logs; off leaves /metrics empty (for overhead baselines)."""
    access_logs_per_s: float = Field(default=10.0, ge=0)
    """Access-log lines per second at most (a token bucket); 0 turns access logs off."""
    torch_threads: int = Field(default=0, ge=0)
    """torch intra-op threads; 0 keeps torch's default (one per core)."""
    log_level: str = "INFO"
    """Python logging level."""

    # Security, admission and connections. TLS, tokens and rate limits are off by default.
    tls_cert_file: Path | None = None
    """PEM certificate chain; with `tls_key_file` both ports serve TLS only (gRPC, and
    HTTP: the REST API, metrics and health)."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle: clients must then present a certificate it signed (mutual TLS)."""
    auth_tokens_file: Path | None = None
    """YAML or JSON mapping each bearer token to `{name, models: [names] or "*", repository:
    bool}`. With it (or `auth_token`) every RPC but health, ServerLive/ServerReady and
    reflection needs `authorization: Bearer <token>`; read once at start-up."""
    auth_token: SecretStr | None = None
    """One bearer token with every right (named SALVO_AUTH_TOKEN); env only, never a flag."""
    repository_rpcs: Literal["auto", "enabled", "disabled"] = "auto"
    """RepositoryModelLoad/Unload: `disabled` answers PERMISSION_DENIED. `auto` enables them
    when auth is on (then only tokens with `repository: true` may call them) or when the
    server binds a loopback address, and disables them on a network without auth, so no
    stranger can unload a model."""
    rate_limit_per_s: float = Field(default=0.0, ge=0)
    """Requests per second per client (a token bucket per token name, else per peer
    address; each request of a stream counts); over it RESOURCE_EXHAUSTED with
    `grpc-retry-pushback-ms`. 0 turns rate limiting off. Behind a proxy every client has
    the proxy's address: use tokens there."""
    rate_limit_burst: int = Field(default=0, ge=0)
    """Requests a client may make at once before the rate applies; 0: one second's worth."""
    max_concurrent_rpcs: int = Field(default=4096, ge=0)
    """RPCs served at once (an open stream is one); more get RESOURCE_EXHAUSTED at once,
    which bounds memory under a flood of connections. Probes count too. 0: no cap."""
    max_pending_rpcs: int = Field(default=1000, ge=1)
    """Calls gRPC core may hold for a busy event loop to take up. Past it, and with rising
    probability up to three times it, gRPC core refuses new calls at once (clients see
    CANCELLED, with no push-back) without any Python running. Lower bounds how long admitted
    calls can wait behind a flood's backlog (a bare server flooded with 4,000 calls: p99
    5.7 s at 1,000, 0.65 s at 100); higher lets a burst of simultaneous calls reach the
    queue, which sheds them with RESOURCE_EXHAUSTED and push-back. gRPC's default, 1000."""
    max_connection_age_s: float = Field(default=300.0, ge=0)
    """A connection older than this (gRPC adds ±10% jitter) is told to go away, so clients
    reconnect and spread onto new replicas; calls in flight carry on. 0: never."""
    max_connection_age_grace_s: float = Field(default=math.inf, gt=0)
    """How long calls in flight on an aged connection may still run before it is closed.
    The default (inf) never cuts one, so long ModelStreamInfer streams survive."""
    keepalive_time_s: float = Field(default=60.0, gt=0)
    """The server pings each idle connection this often to find dead clients."""
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    """A ping unanswered for this long closes the connection."""
    keepalive_min_ping_interval_s: float = Field(default=10.0, ge=0)
    """The shortest interval between a client's pings the server tolerates; clients that
    ping more often are disconnected (gRPC's ping-abuse policy; its default is 5 min)."""
    keepalive_permit_without_calls: bool = True
    """Allow keepalive pings on connections with no call in flight, so idle clients and load
    balancers keep their connections."""
    workers: int = Field(default=1, ge=1)
    """Server processes sharing the gRPC port (SO_REUSEPORT) under a supervisor, each with
    its own models and event loop; see salvo.workers."""
    reuse_port: bool = False
    """Bind the gRPC port with SO_REUSEPORT (set by the supervisor for its workers)."""
    http_private: bool = False
    """Bind the HTTP port on loopback, plaintext, for the supervisor's scrapes alone (set by
    the supervisor for its workers: their REST API is not served to other hosts)."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "asyncio"
    """The event loop: asyncio's own, uvloop (`pip install uvloop`), or `auto` (uvloop where
    installed). uvloop measured no gain here: within ±10% either way on mlp at concurrency
    16, unary and streaming (gRPC's own C code dominates the loop), so asyncio stays."""

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        """A certificate needs its key, and a client CA needs a server certificate."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self
