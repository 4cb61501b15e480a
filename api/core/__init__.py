"""The node's core: one hub that fans every event out, and what it needs, free of HTTP.

* :mod:`api.core.hub`: the broker's sink; the node's one index of subscriptions
  (:mod:`api.core.routing`), admission, resume, heartbeats, the connection limit.
* :mod:`api.core.routing`: a subscription as a set of selectors (exact topics,
  pattern groups, a reader for private events) and the one fan-out over them.
* :mod:`api.core.subscribe`: the one subscribe decision every entrance calls.
* :mod:`api.core.connection`: one client's bounded outbox.
* :mod:`api.core.flusher`: writes every dirty outbox in rounds.
* :mod:`api.core.stream`: an SSE answer over ASGI (replay, hand-off, waiting for the broker).
* :mod:`api.core.sse`: the SSE wire format (frames, ``reset``, heartbeats).
* :mod:`api.core.metrics`: what the hot path counts, and the Prometheus exposition.
"""
