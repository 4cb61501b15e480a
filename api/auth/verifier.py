"""Verifying access tokens (JWS, via PyJWT) into :class:`Grant` s, with a cache for connect storms.

A token is checked the way the configuration says, never the way it says:
the algorithm must be one the key source allows for the key it names,
``exp`` is required, ``nbf``, ``aud`` (``HERALD_JWT_AUDIENCE``) and ``iss``
(``HERALD_JWT_ISSUER``) are checked. ``nbf`` and ``iat`` get
``HERALD_JWT_LEEWAY`` seconds of leeway (an issuer whose clock runs ahead);
``exp`` gets none: it is the moment a stream opened with the token ends, and a
token past it must not open a new one (EventSource would loop on a stream
that ends at once). What a token allows is the ``herald`` claim::

    {"sub": "42", "exp": ..., "herald": {"publish": ["orders/*"], "subscribe": ["user/{sub}/**"], "admin": false}}

A verified token is kept (bounded, keyed by the token itself) until it
expires, so 5,000 connects carrying a few tokens cost a few verifications
and 4,995 dictionary lookups. The cache holds only tokens that verified;
it is emptied when the key set changes (a JWKS rotation withdraws a key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from api.auth.cache import CachedVerifier, TokenCache
from api.auth.keys import KeySource, UnknownKey, VerificationKey
from api.auth.selectors import InvalidSelector, TopicMatcher

CLAIM = "herald"
CACHE_SIZE = 10_000
"""Verified tokens kept at most; past it, expired ones go first, then the oldest."""


class InvalidToken(Exception):
    """The token can't be used: malformed, badly signed, expired, not yet valid, wrong audience/issuer..."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows, and until when."""

    subject: str | None
    publish: TopicMatcher
    subscribe: TopicMatcher
    admin: bool
    expires_at: float
    """The token's ``exp`` (seconds since the epoch): the node accepts it until then, and no stream outlives it."""


def grant_from_claims(claims: dict[str, Any]) -> Grant:
    """The grant of a verified token's claims. Raises InvalidToken when the ``herald`` claim is malformed."""
    subject = claims.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise InvalidToken("the sub claim must be a string")
    rights = claims.get(CLAIM, {})
    if not isinstance(rights, dict):
        raise InvalidToken(f"the {CLAIM} claim must be an object")
    lists: dict[str, TopicMatcher] = {}
    for action in ("publish", "subscribe"):
        selectors = rights.get(action, [])
        if not isinstance(selectors, list) or not all(isinstance(s, str) for s in selectors):
            raise InvalidToken(f"{CLAIM}.{action} must be a list of topic selectors")
        try:
            lists[action] = TopicMatcher(selectors, subject)
        except InvalidSelector as exc:
            raise InvalidToken(f"{CLAIM}.{action}: {exc}") from None
    admin = rights.get("admin", False)
    if not isinstance(admin, bool):
        raise InvalidToken(f"{CLAIM}.admin must be true or false")
    return Grant(subject, lists["publish"], lists["subscribe"], admin, float(claims["exp"]))


class TokenVerifier(CachedVerifier[Grant]):
    """Turns a token into a :class:`Grant`, or raises InvalidToken (or KeysUnavailable: a passing cause)."""

    def __init__(
        self,
        keys: KeySource,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.keys = keys
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._cache: TokenCache[Grant] = TokenCache(cache_size)

    async def verify(self, token: str) -> Grant:
        return await self._cache.through(token, self.keys.generation, self._verify, InvalidToken)

    def verify_now(self, token: str) -> Grant | None:
        """:meth:`verify`'s grant when nothing needs awaiting: from the cache, or checked now with a key held.

        None when a key would have to be fetched, and for a token that does
        not verify: that one is neither counted nor reported here, the
        caller leaves it to :meth:`verify` (which refuses, counts and says
        why). A token verified here is counted and cached as :meth:`verify`
        does it.
        """
        generation = self.keys.generation
        grant = self._cache.cached(token, generation)
        if grant is not None:
            return grant
        try:
            alg, kid = self._header(token)
            key = self.keys.key_now(kid, alg)
            if key is None:
                return None
            grant = self._decode(token, alg, key)
        except InvalidToken:
            return None
        self._cache.admit(token, generation, grant)
        return grant

    async def _verify(self, token: str) -> Grant:
        alg, kid = self._header(token)
        try:
            key = await self.keys.key_for(kid, alg)
        except UnknownKey as exc:
            raise InvalidToken(str(exc)) from None
        return self._decode(token, alg, key)

    def _header(self, token: str) -> tuple[str, str | None]:
        """The token's ``alg`` (one the configuration accepts) and ``kid``; raises InvalidToken."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.keys.algorithms:
            raise InvalidToken(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        return alg, kid if isinstance(kid, str) else None

    def _decode(self, token: str, alg: str, key: VerificationKey) -> Grant:
        """The grant of a token signed with ``alg``, checked with ``key``; raises InvalidToken."""
        if alg not in key.algorithms:
            raise InvalidToken(f"algorithm {alg!r} is not accepted for this key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(describe(exc)) from None
        # PyJWT gave exp the leeway too; exp gets none (see the module's docstring).
        if not isinstance(claims["exp"], int | float) or claims["exp"] <= time.time():
            raise InvalidToken("the token has expired")
        return grant_from_claims(claims)


def describe(exc: jwt.PyJWTError, audience: str = "this audience") -> str:
    """Why PyJWT refused a token, in words a client can act on (never the token itself).

    Shared by both verifiers (this one and :mod:`api.mercure.authorization`);
    ``audience`` names what an ``aud`` mismatch is not for.
    """
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet (nbf)"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return f"the token is not for {audience}"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token is not from an accepted issuer"
    return f"invalid token: {exc}"
