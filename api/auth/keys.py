"""Where verification keys come from: a shared secret, a public key, or a JWKS URL.

The algorithms a token may use are decided here, from configuration and the
key's own type, never from the token: a token's ``alg`` header only picks
among them. So ``none`` is never accepted, an HMAC algorithm is never paired
with a public key (the classic confusion where the public key's bytes become
an HMAC secret), and an RSA key never verifies an ECDSA signature.

:class:`JwksKeys` fetches a JSON Web Key Set, keeps it, and fetches it again
when a token names a ``kid`` it does not hold (a rotation: the issuer
published a new key), at most once a second however many such tokens arrive,
and every few minutes in any case (a key withdrawn from the set stops being
accepted). A set that can't be fetched is :class:`KeysUnavailable`: a passing
cause, answered as one (a retry), not as the client's fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

if TYPE_CHECKING:
    import httpx  # imported when a JWKS is fetched: a node without one starts without it (0.15 s of imports)

log = logging.getLogger("herald.auth")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = frozenset({"ES256", "ES256K", "ES384", "ES512"})
OKP_ALGORITHMS = frozenset({"EdDSA"})
PUBLIC_KEY_ALGORITHMS = RSA_ALGORITHMS | EC_ALGORITHMS | OKP_ALGORITHMS
KNOWN_ALGORITHMS = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS

DEFAULT_SECRET_ALGORITHMS = ("HS256",)
DEFAULT_PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256", "EdDSA")
MIN_SECRET_BYTES = 32

JWKS_REFRESH_INTERVAL = 1.0
"""Seconds between fetches caused by unknown ``kid`` s (a flood of made-up kids costs one fetch a second)."""
JWKS_MAX_AGE = 300.0
"""Seconds a fetched key set is used before it is fetched again (withdrawn keys stop working within this)."""
JWKS_TIMEOUT = 5.0


class KeyConfigError(ValueError):
    """The key configuration is unusable: the node refuses to start, saying why."""


class KeysUnavailable(Exception):
    """The keys can't be had now (the JWKS endpoint is unreachable): a passing cause."""


class UnknownKey(Exception):
    """The token names a key (``kid``) the key source does not hold."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A key and the algorithms it may verify."""

    key: Any
    algorithms: frozenset[str]


class KeySource(Protocol):
    """Hands the verifier the key for a token's ``kid`` and ``alg``."""

    algorithms: frozenset[str]
    """Every algorithm a token may be signed with."""

    async def start(self) -> None:
        """Get ready (fetch what must be fetched); never raises for a passing cause."""

    async def close(self) -> None: ...

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey:
        """The key to verify a token with ``kid``/``alg``. Raises UnknownKey or KeysUnavailable."""

    def key_now(self, kid: str | None, alg: str) -> VerificationKey | None:
        """:meth:`key_for`'s key when it is held and current (nothing to fetch), else None. Never raises."""

    @property
    def generation(self) -> int:
        """Changes whenever the set of keys changes (the verifier drops what it verified with the old set)."""


