"""Where a request's token is, for each kind of client.

A browser's native EventSource can't set headers, so a subscriber's token
may come from three places, the first present winning (explicit before
ambient):

1. ``Authorization: Bearer <token>``: fetch-based and server-side clients;
2. the ``access_token`` query parameter: a cross-origin EventSource. URLs end
   up in logs (proxies, browser history), so hand these out short-lived;
   Herald itself never logs one;
3. the cookie named by ``HERALD_JWT_COOKIE``: the same-site browser, with
   ``EventSource(url, {withCredentials: true})`` when the page is on another
   origin of the same site.

A publisher's token comes from the ``Authorization`` header only: a cookie
is sent by the browser on its own, and would let any page the user opens
publish in their name.
"""

from __future__ import annotations

from collections.abc import Iterable
from http.cookies import CookieError, SimpleCookie

QUERY_PARAMETER = "access_token"

Headers = Iterable[tuple[bytes, bytes]]


def bearer_token(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer`` header; ``""`` for an Authorization header of another kind."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                return ""  # present but unusable: refused as an invalid token, not ignored
            return token.strip()
    return None


def cookie_token(headers: Headers, cookie_name: str) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                continue
            morsel = jar.get(cookie_name)
            if morsel is not None and morsel.value:
                return morsel.value
    return None


def subscriber_token(
    headers: Headers, query: Iterable[tuple[str, str]], cookie_name: str, cookie_trusted: bool = True
) -> str | None:
    """The token of a subscribing (or reading) request: header, then query parameter, then cookie.

    ``cookie_trusted`` false (a page of an origin the node does not list, see
    :meth:`api.auth.cors.Cors.trusts_ambient_credentials`) leaves the cookie out.
    """
    headers = list(headers)
    token = bearer_token(headers)
    if token is not None:
        return token
    for name, value in query:
        if name == QUERY_PARAMETER:
            return value
    return cookie_token(headers, cookie_name) if cookie_trusted else None
