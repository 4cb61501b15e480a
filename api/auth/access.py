"""Who may publish to, subscribe to, and administer a node: the decisions, apart from any transport.

Both entrances of ``GET /events`` (the ASGI shortcut and the FastAPI route),
``POST /publish`` and the admin routes ask the same :class:`Access` before
anything happens, the way centrifuge's subscribe/publish handlers decide
ahead of the work. Each entrance only finds the token (see :mod:`api.auth.credentials`)
and turns a refusal into its own answer. What a stream may see is decided
once, at connect, for every topic it asks for, and travels with the stream
as its deadline: nothing is looked up per event on the fan-out path.

With no key configured (:attr:`Access.enabled` false) everything is allowed,
as before access control existed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from api.auth.keys import JwksKeys, KeyConfigError, KeySource, StaticKey
from api.auth.selectors import NOTHING, InvalidSelector, TopicMatcher, parse_selector_list
from api.auth.verifier import Grant, InvalidToken, TokenVerifier
from api.models import is_reserved
from api.settings import Settings

REALM = "herald"
ALLOWED_KEPT = 1024
"""Subscriptions whose answer :meth:`Access.authorize_subscribe_now` keeps (then it starts over)."""

log = logging.getLogger("herald.auth")


class Denied(Exception):
    """A refusal: ``401`` (no usable token) or ``403`` (a token that does not allow it), RFC 6750 style."""

    def __init__(self, status_code: int, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.error = error
        """RFC 6750 error code: ``invalid_token`` (a token was given and is unusable), ``insufficient_scope``."""

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` header value."""
        if self.error is None:
            return f'Bearer realm="{REALM}"'
        description = self.detail.replace("\\", "\\\\").replace('"', '\\"')
        return f'Bearer realm="{REALM}", error="{self.error}", error_description="{description}"'


def _unauthenticated(why: str) -> Denied:
    return Denied(401, why)


def _invalid(why: str) -> Denied:
    return Denied(401, why, "invalid_token")


def _insufficient(why: str) -> Denied:
    return Denied(403, why, "insufficient_scope")


