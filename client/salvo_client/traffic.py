"""`salvo traffic`: read or set how a model's requests that name no version are spread over
its versions, through the server's REST admin API (`/v2/models/{model}/traffic`).

    salvo traffic mlp                                   # the policy in force
    salvo traffic mlp --weights 1=90,2=10               # 90% to version 1, 10% to 2
    salvo traffic mlp --weights 1=1,2=1 --sticky-parameter user
    salvo traffic mlp --weights 1=1 --shadow 2:0.1      # 10% also run on 2, compared
    salvo traffic mlp --clear                           # back to the model's config

Changing it needs a token with repository rights where tokens are on (SALVO_AUTH_TOKEN;
never a flag: a command line is visible to every user of the machine). Standard library
only: it works from the light base install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["DEFAULT_HTTP_URL", "add_parser", "parse_shadow", "parse_weights"]

DEFAULT_HTTP_URL = "http://127.0.0.1:8002"


def parse_weights(text: str) -> dict[str, float]:
    """`1=90,2=10` as {"1": 90.0, "2": 10.0}. Raises ValueError naming the bad part."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        version, sep, weight = part.partition("=")
        if not sep or not version.strip().isdigit():
            raise ValueError(f"--weights: {part!r} is not VERSION=WEIGHT")
        try:
            weights[version.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--weights: {part!r}: the weight is not a number") from None
    return weights


def parse_shadow(text: str) -> dict[str, Any]:
    """`3:0.1` (or `3`, every request) as {"version": 3, "share": 0.1}."""
    version, _, share = text.partition(":")
    try:
        return {"version": int(version), "share": float(share) if share else 1.0}
    except ValueError:
        raise ValueError(f"--shadow: {text!r} is not VERSION[:SHARE]") from None


def _call(url: str, method: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
    """The server's JSON answer. Raises RuntimeError with its error message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = os.environ.get("SALVO_AUTH_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = ""
        raise RuntimeError(f"{exc.code}: {message or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"cannot reach {url}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    base = args.url if "://" in args.url else f"http://{args.url}"
    url = f"{base.rstrip('/')}/v2/models/{args.model}/traffic"
    try:
        if args.clear:
            answer = _call(url, "DELETE", None, args.timeout_s)
        elif any(x is not None for x in (args.weights, args.sticky_parameter, args.shadow)):
            body: dict[str, Any] = {"weights": parse_weights(args.weights or "")}
            if args.sticky_parameter:
                body["sticky_parameter"] = args.sticky_parameter
            if args.shadow:
                body["shadow"] = parse_shadow(args.shadow)
            answer = _call(url, "PUT", body, args.timeout_s)
        else:
            answer = _call(url, "GET", None, args.timeout_s)
    except (RuntimeError, ValueError) as exc:
        print(f"salvo traffic: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def add_parser(sub: Any) -> None:
    """Register `traffic` on the `salvo` command line's subparsers."""
    parser = sub.add_parser(
        "traffic",
        help="read or set a model's traffic policy (weights per version, sticky parameter)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model")
    parser.add_argument(
        "--url", default=DEFAULT_HTTP_URL, help=f"the HTTP port (default {DEFAULT_HTTP_URL})"
    )
    change = parser.add_mutually_exclusive_group()  # a policy set replaces the whole policy
    change.add_argument("--weights", help="VERSION=WEIGHT,...: each version's share")
    change.add_argument("--clear", action="store_true", help="drop the policy set here")
    parser.add_argument("--sticky-parameter", help="the request parameter that keeps a caller")
    parser.add_argument(
        "--shadow", help="VERSION[:SHARE]: also run that share of requests on VERSION, compared"
    )
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.set_defaults(func=_run)
