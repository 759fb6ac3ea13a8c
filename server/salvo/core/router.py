"""Which version of a model answers a request: a function of the model's traffic policy
and the request.

A request that names a version gets that version. One that names none gets the version
its model's `TrafficPolicy` chooses: the policy an operator set (the admin API), else the
one the model's config declares (`traffic:`), else the latest version loaded. A policy
spreads requests over versions by weight, at random, or by a sticky key (a request
parameter) that keeps one caller on one version, and may copy a share of them to a
candidate version as shadow traffic (`shadow.py`). Versions a policy names that do not
serve (not loaded yet, or unloaded) take no traffic. Policies are data that a controller
(a rollout, an operator) replaces while requests flow; the front ends and the batcher
never see them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from salvo.domain.config import ModelConfig, TrafficConfig
from salvo.domain.status import InvalidRequest
from salvo.engine.repository import ModelEntry, ModelManager, ModelVersion, State

if TYPE_CHECKING:
    from salvo.domain.types import InferRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How a model's requests that name no version are spread over its versions."""

    weights: tuple[tuple[int, float], ...] = ()
    """(version, weight) in ascending version order; empty: the latest version."""
    sticky_parameter: str | None = None
    """The request parameter whose value keeps a caller on one version."""
    shadow: tuple[int, float] | None = None
    """(version, share): that share of the requests naming no version also run on that
    version (`salvo.core.shadow`)."""

    @classmethod
    def of(cls, config: TrafficConfig) -> TrafficPolicy:
        shadow = config.shadow
        return cls(
            tuple(sorted(config.weights.items())),
            config.sticky_parameter,
            None if shadow is None else (shadow.version, shadow.share),
        )

    def describe(self) -> dict[str, object]:
        shadow = self.shadow
        return {
            "weights": {str(v): w for v, w in self.weights},
            "sticky_parameter": self.sticky_parameter,
            "shadow": None if shadow is None else {"version": shadow[0], "share": shadow[1]},
        }


DEFAULT = TrafficPolicy()


def _unit(key: str) -> float:
    """Where `key` falls in [0, 1): the same for every process and run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose(policy: TrafficPolicy, entry: ModelEntry, key: str | None = None) -> ModelVersion:
    """The version of `entry` (which serves, so it has one) that `policy` sends a request
    naming no version to; `key` is its sticky key, if it has one."""
    if policy.weights:
        versions = entry.versions
        serving = [(v, w) for v, w in policy.weights if w > 0 and v in versions]
        if serving:
            total = sum(w for _, w in serving)
            point = (random.random() if key is None else _unit(key)) * total
            for version, weight in serving:
                point -= weight
                if point < 0:
                    return versions[version]
            return versions[serving[-1][0]]
    latest = entry.latest()
    assert latest is not None  # a model that serves has a version
    return latest


class Router:
    """Resolves requests to model versions through each model's traffic policy."""

    def __init__(self, models: ModelManager) -> None:
        self._models = models
        self._entries = models.models
        self._policies: dict[str, TrafficPolicy] = {}
        """Set by an operator; they override the config's."""
        self._configured: dict[str, tuple[ModelConfig, TrafficPolicy]] = {}
        """Each model's config, and the policy it declares (remade when the config is)."""

    def policy(self, model: str) -> tuple[TrafficPolicy, str]:
        """The policy `model`'s requests follow, and where it comes from: "admin",
        "config" or "default"."""
        if model in self._policies:
            return self._policies[model], "admin"
        entry = self._entries.get(model)
        config = None if entry is None else entry.config
        if config is not None and (config.traffic.weights or config.traffic.shadow):
            return self._configured_policy(config, model), "config"
        return DEFAULT, "default"

    def set_policy(self, model: str, policy: TrafficPolicy | None) -> None:
        """Route `model`'s requests by `policy` from now on (None: the config's again)."""
        if policy is None:
            self._policies.pop(model, None)
        else:
            self._policies[model] = policy
        current, source = self.policy(model)
        log.info(
            "traffic policy of model '%s' (%s): weights %s, sticky parameter %s",
            model, source, current.describe()["weights"] or "latest version",
            current.sticky_parameter,
        )  # fmt: skip

    def _configured_policy(self, config: ModelConfig, model: str) -> TrafficPolicy:
        cached = self._configured.get(model)
        if cached is None or cached[0] is not config:
            cached = self._configured[model] = (config, TrafficPolicy.of(config.traffic))
        return cached[1]

    def route(
        self, model: str, version: str = "", request: InferRequest | None = None
    ) -> ModelVersion:
        """The version that answers a request for `model` naming `version` ("" for none);
        `request`, where there is one, carries the sticky key. Raises NOT_FOUND (unknown
        model or version) or UNAVAILABLE (not serving)."""
        entry = self._entries.get(model)
        if entry is None or entry.state is not State.READY:
            entry = self._models.entry(model)  # raises, saying why
        if version:
            return entry.version(version)
        policy = self._policies.get(model)
        if policy is None:
            config = entry.config
            if config is None or not config.traffic.weights:
                latest = entry.latest()
                assert latest is not None  # a model that serves has a version
                return latest
            policy = self._configured_policy(config, model)
        key = None
        if policy.sticky_parameter is not None and request is not None:
            value = request.parameters().get(policy.sticky_parameter)
            key = None if value is None else str(value)
        return choose(policy, entry, key)

    def shadow(self, answered: ModelVersion) -> ModelVersion | None:
        """The version a request that named no version, answered by `answered`, should
        also run on as a shadow copy, if its model's policy draws one for it."""
        policy = self._policies.get(answered.name)
        if policy is None:
            config = answered.config
            if config.traffic.shadow is None:
                return None
            policy = self._configured_policy(config, answered.name)
        shadow = policy.shadow
        if shadow is None or shadow[0] == answered.version or random.random() >= shadow[1]:
            return None
        entry = self._entries.get(answered.name)
        return None if entry is None else entry.versions.get(shadow[0])


