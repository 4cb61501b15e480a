"""Mercure access tokens: where a request's token is, validating it, and what it grants.

Everything here follows ``spec/mercure.md`` (Mercure 1.0, draft-dunglas-mercure-08), section
"Authorization" and its subsections; section names below are the spec's.

**Presenting the Access Token.** :func:`token_from` looks in the
``Authorization`` header (``Bearer``, the scheme matched case-insensitively),
then, only when the caller passes the query, the ``access_token`` query
parameter (the spec's URI method, which hubs MAY support), then the cookie
(name configurable; several names may be given, the first present wins, e.g.
the recommended ``__Secure-mercure_access_token`` then the legacy
``mercureAuthorization``). The first mechanism present is used and the others
are ignored, as the spec orders. An ``Authorization`` header of another scheme
(``Basic`` from a proxy, say) carries no bearer token and is passed over. A
malformed presentation (``Bearer`` with no token or not a token68, two
``Bearer`` headers, two ``access_token`` parameters) is a 400 with
``error="invalid_request"``.

**Token Validation.** A token is a JWS in compact serialization whose header
``typ`` is ``at+jwt`` (compared case-insensitively, ``application/`` prefix
omitted: ``application/at+jwt`` too; RFC 7515 section 4.1.9, RFC 9068);
``alg`` on the key source's allowlist (:mod:`api.auth.keys`: from
configuration, never ``none``, and bound to the key's type, so no algorithm
confusion) and one the selected key may verify; no ``crit`` header (this hub
understands no extension); the key picked from configuration only (a
``kid`` hint may choose among trusted keys; ``jwk``/``jku``/``x5u``/``x5c``
are never used). With a mapping of issuers to key sources the signature is
checked with the keys of the token's ``iss`` only, never a pool spanning
issuers. ``exp`` is required and enforced with no leeway (a stream opened with
the token ends at ``exp``: "Subscribers"), ``nbf`` enforced when present (with
``leeway`` seconds for an issuer whose clock runs ahead), ``aud`` must be or
contain the hub's resource identifier, ``iss`` must be one of the trusted
issuers when any are configured (none configured: self-issued tokens only,
bound by ``aud`` alone, as the spec allows). ``sub`` is optional (a string
when present); ``iat``, ``jti``, ``client_id`` are not required.

**Authorization Details.** ``authorization_details`` (RFC 9396) is an array
of objects with a string ``type``; those of the Mercure type are read, others
ignored. The spec names that type ``mercure``; the reference hub's
documentation and the libraries minting tokens for it (Symfony's Mercure
component) write ``https://mercure.rocks/authorization-detail``: both are
Mercure details here (:data:`MERCURE_DETAIL_TYPES`). A Mercure detail has a
non-empty ``actions`` array of strings (``publish``, ``subscribe``; others
ignored: they grant nothing), a non-empty ``topics`` array of topic matcher
objects ("Topic Matcher List", :meth:`api.mercure.matchers.Matchers.from_token_topics`),
and an optional ``payload`` object ("Payloads"). One malformed Mercure detail,
or one over the limits, rejects the whole token (no partial acceptance); a
token with no Mercure detail grants nothing.

**Legacy tokens** (what the reference hub still accepts from pre-standardization
publishers and subscribers in its compatibility mode, ``deprecated_claim``): a
token with no ``authorization_details`` but a ``mercure`` claim (or its
namespaced spelling ``https://mercure.rocks/``, which wins when both are there)
``{"publish": [...], "subscribe": [...], "payload": ...}``. Its lists hold topic
selectors read the legacy way (exact, ``*``, or an RFC 6570 URI template:
:meth:`api.mercure.matchers.Matchers.from_legacy_selectors`); a list that is
absent grants nothing, an empty one grants nothing either; ``payload`` is the
subscribe grant's payload. Like the reference hub, such a token need not be
typed ``at+jwt`` (no ``typ``, or ``JWT``, are accepted too: legacy tokens predate
RFC 9068) and need not carry ``aud`` (checked when present). Everything else is
validated as for any token (signature, allowlisted ``alg``, ``exp`` required,
``nbf``, ``iss``). A token with ``authorization_details`` is never read the
legacy way, and its ``mercure`` claim is ignored.

**Error Responses.** :class:`BearerError` carries the status and the exact
``WWW-Authenticate: Bearer`` challenge: no token where one is needed -> 401
with no error code; a token that fails validation or carries bad Mercure
details -> 401 ``error="invalid_token"`` (one description for every cause:
the spec asks not to disclose why; the cause is kept in ``reason`` for the
log); a valid token that does not grant the operation -> 403
``error="insufficient_scope"``; a malformed presentation -> 400
``error="invalid_request"``. ``resource_metadata`` (RFC 9728) and ``realm``
are added when the hub configures them, on every challenge.

Verified tokens are cached like :mod:`api.auth.verifier` does: bounded, keyed by
the token, until ``exp``, emptied when the key set changes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import jwt

from api.auth.cache import CachedVerifier, TokenCache
from api.auth.keys import KeySource, UnknownKey
from api.auth.verifier import describe
from api.mercure.matchers import DEFAULT_HUB_URL, Matcher, MatcherError, Matchers

ACCESS_TOKEN_TYPE: Final = "at+jwt"
LEGACY_TOKEN_TYPES: Final = frozenset({"jwt", "application/jwt"})
"""``typ`` values (lower-cased) a legacy ``mercure``-claim token may carry besides at+jwt, or no typ at all."""
LEGACY_CLAIMS: Final = ("https://mercure.rocks/", "mercure")
"""The pre-standardization claim, namespaced spelling first (it wins, as in the reference hub)."""
MERCURE_DETAIL_TYPES: Final = frozenset({"mercure", "https://mercure.rocks/authorization-detail"})
"""The spec's ``mercure``, and the URI the reference hub's documentation and Symfony's component use."""
PUBLISH: Final = "publish"
SUBSCRIBE: Final = "subscribe"

