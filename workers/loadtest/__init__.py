"""Herald's load tool: ``python -m workers.loadtest --help``.

Subscribers that behave like EventSource and check every event (lost,
duplicated, out of order), a publisher at a steady rate with a ledger of
what was accepted, latency per node from ``X-Node-Id``, optional faults on a
local cluster, and a result as a table, JSON and an HTML report. Against
nodes with access control on, every subscriber and publisher sends an access
token (``--token``, or one minted from ``HERALD_JWT_SECRET`` for the run's
topics), which is never printed nor written to the result. Before and after
the run it reads every node's ``/metrics`` and sets the nodes' own counts
(deliveries, bytes, cut-offs, resets, publishes, streams) beside its own,
flagging any mismatch (:mod:`workers.loadtest.server_counts`).

``--protocol mercure`` drives the nodes' Mercure hub instead of Herald's own
API: subscribers on ``/.well-known/mercure?match=<topic>`` (resuming with
``Last-Event-ID``; a resume answered ``Mercure-Last-Event-ID: earliest``
counts as a reset), one update per publish request (a form POSTed to
``/.well-known/mercure``, 200 accepted), a Mercure token (``--token``, or
minted from ``HERALD_JWT_SECRET`` for ``HERALD_MERCURE_AUDIENCE`` /
``--mercure-audience``); the accounting is the same.
"""
