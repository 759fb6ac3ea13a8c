"""The router's choice of version for requests that name none: weights, sticky keys,
versions that do not serve; and the checks on policies from config files and the admin
API."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from pydantic import ValidationError

from salvo.core.router import TrafficPolicy, choose, policy_from
from salvo.domain.config import TrafficConfig
from salvo.domain.status import InvalidRequest
from salvo.engine.repository import ModelEntry


def entry(*versions: int) -> ModelEntry:
    """A model entry whose versions are plain markers (choose only picks among them)."""
    model = ModelEntry("m")
    model.versions = {v: f"v{v}" for v in versions}  # type: ignore[misc]
    return model


def test_no_weights_means_the_latest_version() -> None:
    assert choose(TrafficPolicy(), entry(1, 2, 3)) == "v3"


def test_a_sticky_key_always_lands_on_the_same_version() -> None:
    policy = TrafficPolicy(((1, 1.0), (2, 1.0)), "user")
    model = entry(1, 2)
    chosen = {key: choose(policy, model, key) for key in map(str, range(1000))}
    assert all(choose(policy, model, key) == v for key, v in chosen.items())
    shares = Counter(chosen.values())
    assert 400 < shares["v2"] < 600, shares  # an even hash over the keys
    # The same keys, with weights 3:1: most move to version 1, none of version 1's moves.
    skewed = TrafficPolicy(((1, 3.0), (2, 1.0)), "user")
    for key, version in chosen.items():
        if version == "v1":
            assert choose(skewed, model, key) == "v1"


def test_the_key_hash_is_the_same_in_every_process() -> None:
    """blake2b, not Python's hash(), which changes with PYTHONHASHSEED."""
    policy = TrafficPolicy(((1, 1.0), (2, 1.0)), "user")
    assert [choose(policy, entry(1, 2), k) for k in ("alice", "bob", "carol", "dave")] == [
        "v1", "v1", "v2", "v1",
    ]  # fmt: skip


def test_versions_that_do_not_serve_take_nothing() -> None:
    policy = TrafficPolicy(((1, 1.0), (7, 100.0)))
    assert {choose(policy, entry(1, 2)) for _ in range(50)} == {"v1"}
    nothing_serving = TrafficPolicy(((7, 1.0),))
    assert choose(nothing_serving, entry(1, 2)) == "v2"  # the latest
    zero = TrafficPolicy(((1, 0.0), (2, 1.0)))
    assert {choose(zero, entry(1, 2)) for _ in range(50)} == {"v2"}


def test_the_admin_apis_policy_is_checked_against_the_versions_serving() -> None:
    assert policy_from({"weights": {"2": 1, "1": 3}}, [1, 2]) == TrafficPolicy(((1, 3.0), (2, 1.0)))
    assert policy_from({}, [1]) == TrafficPolicy()
    for document, message in (
        ({"weights": {"3": 1}}, "version 3 does not serve (serving [1, 2])"),
        ({"weights": {"0": 1}}, "'0' is not a version number"),
        ({"weights": {"1": float("nan")}}, "finite number >= 0"),
        ({"weights": {"1": True}}, "must be a number"),
        ({"sticky_parameter": 5}, "'sticky_parameter'"),
    ):
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            policy_from(document, [1, 2])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"weights": {0: 1}}, "versions are positive integers"),
        ({"weights": {1: -1}}, "finite number >= 0"),
        ({"weights": {1: 0, 2: 0}}, "at least one weight"),
        ({"sticky_parameter": ""}, "at least 1 character"),
        ({"split": {1: 1}}, "Extra inputs are not permitted"),
    ],
)
def test_a_configs_traffic_block_is_checked(raw, message) -> None:
    with pytest.raises(ValidationError, match=message):
        TrafficConfig(**raw)
    assert TrafficConfig(weights={1: 90, 2: 10}).weights == {1: 90.0, 2: 10.0}