RECOMMENDED_COOKIE_NAME: Final = "__Secure-mercure_access_token"
""""Cookie": the name the spec recommends."""
LEGACY_COOKIE_NAME: Final = "mercureAuthorization"
"""The cookie pre-standardization hubs read (appendix "Changes from Pre-Standardization Deployments")."""
QUERY_PARAMETER: Final = "access_token"

MAX_TOKEN_LENGTH: Final = 16 * 1024
"""Characters of a token; a longer one is an invalid token (401)."""
MAX_AUTHORIZATION_DETAILS: Final = 100
"""Mercure authorization details in one token ("Authorization Details": over it, invalid_token)."""
MAX_TOKEN_MATCHERS: Final = 200
"""Topic matchers of one token, all Mercure details together (each ``topics`` array also <= MAX_MATCHERS)."""
CACHE_SIZE: Final = 10_000
"""Verified tokens kept at most; past it, expired ones go first, then the oldest."""

INVALID_TOKEN_DESCRIPTION: Final = "The access token is invalid"

_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_DESCRIPTION_UNSAFE: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


# -- Error Responses -----------------------------------------------------------------------------------------------


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(
    error: str | None = None,
    description: str | None = None,
    *,
    realm: str | None = None,
    resource_metadata: str | None = None,
) -> str:
    """An RFC 6750 ``WWW-Authenticate`` value: ``Bearer`` and its auth-params (realm first, as RFC 6750 shows)."""
    params: list[str] = []
    if realm is not None:
        params.append(f"realm={_quoted(realm)}")
    if error is not None:
        params.append(f'error="{error}"')
        if description:
            # RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E.
            params.append(f'error_description="{_DESCRIPTION_UNSAFE.sub("?", description)}"')
    if resource_metadata is not None:
        params.append(f"resource_metadata={_quoted(resource_metadata)}")
    return "Bearer " + ", ".join(params) if params else "Bearer"


class BearerError(Exception):
    """An authorization failure as "Error Responses" prescribes: ``status`` and the ``WWW-Authenticate`` challenge."""

    def __init__(
        self,
        status: int,
        error: str | None,
        description: str | None = None,
        *,
        reason: str | None = None,
        realm: str | None = None,
        resource_metadata: str | None = None,
    ) -> None:
        super().__init__(reason or description or error or "an access token is required")
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason or description
        """Why, for the log (an invalid token's challenge does not say)."""
        self.realm = realm
        self.resource_metadata = resource_metadata

    @property
    def challenge(self) -> str:
        return bearer_challenge(
            self.error, self.description, realm=self.realm, resource_metadata=self.resource_metadata
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge}

    def with_parameters(self, *, realm: str | None = None, resource_metadata: str | None = None) -> BearerError:
        """The same error with the hub's challenge parameters (for errors raised where they were not known)."""
        return BearerError(
            self.status,
            self.error,
            self.description,
            reason=self.reason,
            realm=realm if realm is not None else self.realm,
            resource_metadata=resource_metadata if resource_metadata is not None else self.resource_metadata,
        )


