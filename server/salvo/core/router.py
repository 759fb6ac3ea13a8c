"""Which version of a model answers a request: a function of the model's traffic policy
and the request.

A request that names a version gets that version. One that names none gets the version
its model's `TrafficPolicy` chooses; with no policy set, or a policy whose version is not
loaded (a reload dropped it), that is the latest version loaded. Policies are data that a
controller (a rollout, an operator) replaces while requests flow; the front ends and the
batcher never see them. Weighted splits, sticky keys and shadow copies are further
fields of the policy, read by `choose`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from salvo.engine.repository import ModelEntry, ModelManager, ModelVersion, State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How a model's requests that name no version are spread over its versions."""

    default_version: int | None = None
    """The version that answers them; None: the latest loaded."""


def choose(policy: TrafficPolicy | None, entry: ModelEntry) -> ModelVersion:
    """The version of `entry` (which serves, so it has one) that `policy` sends a request
    naming no version to."""
    if policy is not None and policy.default_version is not None:
        chosen = entry.versions.get(policy.default_version)
        if chosen is not None:
            return chosen
    latest = entry.latest()
    assert latest is not None  # a model that serves has a version
    return latest


class Router:
    """Resolves requests to model versions through each model's traffic policy."""

    def __init__(self, models: ModelManager) -> None:
        self._models = models
        self._entries = models.models
        self._policies: dict[str, TrafficPolicy] = {}

    def policy(self, model: str) -> TrafficPolicy | None:
        """The policy set for `model`, if any."""
        return self._policies.get(model)

    def set_policy(self, model: str, policy: TrafficPolicy | None) -> None:
        """Route `model`'s requests by `policy` from now on (None: the default rule)."""
        if policy is None:
            self._policies.pop(model, None)
        else:
            self._policies[model] = policy
        log.info("traffic policy of model '%s': %s", model, policy)

    def route(self, model: str, version: str = "") -> ModelVersion:
        """The version that answers a request for `model` naming `version` ("" for none).
        Raises NOT_FOUND (unknown model or version) or UNAVAILABLE (not serving)."""
        entry = self._entries.get(model)
        if entry is None or entry.state is not State.READY:
            entry = self._models.entry(model)  # raises, saying why
        if version:
            return entry.version(version)
        if self._policies:
            return choose(self._policies.get(model), entry)
        latest = entry.latest()
        assert latest is not None  # a model that serves has a version
        return latest
