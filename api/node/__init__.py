"""The node as a process: what runs around the app.

* :mod:`api.node.supervisor`: ``HERALD_WORKERS`` worker processes on one port, restarted when they die.
* :mod:`api.node.logs`: JSON or text logs, with tokens kept out.
* :mod:`api.node.registry`: the node's entry in the broker's node directory (``/nodes``).
"""
