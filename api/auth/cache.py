"""A bounded cache of verified tokens, each kept until it expires.

Shared by the native API's verifier (:mod:`api.auth.verifier`) and the
Mercure hub's (:mod:`api.mercure.authorization`): a connect storm carrying a
few tokens costs a few signature checks and dictionary lookups for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Protocol, TypeVar


class Expiring(Protocol):
    @property
    def expires_at(self) -> float:
        """Seconds since the epoch after which the entry is no longer good."""


T = TypeVar("T", bound=Expiring)


class TokenCache(Generic[T]):
    """Verified tokens, keyed by the token itself; at most ``size``: expired ones go first, then the oldest."""

    def __init__(self, size: int) -> None:
        self._entries: dict[str, T] = {}
        self._size = size
        self._generation: Hashable = None
        self.verified = 0
        """Tokens :meth:`through` verified (cache misses that succeeded)."""
        self.rejected = 0
        """Tokens :meth:`through` found invalid."""

    async def through(
        self,
        token: str,
        generation: Hashable,
        verify: Callable[[str], Awaitable[T]],
        invalid: type[Exception],
    ) -> T:
        """The entry for ``token``: cached, or ``verify(token)``'s (then kept until it expires).

        ``generation`` names the key set: when it differs from the last
        call's, every entry goes first (a token verified with a withdrawn key
        is not good any more). ``invalid`` is what ``verify`` raises for a
        bad token: counted in :attr:`rejected`; anything else (keys
        unreachable: a passing cause) is not counted.
        """
        if generation != self._generation:
            self.clear()
            self._generation = generation
        now = time.time()
        entry = self.get(token, now)
        if entry is not None:
            return entry
        try:
            entry = await verify(token)
        except invalid:
            self.rejected += 1
            raise
        self.verified += 1
        self.put(token, entry, now)
        return entry

    def admit(self, token: str, generation: Hashable, entry: T) -> None:
        """Keep ``entry``, verified by the caller with ``generation``'s keys, as :meth:`through` keeps its own."""
        if generation != self._generation:
            self.clear()
            self._generation = generation
        self.verified += 1
        self.put(token, entry)

    def cached(self, token: str, generation: Hashable) -> T | None:
        """The entry for ``token`` if :meth:`through` would answer it from the cache now, else None.

        Nothing is verified, counted or dropped for a changed ``generation``
        (:meth:`through` does that): for callers that can't wait.
        """
        if generation != self._generation:
            return None
        return self.get(token)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float | None = None) -> T | None:
        """The entry for ``token`` while it has not expired (an expired one is dropped)."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        if (time.time() if now is None else now) < entry.expires_at:
            return entry
        del self._entries[token]
        return None

    def put(self, token: str, entry: T, now: float | None = None) -> None:
        entries = self._entries
        if len(entries) >= self._size:
            moment = time.time() if now is None else now
            for stale in [t for t, e in entries.items() if e.expires_at <= moment]:
                del entries[stale]
            while len(entries) >= self._size:
                del entries[next(iter(entries))]
        entries[token] = entry

    def clear(self) -> None:
        self._entries.clear()


class CachedVerifier(Generic[T]):
    """A verifier that keeps what it verified in a :class:`TokenCache` (``_cache``): the figures the node reports."""

    _cache: TokenCache[T]

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def verified(self) -> int:
        """Tokens verified cryptographically (cache misses that succeeded)."""
        return self._cache.verified

    @property
    def rejected(self) -> int:
        return self._cache.rejected
