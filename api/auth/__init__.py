"""Access control: signed tokens (JWS) for publishers and subscribers, public topics, CORS.

* :mod:`api.auth.selectors`: topic selectors (``*``, ``**``, ``{sub}``);
* :mod:`api.auth.keys`: where verification keys come from and which algorithms they allow;
* :mod:`api.auth.verifier`: verifying a token into a :class:`~api.auth.verifier.Grant`, cached;
* :mod:`api.auth.access`: the decisions (subscribe, publish, admin), transport-free;
* :mod:`api.auth.credentials`: where a request's token is;
* :mod:`api.auth.cors`: which other origins' pages may use the node.

Access control is on when a key is configured (``HERALD_JWT_SECRET``,
``HERALD_JWT_PUBLIC_KEY`` or ``HERALD_JWKS_URL``); off, the node behaves as
it always has.
"""