def missing_token(*, realm: str | None = None, resource_metadata: str | None = None) -> BearerError:
    """401, a ``Bearer`` challenge with no error code: the operation needs a token and none was presented."""
    return BearerError(401, None, realm=realm, resource_metadata=resource_metadata)


def invalid_token(reason: str, *, realm: str | None = None, resource_metadata: str | None = None) -> BearerError:
    """401 ``invalid_token``; the challenge's description is the same whatever ``reason`` is."""
    return BearerError(
        401, "invalid_token", INVALID_TOKEN_DESCRIPTION, reason=reason, realm=realm, resource_metadata=resource_metadata
    )


def insufficient_scope(
    description: str, *, realm: str | None = None, resource_metadata: str | None = None
) -> BearerError:
    """403 ``insufficient_scope``: a valid token that does not grant the operation."""
    return BearerError(403, "insufficient_scope", description, realm=realm, resource_metadata=resource_metadata)


def invalid_request(description: str, *, realm: str | None = None, resource_metadata: str | None = None) -> BearerError:
    """400 ``invalid_request``: the token's presentation is malformed."""
    return BearerError(400, "invalid_request", description, realm=realm, resource_metadata=resource_metadata)


# -- Presenting the Access Token -----------------------------------------------------------------------------------

HeaderItems = Iterable[tuple[bytes | str, bytes | str]]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _header_items(headers: Any) -> list[tuple[str, str]]:
    raw = getattr(headers, "raw", headers)  # a Starlette Headers, or ASGI (name, value) pairs
    return [(_text(name).lower(), _text(value)) for name, value in raw]


def _bearer(values: list[str]) -> str | None:
    tokens: list[str] = []
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            continue  # another scheme: no bearer token here
        tokens.append(rest.strip(" "))
    if not tokens:
        return None
    if len(tokens) > 1:
        raise invalid_request("more than one Authorization: Bearer header")
    token = tokens[0]
    if not token:
        raise invalid_request("the Authorization header has no token after Bearer")
    if not _TOKEN68.fullmatch(token):
        raise invalid_request("the Authorization: Bearer token is not a token68")
    return token


def _cookies(values: list[str]) -> dict[str, str]:
    jar: dict[str, str] = {}
    for header in values:
        for pair in header.split(";"):
            name, sep, value = pair.strip().partition("=")
            if not sep or not name:
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            jar.setdefault(name.strip(), value)  # the first of a name wins
    return jar


def token_from(
    headers: Any,
    cookie_name: str | Sequence[str] = RECOMMENDED_COOKIE_NAME,
    *,
    query: Iterable[tuple[str, str]] | None = None,
) -> str | None:
    """The access token a request presents, or None; raises :class:`BearerError` (400) for a malformed one.

    ``headers``: ASGI ``(name, value)`` pairs (bytes or str) or a Starlette
    ``Headers``. ``query``: the decoded query pairs, to accept the
    ``access_token`` parameter; None leaves that method off.
    """
    items = _header_items(headers)
    token = _bearer([value for name, value in items if name == "authorization"])
    if token is not None:
        return token
    if query is not None:
        values = [value for name, value in query if name == QUERY_PARAMETER]
        if len(values) > 1:
            raise invalid_request(f"more than one {QUERY_PARAMETER} query parameter")
        if values:
            if not _TOKEN68.fullmatch(values[0]):
                raise invalid_request(f"the {QUERY_PARAMETER} query parameter is not a token")
            return values[0]
    jar = _cookies([value for name, value in items if name == "cookie"])
    for name in (cookie_name,) if isinstance(cookie_name, str) else cookie_name:
        value = jar.get(name)
        if value:
            return value
    return None


