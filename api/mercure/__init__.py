"""A Mercure hub on every Herald node (issue 14), following the Mercure protocol (``spec/mercure.md``, 1.0).

* :mod:`api.mercure.matchers`: topic matchers (``match``, ``match_exact``,
  ``match_urlpattern``, the ``*`` wildcard) from a subscribe query or a
  token's ``topics`` lists, and the publication-side topic checks (the
  reserved hub namespace, forbidden characters, limits);
* :mod:`api.mercure.authorization`: access tokens (RFC 9068 ``at+jwt``,
  ``authorization_details``) into a :class:`~api.mercure.authorization.MercureGrant`,
  where a request's token is, and the RFC 6750 ``WWW-Authenticate: Bearer``
  challenges of the spec's "Error Responses";
* :mod:`api.mercure.updates`: how Mercure updates flow through the broker
  (one hub-wide ordered sequence: every update is one event of the reserved
  topic ``_herald/mercure``);
* :mod:`api.mercure.space`: the hub's Mercure topic space: how the hub decodes
  that topic's events into deliveries of Mercure topics, and Mercure's cursors
  on resume (the fan-out, by exact topic and by pattern group, is the hub's
  own: :mod:`api.core.routing`);
* :mod:`api.mercure.subscriptions`: active subscriptions (events and the API);
* :mod:`api.mercure.routes`: the ``/.well-known/mercure`` endpoint (publish,
  subscribe: a thin caller of :mod:`api.subscribe`) wired into the app.

:mod:`~api.mercure.matchers` and :mod:`~api.mercure.authorization` are pure
(no I/O but the key source's): the endpoint turns their exceptions into
responses (:class:`~api.mercure.matchers.MatcherError` and
:class:`~api.mercure.authorization.BearerError` carry the status).
"""
