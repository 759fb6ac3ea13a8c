"""Salvo's settings: environment variables with the SALVO_ prefix, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings. `salvo serve --help` lists the matching flags."""

    model_config = SettingsConfigDict(env_prefix="SALVO_", extra="ignore")

    model_repository: Path = Path("models")
    """Directory holding one subdirectory per model."""
    host: str = "127.0.0.1"
    """Address both ports bind to; 0.0.0.0 to serve other hosts."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port (Triton's default); 0 picks a free port, logged at start-up."""
    http_port: int = Field(default=8002, ge=0, le=65535)
    """HTTP port for /metrics and /v2/health/*; 0 picks a free port."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long queued and running requests get to finish."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent."""
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