# -- Authorization Details -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscribeDetail:
    """A Mercure detail granting ``subscribe``: its topics and its ``payload`` ("Payloads")."""

    topics: Matchers
    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class MercureGrant:
    """What a verified token allows: ``publish``/``subscribe`` topic matchers (None: that action is not granted)."""

    publish: Matchers | None
    subscribe: Matchers | None
    expires_at: float
    """The token's ``exp`` (seconds since the epoch): no stream opened with it outlives it ("Subscribers")."""
    subject: str | None = None
    issuer: str | None = None
    subscribe_details: tuple[SubscribeDetail, ...] = ()

    def may_publish(self, topic: str) -> bool:
        """ "Publishers": a detail with ``publish`` one of whose topics matches."""
        return self.publish is not None and self.publish.matches(topic)

    def may_receive(self, topic: str) -> bool:
        """ "Subscribers": a private update on ``topic`` may be delivered (a detail with ``subscribe`` matches it)."""
        return self.subscribe is not None and self.subscribe.matches(topic)

    def subscription_payload(self, matcher: Matcher) -> dict[str, Any] | None:
        """ "Payloads": the payload of the first ``subscribe`` detail whose topics match the subscription's matcher.

        The subscription's own matcher string is matched as if it were a topic.
        """
        for detail in self.subscribe_details:
            if detail.topics.matches(matcher.value):
                return detail.payload
        return None


def grant_from_claims(claims: Mapping[str, Any], *, base_url: str = DEFAULT_HUB_URL) -> MercureGrant:
    """The grant of a verified token's claims. Raises :class:`BearerError` (invalid_token) when they are malformed."""
    expires_at = claims.get("exp")
    if not _is_number(expires_at):
        raise invalid_token("the exp claim is required and must be a number")
    subject = claims.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise invalid_token("the sub claim must be a string")
    issuer = claims.get("iss")
    if issuer is not None and not isinstance(issuer, str):
        raise invalid_token("the iss claim must be a string")
    publish: list[Matchers] = []
    subscribe: list[SubscribeDetail] = []
    if is_legacy_claims(claims):
        publish, subscribe = _legacy_grant(claims, base_url)
    elif "authorization_details" in claims:
        details = claims["authorization_details"]
        if not isinstance(details, list):
            raise invalid_token("authorization_details must be an array")
        mercure = 0
        matchers = 0
        for detail in details:
            if not isinstance(detail, dict) or not isinstance(detail.get("type"), str):
                raise invalid_token("each authorization detail must be an object with a string type (RFC 9396)")
            if detail["type"] not in MERCURE_DETAIL_TYPES:
                continue
            mercure += 1
            if mercure > MAX_AUTHORIZATION_DETAILS:
                raise invalid_token(f"more than {MAX_AUTHORIZATION_DETAILS} mercure authorization details")
            actions = detail.get("actions")
            if not isinstance(actions, list) or not actions or not all(isinstance(a, str) for a in actions):
                raise invalid_token("a mercure authorization detail needs a non-empty array of string actions")
            topics = detail.get("topics")
            matchers += len(topics) if isinstance(topics, list) else 0
            if matchers > MAX_TOKEN_MATCHERS:
                raise invalid_token(f"more than {MAX_TOKEN_MATCHERS} topic matchers in the token")
            try:
                granted = Matchers.from_token_topics(topics, base_url=base_url)
            except MatcherError as exc:
                raise invalid_token(f"a mercure authorization detail's topics: {exc}") from None
            payload = detail.get("payload")
            if "payload" in detail and not isinstance(payload, dict):
                raise invalid_token("a mercure authorization detail's payload must be an object")
            if PUBLISH in actions:
                publish.append(granted)
            if SUBSCRIBE in actions:
                subscribe.append(SubscribeDetail(granted, payload))
    return MercureGrant(
        publish=Matchers.union(*publish) if publish else None,
        subscribe=Matchers.union(*(d.topics for d in subscribe)) if subscribe else None,
        expires_at=float(expires_at),
        subject=subject,
        issuer=issuer,
        subscribe_details=tuple(subscribe),
    )


def is_legacy_claims(claims: Mapping[str, Any]) -> bool:
    """A legacy token: no ``authorization_details``, a ``mercure`` claim (either spelling)."""
    return "authorization_details" not in claims and any(name in claims for name in LEGACY_CLAIMS)


