"""Admission: who may call what, and how often, whatever the transport.

Bearer tokens name a principal with rights to some models (or all) and, or not, to the
model repository. A token bucket per client identity (the token's name, else the peer's
address) bounds how often each client may call, so one noisy client cannot starve another.
Pure state and no clock of its own: callers pass `now` (time.monotonic()), which keeps it
synchronously testable. Each front end reads the credentials in its own way and asks
`Admission.check` before it serves a call; what it refuses is a core error
(UNAUTHENTICATED, PERMISSION_DENIED, or RESOURCE_EXHAUSTED with the push-back to wait).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from salvo.domain.status import (
    ConfigError,
    Overloaded,
    PermissionDenied,
    SalvoError,
    Unauthenticated,
)

ENV_TOKEN_NAME = "SALVO_AUTH_TOKEN"
"""The name (and rate-limit identity) of the token given in that environment variable."""


@dataclass(frozen=True, slots=True)
class Principal:
    """What one token may do. `models` None means every model."""

    name: str
    models: frozenset[str] | None
    repository: bool

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def _digest(token: str) -> bytes:
    # Tokens are kept and looked up by digest, so no comparison touches the secret itself.
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The accepted bearer tokens and their rights."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(token): p for token, p in principals.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def get(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))


def load_tokens(path: Path) -> dict[str, Principal]:
    """Parse a tokens file: YAML or JSON, token → {name, models: [names] or "*", repository}.

    Errors name the file and the entry by position and name, never the token.
    """
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError) as exc:  # JSON's messages quote no content
        raise ConfigError(f"auth tokens file {path}: cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        # YAML's messages quote the offending line, which may hold a token: give its place.
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"auth tokens file {path}: cannot read it: bad YAML{place}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"auth tokens file {path}: expected a mapping of token to its rights")
    principals: dict[str, Principal] = {}
    for position, (token, entry) in enumerate(data.items(), start=1):
        where = f"auth tokens file {path}: entry {position}"
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ConfigError(f"{where}: a token must be a non-empty string without spaces")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected {{name, models, repository}}")
        unknown = set(entry) - {"name", "models", "repository"}
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        where = f"{where} ('{name}')"
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        models = entry.get("models", [])
        if models != "*" and not (
            isinstance(models, list) and all(isinstance(m, str) and m for m in models)
        ):
            raise ConfigError(f"{where}: 'models' must be \"*\" or a list of model names")
        repository = entry.get("repository", False)
        if not isinstance(repository, bool):
            raise ConfigError(f"{where}: 'repository' must be true or false")
        principals[token] = Principal(
            name, None if models == "*" else frozenset(models), repository
        )
    return principals


def permission(
    principal: Principal, call: str, model: str | None, repository: bool = False
) -> PermissionDenied | None:
    """Why `principal` may not make `call` (for `model`, "" meaning every model; None for a
    call about no model), or None. `repository`: the call reads or changes the repository."""
    if repository and not principal.repository:
        return PermissionDenied(
            f"token '{principal.name}' may not call {call}: it has no repository rights"
        )
    if model is None or principal.may_use(model):
        return None
    if not model:
        return PermissionDenied(
            f"token '{principal.name}' may not call {call} for every model: name one"
        )
    return PermissionDenied(f"token '{principal.name}' may not use model '{model}' ({call})")


class _Bucket:
    """One client's tokens and when they were last counted."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """`rate_per_s` requests per second per identity, with bursts of up to `burst`.

    Each identity has its own bucket, so a client that floods empties only its own. Buckets
    that have refilled completely carry no state worth keeping: once there are more than
    `max_identities`, they are dropped, which bounds memory to the clients active within
    the last `burst / rate_per_s` seconds.
    """

    def __init__(self, rate_per_s: float, burst: int = 0, max_identities: int = 10_000) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        # 0: one second's worth, and never less than one request.
        self.burst = float(burst or max(1, math.ceil(rate_per_s)))
        self.max_identities = max_identities
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, identity: str, now: float) -> int:
        """0 when `identity` may make a request now (its token is spent), else the
        milliseconds until it may (at least 1), which is the push-back to send."""
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= self.max_identities:
                self._forget_idle(now)
            bucket = self._buckets[identity] = _Bucket(self.burst, now)
        else:
            elapsed = max(now - bucket.stamp, 0.0)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate_per_s * 1000))

    def _forget_idle(self, now: float) -> None:
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {
            identity: bucket
            for identity, bucket in self._buckets.items()
            if now - bucket.stamp < full_after_s
        }

    def __len__(self) -> int:
        """Identities with a bucket (for tests and metrics)."""
        return len(self._buckets)


class Admission:
    """Tokens (when configured) and a rate limit (when configured), checked together."""

    def __init__(self, tokens: Tokens | None, limiter: RateLimiter | None) -> None:
        self.tokens = tokens
        self.limiter = limiter

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal of a bearer token (None when tokens are off). `token` is None when
        the call carried no credentials, "" when they were not a bearer token. Raises
        Unauthenticated."""
        if self.tokens is None:
            return None
        if token is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        principal = self.tokens.get(token) if token else None
        if principal is None:
            raise Unauthenticated("invalid bearer token")
        return principal

    def check(
        self,
        principal: Principal | None,
        identity: str,
        call: str,
        model: str | None,
        repository: bool = False,
        now: float = 0.0,
    ) -> SalvoError | None:
        """Why this call may not be served now, or None (a rate-limit token is spent).
        `identity` is who the rate limit counts (the principal's name, else the peer)."""
        if principal is not None:
            denied = permission(principal, call, model, repository)
            if denied is not None:
                return denied
        if self.limiter is None:
            return None
        wait_ms = self.limiter.admit(identity, now)
        if not wait_ms:
            return None
        return Overloaded(
            f"rate limit: client '{identity}' is over {self.limiter.rate_per_s:g} requests/s;"
            f" retry in {wait_ms} ms",
            wait_ms,
        )