def algorithms_for_key(key: Any) -> frozenset[str]:
    """The algorithms that can verify with a public key of this type."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKP_ALGORITHMS
    return frozenset()


def parse_algorithms(text: str | None, *, secret: bool) -> frozenset[str]:
    """``HERALD_JWT_ALGORITHMS`` checked against the kind of key configured."""
    names = [a.strip() for a in text.split(",") if a.strip()] if text else []
    if not names:
        names = list(DEFAULT_SECRET_ALGORITHMS if secret else DEFAULT_PUBLIC_KEY_ALGORITHMS)
    for name in names:
        if name.lower() == "none":
            raise KeyConfigError("HERALD_JWT_ALGORITHMS: 'none' is never accepted (an unsigned token proves nothing)")
        if name not in KNOWN_ALGORITHMS:
            known = sorted(KNOWN_ALGORITHMS)
            raise KeyConfigError(f"HERALD_JWT_ALGORITHMS: unknown algorithm {name!r}; known: {known}")
        if secret and name not in HMAC_ALGORITHMS:
            raise KeyConfigError(f"HERALD_JWT_ALGORITHMS: {name} needs a public key, but HERALD_JWT_SECRET is set")
        if not secret and name in HMAC_ALGORITHMS:
            raise KeyConfigError(
                f"HERALD_JWT_ALGORITHMS: {name} is an HMAC algorithm; it is never paired with a public key"
            )
    return frozenset(names)


def load_public_key(value: str) -> Any:
    """A PEM public key from ``HERALD_JWT_PUBLIC_KEY``: the PEM text itself, or ``@/path/to/key.pem``."""
    if value.startswith("@"):
        try:
            pem = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise KeyConfigError(f"HERALD_JWT_PUBLIC_KEY: can't read {value[1:]!r}: {exc.strerror}") from None
    else:
        # An environment variable often carries the PEM's line breaks as "\n".
        pem = (value if "\n" in value else value.replace("\\n", "\n")).encode()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"HERALD_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None
    if not algorithms_for_key(key):
        raise KeyConfigError(f"HERALD_JWT_PUBLIC_KEY: unsupported key type {type(key).__name__}")
    return key


class StaticKey:
    """One key from configuration (a secret or a public key); the token's ``kid`` is not consulted."""

    generation = 0

    def __init__(self, key: Any, algorithms: frozenset[str]) -> None:
        self.algorithms = algorithms
        self._key = VerificationKey(key, algorithms)

    @classmethod
    def from_secret(cls, secret: str, algorithms: str | None) -> StaticKey:
        raw = secret.encode()
        if len(raw) < MIN_SECRET_BYTES:
            raise KeyConfigError(
                f"HERALD_JWT_SECRET is {len(raw)} bytes; use at least {MIN_SECRET_BYTES}"
                " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        return cls(raw, parse_algorithms(algorithms, secret=True))

    @classmethod
    def from_public_key(cls, value: str, algorithms: str | None) -> StaticKey:
        key = load_public_key(value)
        allowed = parse_algorithms(algorithms, secret=False) & algorithms_for_key(key)
        if not allowed:
            raise KeyConfigError(
                f"HERALD_JWT_ALGORITHMS has no algorithm for the configured {type(key).__name__}"
                f" (it can verify {sorted(algorithms_for_key(key))})"
            )
        return cls(key, allowed)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey:
        return self._key

    def key_now(self, kid: str | None, alg: str) -> VerificationKey | None:
        return self._key


class JwksKeys:
    """Keys from a JSON Web Key Set URL, refreshed on an unknown ``kid`` (rotation without a restart)."""

    def __init__(self, url: str, algorithms: str | None, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not url.startswith(("https://", "http://")):
            raise KeyConfigError(f"HERALD_JWKS_URL must be an http(s) URL, got {url!r}")
        self.url = url
        self.algorithms = parse_algorithms(algorithms, secret=False)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._keys: dict[str | None, VerificationKey] = {}
        self._fetched_at = float("-inf")  # monotonic time of the last fetch attempt
        self._loaded_at = float("-inf")  # ... of the last successful one
        self._lock = asyncio.Lock()
        self._error: str | None = None  # what the last fetch ran into
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=JWKS_TIMEOUT, transport=self._transport)
        with contextlib.suppress(KeysUnavailable):
            await self._refresh(force=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey:
        stale = time.monotonic() - self._loaded_at > JWKS_MAX_AGE
        key = self._lookup(kid)
        if key is None or stale:
            try:
                await self._refresh(force=False)
            except KeysUnavailable:
                if key is None and not self._keys:
                    raise
            key = self._lookup(kid)
        if key is None:
            raise UnknownKey(f"no key {kid!r} in the key set" if kid else "the token names no key (kid)")
        return key

    def key_now(self, kid: str | None, alg: str) -> VerificationKey | None:
        if time.monotonic() - self._loaded_at > JWKS_MAX_AGE:
            return None  # key_for refreshes the set first
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> VerificationKey | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, *, force: bool) -> None:
        """Fetch the set again (one fetch at a time, at most one a second). Raises KeysUnavailable."""
        seen = self._fetched_at
        async with self._lock:
            if self._fetched_at == seen:  # nobody fetched while this waited for the lock
                wait = 0.0 if force else JWKS_REFRESH_INTERVAL - (time.monotonic() - self._fetched_at)
                if wait > 0:
                    await asyncio.sleep(wait)
                self._error = await self._fetch()
            if self._error is not None:
                raise KeysUnavailable(f"the signing keys can't be fetched now: {self._error}")

    async def _fetch(self) -> str | None:
        """Fetch and install the key set; what went wrong, or None."""
        import httpx

        self._fetched_at = time.monotonic()
        assert self._client is not None, "JwksKeys.start() was not called"
        try:
            response = await self._client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            keys = self._parse(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            log.warning("could not fetch the JWKS from %s: %s", self.url, exc)
            return str(exc) or type(exc).__name__
        if keys != self._keys:
            self._keys = keys
            self._generation += 1
            log.info("JWKS from %s: %d usable keys %s", self.url, len(keys), sorted(str(k) for k in keys))
        self._loaded_at = time.monotonic()
        return None

    def _parse(self, document: Any) -> dict[str | None, VerificationKey]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK set (no 'keys' list)")
        keys: dict[str | None, VerificationKey] = {}
        for item in document["keys"]:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(item)
            except jwt.PyJWTError as exc:
                log.warning("JWKS %s: skipping key %r: %s", self.url, item.get("kid"), exc)
                continue
            allowed = self.algorithms & algorithms_for_key(jwk.key)
            if "alg" in item:  # a key bound to one algorithm verifies that one only
                allowed &= {item["alg"]}
            if allowed:
                keys[jwk.key_id] = VerificationKey(jwk.key, frozenset(allowed))
        return keys