def policy_from(document: Mapping[str, object], serving: list[int]) -> TrafficPolicy:
    """A policy from the admin API's JSON (`weights`: version → weight, as strings or
    numbers; `sticky_parameter`), checked against the versions `serving`. Raises
    InvalidRequest naming the field."""
    weights = document.get("weights", {})
    if not isinstance(weights, dict):
        raise InvalidRequest("'weights' must be an object of version → weight")
    parsed: dict[int, float] = {}
    for raw, weight in weights.items():
        try:
            version = int(raw)
        except ValueError:
            version = 0
        if version < 1:
            raise InvalidRequest(f"'weights': {raw!r} is not a version number")
        if version not in serving:
            raise InvalidRequest(f"'weights': version {version} does not serve (serving {serving})")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidRequest(f"'weights': version {version}: the weight must be a number")
        if not 0 <= weight < float("inf"):
            raise InvalidRequest(
                f"'weights': version {version}: the weight must be a finite number >= 0"
            )
        parsed[version] = float(weight)
    if parsed and not any(parsed.values()):
        raise InvalidRequest("'weights': at least one weight must be above 0")
    sticky = document.get("sticky_parameter")
    if sticky is not None and (not isinstance(sticky, str) or not sticky):
        raise InvalidRequest("'sticky_parameter' must be a non-empty string or null")
    unknown = set(document) - {"weights", "sticky_parameter", "shadow"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) {sorted(unknown)}: expected weights, "
                             "sticky_parameter, shadow")  # fmt: skip
    return TrafficPolicy(
        tuple(sorted(parsed.items())), sticky, _shadow_from(document.get("shadow"), serving)
    )


def _shadow_from(shadow: object, serving: list[int]) -> tuple[int, float] | None:
    if shadow is None:
        return None
    if not isinstance(shadow, dict):
        raise InvalidRequest("'shadow' must be an object {version, share} or null")
    unknown = set(shadow) - {"version", "share"}
    if unknown:
        raise InvalidRequest(f"'shadow': unknown field(s) {sorted(unknown)}")
    version, share = shadow.get("version"), shadow.get("share", 1.0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidRequest("'shadow': 'version' must be a version number")
    if version not in serving:
        raise InvalidRequest(f"'shadow': version {version} does not serve (serving {serving})")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise InvalidRequest("'shadow': 'share' must be a number from 0 to 1")
    return version, float(share)
