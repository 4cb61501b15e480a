"""The node's HTTP routes, one module per endpoint family (each a thin caller of :mod:`api.core`).

* :mod:`api.routes.events`: ``GET /events`` (the native subscribe).
* :mod:`api.routes.publish`: ``POST /publish``.
* :mod:`api.routes.health`: ``/healthz``, ``/readyz``.
* :mod:`api.routes.monitoring`: ``/stats``, ``/metrics``, ``/nodes``.
* :mod:`api.routes.dashboard`: the live dashboard page.
* :mod:`api.routes.docs`: ``/docs`` and its assets, served from the package.

The Mercure hub's routes are :mod:`api.mercure.routes`.
"""
