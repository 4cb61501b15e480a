"""Herald's tools beside the node: the load tool (``workers.loadtest``), ``make bench`` (``workers.bench``),
the demo producer (``python -m workers.demo``), a one-event producer (``workers.produce``) and the quick
fan-out measurement (``workers.bench_fanout``). None of it runs inside a node.
"""