def _legacy_grant(claims: Mapping[str, Any], base_url: str) -> tuple[list[Matchers], list[SubscribeDetail]]:
    claim = next(claims[name] for name in LEGACY_CLAIMS if name in claims)
    if not isinstance(claim, dict):
        raise invalid_token("the mercure claim must be an object")
    payload = claim.get("payload")
    publish: list[Matchers] = []
    subscribe: list[SubscribeDetail] = []
    for action in (PUBLISH, SUBSCRIBE):
        if claim.get(action) is None:
            continue
        try:
            granted = Matchers.from_legacy_selectors(claim[action], base_url=base_url)
        except MatcherError as exc:
            raise invalid_token(f"the mercure claim's {action}: {exc}") from None
        if not len(granted):
            continue  # an empty list grants nothing
        if action == PUBLISH:
            publish.append(granted)
        else:
            subscribe.append(SubscribeDetail(granted, payload if isinstance(payload, dict) else None))
    return publish, subscribe


# -- Token Validation ----------------------------------------------------------------------------------------------


def is_access_token_type(typ: object) -> bool:
    """RFC 9068 / RFC 7515 section 4.1.9: ``at+jwt``, case-insensitively, ``application/`` prefix optional."""
    if not isinstance(typ, str):
        return False
    value = typ.lower()
    if value.startswith("application/"):
        value = value[len("application/") :]
    return value == ACCESS_TOKEN_TYPE


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class MercureTokenVerifier(CachedVerifier[MercureGrant]):
    """Turns a token into a :class:`MercureGrant`, or raises :class:`BearerError` (or ``KeysUnavailable``).

    ``keys``: Herald's key source (:mod:`api.auth.keys`), or a mapping of
    issuer to key source (then a token is checked with its issuer's keys
    only, and the trusted issuers are the mapping's keys unless given).
    ``audience``: the hub's resource identifier (``HERALD_MERCURE_AUDIENCE``);
    ``issuers``: the trusted issuers (``HERALD_MERCURE_ISSUERS``; empty: no
    ``iss`` check). ``base_url``: the hub's URL, the base of relative URL
    patterns. ``realm``/``resource_metadata`` go into every challenge.
    """

    def __init__(
        self,
        keys: KeySource | Mapping[str, KeySource],
        *,
        audience: str,
        issuers: Iterable[str] = (),
        leeway: float = 30.0,
        base_url: str = DEFAULT_HUB_URL,
        realm: str | None = None,
        resource_metadata: str | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if not audience:
            raise ValueError("the hub's resource identifier (the audience tokens must name) is required")
        self._by_issuer: Mapping[str, KeySource] | None = keys if isinstance(keys, Mapping) else None
        self._keys: KeySource | None = None if isinstance(keys, Mapping) else keys
        trusted = tuple(issuers)
        if self._by_issuer is not None and not trusted:
            trusted = tuple(self._by_issuer)
        self.audience = audience
        self.issuers = frozenset(trusted)
        self.leeway = leeway
        self.base_url = base_url
        self.realm = realm
        self.resource_metadata = resource_metadata
        self._cache: TokenCache[MercureGrant] = TokenCache(cache_size)

    def _key_generation(self) -> tuple[int, ...]:
        if self._by_issuer is not None:
            return tuple(source.generation for source in self._by_issuer.values())
        assert self._keys is not None
        return (self._keys.generation,)

    # errors carrying the hub's challenge parameters

    def missing_token(self) -> BearerError:
        return missing_token(realm=self.realm, resource_metadata=self.resource_metadata)

    def invalid_token(self, reason: str) -> BearerError:
        return invalid_token(reason, realm=self.realm, resource_metadata=self.resource_metadata)

    def insufficient_scope(self, description: str) -> BearerError:
        return insufficient_scope(description, realm=self.realm, resource_metadata=self.resource_metadata)

    def invalid_request(self, description: str) -> BearerError:
        return invalid_request(description, realm=self.realm, resource_metadata=self.resource_metadata)

    # the decisions

    async def authenticate(
        self,
        headers: Any,
        cookie_name: str | Sequence[str] = RECOMMENDED_COOKIE_NAME,
        *,
        query: Iterable[tuple[str, str]] | None = None,
    ) -> MercureGrant | None:
        """The grant of the request's token (:func:`token_from`), None when it presents none. Raises BearerError."""
        try:
            token = token_from(headers, cookie_name, query=query)
        except BearerError as exc:
            raise exc.with_parameters(realm=self.realm, resource_metadata=self.resource_metadata) from None
        return None if token is None else await self.verify(token)

    def require_publish(self, grant: MercureGrant | None, topic: str) -> MercureGrant:
        """ "Publishers": the grant, or 401 (no token) / 403 ``insufficient_scope``."""
        if grant is None:
            raise self.missing_token()
        if not grant.may_publish(topic):
            raise self.insufficient_scope("the access token does not grant publish on this topic")
        return grant

    def require_subscribe(self, grant: MercureGrant | None, topic: str) -> MercureGrant:
        """Subscribe on ``topic`` (the subscription API's relative URL, "Subscription API"): 401 / 403 otherwise."""
        if grant is None:
            raise self.missing_token()
        if not grant.may_receive(topic):
            raise self.insufficient_scope("the access token does not grant subscribe on this resource")
        return grant

    async def verify(self, token: str) -> MercureGrant:
        return await self._cache.through(token, self._key_generation(), self._verify, BearerError)

    async def _verify(self, token: str) -> MercureGrant:
        if len(token) > MAX_TOKEN_LENGTH:
            raise self.invalid_token(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
        if token.count(".") != 2:
            raise self.invalid_token("not a JWS in compact serialization")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise self.invalid_token(f"malformed token: {exc}") from None
        typ = header.get("typ")
        legacy = False
        if not is_access_token_type(typ):
            legacy = (typ is None or (isinstance(typ, str) and typ.lower() in LEGACY_TOKEN_TYPES)) and (
                self._is_legacy(token)
            )
            if not legacy:
                raise self.invalid_token(f"the token's typ is {typ!r}, not at+jwt")
        if "crit" in header:
            raise self.invalid_token("the token has critical header parameters this hub does not understand")
        alg = header.get("alg")
        source = self._source_for(token)
        if not isinstance(alg, str) or alg not in source.algorithms:
            raise self.invalid_token(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        try:
            key = await source.key_for(kid if isinstance(kid, str) else None, alg)
        except UnknownKey as exc:
            raise self.invalid_token(str(exc)) from None
        if alg not in key.algorithms:
            raise self.invalid_token(f"algorithm {alg!r} is not accepted for this key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "aud"], "verify_iat": False},
            )
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim != "aud":
                raise self.invalid_token(describe(exc, "this hub (aud)")) from None
            # A legacy token (whatever its typ) may go without aud; one it carries is checked.
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    leeway=self.leeway,
                    options={"require": ["exp"], "verify_iat": False, "verify_aud": False},
                )
            except jwt.PyJWTError as inner:
                raise self.invalid_token(describe(inner, "this hub (aud)")) from None
            if "aud" in claims or not is_legacy_claims(claims):
                raise self.invalid_token("the token has no aud claim") from None
        except jwt.PyJWTError as exc:
            raise self.invalid_token(describe(exc, "this hub (aud)")) from None
        if legacy and not is_legacy_claims(claims):
            raise self.invalid_token(f"the token's typ is {typ!r}, not at+jwt")
        # PyJWT gives exp the leeway and reads numbers from strings: exp gets none and must be a number.
        if not _is_number(claims["exp"]) or claims["exp"] <= time.time():
            raise self.invalid_token("the token has expired (or its exp is not a number)")
        if "nbf" in claims and not _is_number(claims["nbf"]):
            raise self.invalid_token("the token's nbf is not a number")
        if self.issuers and claims.get("iss") not in self.issuers:
            raise self.invalid_token("the token is not from a trusted issuer")
        try:
            return grant_from_claims(claims, base_url=self.base_url)
        except BearerError as exc:
            raise exc.with_parameters(realm=self.realm, resource_metadata=self.resource_metadata) from None

    def _is_legacy(self, token: str) -> bool:
        """The unverified claims are a legacy token's (:func:`is_legacy_claims`); checked again once verified."""
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return is_legacy_claims(unverified)

    def _source_for(self, token: str) -> KeySource:
        if self._by_issuer is None:
            assert self._keys is not None
            return self._keys
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise self.invalid_token(f"malformed token: {exc}") from None
        issuer = unverified.get("iss")
        source = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if source is None:
            raise self.invalid_token("the token is not from a trusted issuer")
        return source