class Access:
    """The node's access policy. Build with :meth:`from_settings`; ``start`` / ``close`` in the lifespan."""

    def __init__(self, verifier: TokenVerifier | None, public_topics: TopicMatcher = NOTHING) -> None:
        self.verifier = verifier
        # authorize_subscribe_now's answers: (token, topics) -> (key set generation, grant).
        self._allowed: dict[tuple[str | None, tuple[str, ...]], tuple[int, Grant | None]] = {}
        self.public_topics = public_topics
        self._logged_at = float("-inf")
        self._refused_since_log = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        """The policy the settings describe. Raises KeyConfigError for a configuration to refuse."""
        sources = [
            name
            for name, value in (
                ("HERALD_JWT_SECRET", settings.jwt_secret),
                ("HERALD_JWT_PUBLIC_KEY", settings.jwt_public_key),
                ("HERALD_JWKS_URL", settings.jwks_url),
            )
            if value
        ]
        if len(sources) > 1:
            raise KeyConfigError(f"set one of {', '.join(sources)}, not several")
        keys: KeySource
        if settings.jwt_secret:
            keys = StaticKey.from_secret(settings.jwt_secret.get_secret_value(), settings.jwt_algorithms)
        elif settings.jwt_public_key:
            keys = StaticKey.from_public_key(settings.jwt_public_key, settings.jwt_algorithms)
        elif settings.jwks_url:
            keys = JwksKeys(settings.jwks_url, settings.jwt_algorithms)
        else:
            if settings.jwt_algorithms:
                raise KeyConfigError("HERALD_JWT_ALGORITHMS is set but no key is (HERALD_JWT_SECRET, ...)")
            return cls(None)
        public = parse_selector_list(settings.public_topics or "")
        if any("{sub}" in selector for selector in public):
            raise KeyConfigError("HERALD_PUBLIC_TOPICS: {sub} means nothing without a token")
        verifier = TokenVerifier(
            keys, audience=settings.jwt_audience, issuer=settings.jwt_issuer, leeway=settings.jwt_leeway
        )
        try:
            public_topics = TopicMatcher(public)
        except InvalidSelector as exc:
            raise KeyConfigError(f"HERALD_PUBLIC_TOPICS: {exc}") from None
        return cls(verifier, public_topics)

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def stats(self) -> dict[str, int]:
        """Tokens verified (cache misses that passed), refused, and held in the cache."""
        if self.verifier is None:
            return {}
        return {
            "tokens_verified": self.verifier.verified,
            "tokens_rejected": self.verifier.rejected,
            "tokens_cached": self.verifier.cached,
        }

    async def start(self) -> None:
        if self.verifier is not None:
            await self.verifier.keys.start()

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.keys.close()

    async def _grant(self, token: str | None) -> Grant:
        assert self.verifier is not None
        if token is None:
            raise _unauthenticated("this needs a token: Authorization: Bearer <token>")
        try:
            return await self.verifier.verify(token)
        except InvalidToken as exc:
            self._log_refusal(str(exc))
            raise _invalid(str(exc)) from None

    def _log_refusal(self, why: str) -> None:
        """At most a line a second, with the count since the last one: never the token, never a flood."""
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            log.warning(
                "refused %d tokens; the last: %s",
                self._refused_since_log,
                why,
                extra={"tokens_refused": self._refused_since_log},
            )
            self._logged_at = now
            self._refused_since_log = 0

    async def authorize_subscribe(self, token: str | None, topics: Sequence[str]) -> Grant | None:
        """May a client read ``topics``? The grant whose expiry ends the stream, None when none applies.

        Raises :class:`Denied`, or ``KeysUnavailable`` (a passing cause: the client should retry).
        Public topics (``HERALD_PUBLIC_TOPICS``) need no token; when every
        topic asked for is public, a token is not even looked at.
        """
        if self.verifier is None:
            return None
        private = [t for t in topics if not self.public_topics.covers(t) or is_reserved(t)]
        if not private:
            return None
        grant = await self._grant(token)
        reserved = next((t for t in private if is_reserved(t)), None)
        if reserved is not None and not grant.admin:
            raise _insufficient(f"topic {reserved!r} is the nodes' own: it needs a token with admin rights")
        refused = grant.subscribe.first_uncovered([t for t in private if not is_reserved(t)])
        if refused is not None:
            raise _insufficient(f"the token does not allow subscribing to topic {refused!r}")
        return grant

    def authorize_subscribe_now(self, token: str | None, topics: tuple[str, ...]) -> tuple[bool, Grant | None]:
        """:meth:`authorize_subscribe` when it allows the client with nothing to await: ``(True, grant)``.

        That is without access control, for public topics only, or with a
        token that verifies with nothing awaited (cached, or checked with a
        key already held: :meth:`TokenVerifier.verify_now`) and covers every
        topic. Anything else is ``(False, None)``, with nothing logged or
        counted: keys to fetch, or a refusal, which :meth:`authorize_subscribe`
        makes and reports.
        """
        verifier = self.verifier
        if verifier is None:
            return True, None
        # A connect storm asks the same few questions thousands of times: the answers are kept while their
        # grant is valid and the keys unchanged (a new key set, or the grant's exp, and the question is new).
        generation = verifier.keys.generation
        kept = self._allowed.get((token, topics))
        if kept is not None and kept[0] == generation and (kept[1] is None or time.time() < kept[1].expires_at):
            return True, kept[1]
        private = [t for t in topics if not self.public_topics.covers(t) or is_reserved(t)]
        grant = None
        if private:
            grant = verifier.verify_now(token) if token is not None else None
            if (
                grant is None
                or (not grant.admin and any(is_reserved(t) for t in private))
                or grant.subscribe.first_uncovered([t for t in private if not is_reserved(t)]) is not None
            ):
                return False, None
        if len(self._allowed) >= ALLOWED_KEPT:
            self._allowed.clear()
        self._allowed[token, topics] = (generation, grant)
        return True, grant

    async def authorize_publish(self, token: str | None, topics: Sequence[str]) -> None:
        """May a producer publish to every one of ``topics``? Raises :class:`Denied` if not."""
        self.check_publish(await self.authenticate_publisher(token), topics)

    async def authenticate_publisher(self, token: str | None) -> Grant | None:
        """The publisher's grant, checked before its body is read (401 early); None with auth off."""
        if self.verifier is None:
            return None
        return await self._grant(token)

    @staticmethod
    def check_publish(grant: Grant | None, topics: Sequence[str]) -> None:
        """:meth:`authorize_publish`'s scope half, for a grant already authenticated."""
        if grant is None:
            return
        refused = grant.publish.first_uncovered(topics)
        if refused is not None:
            raise _insufficient(f"the token does not allow publishing to topic {refused!r}")

    async def authorize_admin(self, token: str | None) -> None:
        """May this client read the node's operational endpoints (/stats, ...)? Raises :class:`Denied` if not."""
        if self.verifier is None:
            return
        grant = await self._grant(token)
        if not grant.admin:
            raise _insufficient("this needs a token with admin rights")
