"""``python -m api.token``: mint an access token signed with the configured secret (development, scripts).

    python -m api.token --publish 'orders/*' --subscribe 'user/{sub}/**' --sub 42 --ttl 3600

prints a token for ``HERALD_JWT_SECRET`` (or ``--secret``), with the
``herald`` claim Herald reads, and ``aud``/``iss`` from
``HERALD_JWT_AUDIENCE``/``HERALD_JWT_ISSUER`` when those are set, so it passes
the node's checks. Like Mercure's and Centrifugo's generators, for
development and scripts: in production your application mints its users'
tokens with its own JWT library (the claims are in docs/access-control.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jwt

from api.auth.keys import HMAC_ALGORITHMS, MIN_SECRET_BYTES
from api.auth.verifier import CLAIM


def claims(
    *,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    admin: bool = False,
    sub: str | None = None,
    ttl: float = 3600,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of a Herald token."""
    issued = int(now if now is not None else time.time())
    rights: dict[str, Any] = {}
    if publish:
        rights["publish"] = list(publish)
    if subscribe:
        rights["subscribe"] = list(subscribe)
    if admin:
        rights["admin"] = True
    body: dict[str, Any] = {"iat": issued, "exp": issued + int(ttl), CLAIM: rights}
    if sub is not None:
        body["sub"] = sub
    if audience:
        body["aud"] = audience
    if issuer:
        body["iss"] = issuer
    return body


def mint(secret: str, algorithm: str = "HS256", **kwargs: Any) -> str:
    """A token signed with ``secret`` (HMAC); ``kwargs`` are those of :func:`claims`."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"{algorithm} is not an HMAC algorithm ({sorted(HMAC_ALGORITHMS)})")
    return jwt.encode(claims(**kwargs), secret, algorithm=algorithm)


def mint_from_environment(**kwargs: Any) -> str | None:
    """A token from ``HERALD_JWT_SECRET`` (and the audience/issuer settings), or None when no secret is set.

    What the load tool, the demo producer and ``workers.produce`` use when given no ``--token``.
    """
    secret = os.environ.get("HERALD_JWT_SECRET")
    if not secret:
        return None
    kwargs.setdefault("audience", os.environ.get("HERALD_JWT_AUDIENCE"))
    kwargs.setdefault("issuer", os.environ.get("HERALD_JWT_ISSUER"))
    return mint(secret, _configured_algorithm(), **kwargs)


def _configured_algorithm() -> str:
    """The algorithm the node accepts first (``HERALD_JWT_ALGORITHMS``), HS256 by default."""
    return (os.environ.get("HERALD_JWT_ALGORITHMS") or "HS256").split(",")[0].strip() or "HS256"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.token", description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish", action="append", default=[], metavar="SELECTOR", help="may publish to (repeat)")
    parser.add_argument(
        "--subscribe", action="append", default=[], metavar="SELECTOR", help="may subscribe to (repeat)"
    )
    parser.add_argument("--admin", action="store_true", help="may read /stats, /metrics, the dashboard")
    parser.add_argument("--sub", help="the subject ({sub} in selectors)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default 3600)")
    parser.add_argument("--secret", help="HMAC secret (default: $HERALD_JWT_SECRET)")
    parser.add_argument("--aud", help="audience (default: $HERALD_JWT_AUDIENCE)")
    parser.add_argument("--iss", help="issuer (default: $HERALD_JWT_ISSUER)")
    parser.add_argument(
        "--algorithm",
        default=_configured_algorithm(),
        choices=sorted(HMAC_ALGORITHMS),
        help="default: the first of $HERALD_JWT_ALGORITHMS, else HS256",
    )
    args = parser.parse_args(argv)
    secret = args.secret or os.environ.get("HERALD_JWT_SECRET")
    if not secret:
        parser.error("no secret: set HERALD_JWT_SECRET or pass --secret")
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    try:
        token = mint(
            secret,
            args.algorithm,
            publish=args.publish,
            subscribe=args.subscribe,
            admin=args.admin,
            sub=args.sub,
            ttl=args.ttl,
            audience=args.aud or os.environ.get("HERALD_JWT_AUDIENCE"),
            issuer=args.iss or os.environ.get("HERALD_JWT_ISSUER"),
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
