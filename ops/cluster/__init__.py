"""A Herald cluster on this machine, without Docker: redis-server, N API nodes, nginx.

``python -m ops.cluster start [--nodes 3] [--front 8080] [--sentinel]`` starts
everything on loopback, writes ``cluster.json``, pid files and logs under
``.run/cluster/`` and prints what runs where. Every other command acts on
that cluster through those files, from any process::

    python -m ops.cluster status [--json]          what runs, and whether it is ready
    python -m ops.cluster restart                  rolling restart of the nodes, one at a time
    python -m ops.cluster stop-node node-1 [--kill]
    python -m ops.cluster start-node node-1
    python -m ops.cluster stop-redis [NAME]        SIGTERM (default: the process named "redis")
    python -m ops.cluster start-redis [NAME]
    python -m ops.cluster failover                 --sentinel clusters: SIGKILL the current primary
    python -m ops.cluster freeze-node node-1       SIGSTOP: the node hangs holding its sockets (a gray-failure drill)
    python -m ops.cluster thaw-node node-1         SIGCONT: it rejoins (docs/operations.md, "Gray failures")
    python -m ops.cluster freeze-redis [NAME]      the same for a redis-server; thaw-redis [NAME] ends it
    python -m ops.cluster token [--publish SEL]... --auth clusters: print an access token
    python -m ops.cluster stop                     stops exactly the processes named in the pid files
    python -m ops.cluster prometheus-config [--compose]   print ops/prometheus.yml (or ops/prometheus-compose.yml)

With ``--auth`` (``make cluster AUTH=1``) access control is on: ``start``
generates a random ``HERALD_JWT_SECRET``, keeps it in ``jwt-secret`` (mode
0600) in the run directory and gives it to every node, at start and at every
restart; ``python -m ops.cluster token [--publish SEL] [--subscribe SEL]
[--admin] [--sub ID] [--ttl S]`` prints a token signed with it (with no rights
given, a development token that may do everything). ``stop`` deletes the
secret: the next cluster gets a new one.

With ``--observe`` (``make cluster OBSERVE=1``) Debian's ``prometheus`` runs
beside the cluster on a loopback port (9090 when free), scraping every
node's ``/metrics`` with the alert rules of ``ops/prometheus-rules.yml``; its
config is ``prometheus.yml`` and its data ``prometheus/`` in the run
directory. With ``--auth`` too, it scrapes with an admin token minted from
the cluster's secret, kept in ``prometheus-token`` (mode 0600) and named in
its config by ``authorization: credentials_file:``. ``ops/prometheus.yml`` is
that config for the default layout (three nodes from port 8001, no access
control), as ``prometheus-config`` renders it; a test checks they agree.

With ``--sentinel`` Redis runs as a primary (``redis``), a replica
(``redis-1``) and three sentinels (``sentinel-0..2``) watching master name
``herald``; the nodes get ``REDIS_SENTINELS``/``REDIS_SENTINEL_MASTER``
instead of ``REDIS_URL``. The tests drive the same :class:`Cluster` on free
ports, so what they check is what ``make cluster`` runs.
"""

from ops.cluster.cluster import NOT_READY, READY, STOPPED, Cluster

__all__ = ["NOT_READY", "READY", "STOPPED", "Cluster"]
