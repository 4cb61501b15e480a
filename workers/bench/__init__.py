"""``make bench``: Herald against its peers, and against another commit of itself (:mod:`workers.bench.baseline`)."""
