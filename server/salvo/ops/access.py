"""Admission and repository rights as the settings configure them."""

from __future__ import annotations

import ipaddress
import logging

from salvo.core.admission import (
    ENV_TOKEN_NAME,
    Admission,
    Principal,
    RateLimiter,
    Tokens,
    load_tokens,
)
from salvo.ops.settings import Settings

log = logging.getLogger(__name__)


def tokens_from(settings: Settings) -> Tokens | None:
    """The tokens of `auth_tokens_file` and `auth_token`, or None when neither is set."""
    principals: dict[str, Principal] = {}
    if settings.auth_tokens_file is not None:
        principals.update(load_tokens(settings.auth_tokens_file))
    if settings.auth_token is not None:
        token = settings.auth_token.get_secret_value()
        principals[token] = Principal(ENV_TOKEN_NAME, None, True)
    return Tokens(principals) if principals else None


def admission_from(settings: Settings) -> Admission | None:
    """Tokens and the rate limit the settings configure; None when neither is (then no
    front end pays for a check)."""
    tokens = tokens_from(settings)
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s
        else None
    )
    log.info(
        "access: auth=%s rate_limit=%s repository_rpcs=%s",
        f"{len(tokens)} token(s)" if tokens else "off",
        f"{limiter.rate_per_s:g}/s burst {limiter.burst:g}" if limiter else "off",
        "enabled" if repository_changes_allowed(settings) else "disabled",
    )
    if tokens is None and limiter is None:
        return None
    return Admission(tokens, limiter)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def repository_changes_allowed(settings: Settings) -> bool:
    """Whether model loads and unloads are served (see `Settings.repository_rpcs`)."""
    if settings.repository_rpcs != "auto":
        return settings.repository_rpcs == "enabled"
    auth = settings.auth_tokens_file is not None or settings.auth_token is not None
    return auth or _is_loopback(settings.host)
