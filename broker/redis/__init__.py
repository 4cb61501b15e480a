"""The Redis broker: one replay stream per topic, one pub/sub feed per node.

Redis-level contract (also in docs/producers.md, for producers in any language):

* ``<prefix>:id``         the deployment's id counter (decimal string)
* ``<prefix>:epoch``      the first id of this data set; ids at or below it
                          were issued before Redis last lost its data
* ``<prefix>:s:<topic>``  the topic's replay stream; entry id ``<id>-0``,
                          fields ``d`` (data) and ``e`` (event type, if any);
                          its max-deleted-entry-id is what the topic had
                          before the stream was created
* ``<prefix>:f:<topic>``  (contract version 2, still read) a floor kept by
                          producers running version 2's script
* ``<prefix>:c:<topic>``  the topic's pub/sub channel; message ``<id>|<type>|<data>``
* ``<prefix>:idem:<key>`` ids published under an idempotency key

Publishing is the ``publish.lua`` script: id, stream append (trimmed
approximately, keeping at least ``size + 1`` entries) and PUBLISH in one
atomic step; it reads nothing of the stream, which is what keeps its cost
near a bare XADD. Retention is the reader's: ``history.lua`` takes the newest
``size`` entries younger than the TTL as the replay window and works out each
topic's floor (the largest id it may have dropped) from the stream itself. The stream is the source of truth; pub/sub is
only the fast path. A node's feed can lose messages (its connection drops),
so after every reconnect it backfills from the streams everything after the
last id it delivered, and only then reads the live channel again, dropping
what the backfill already covered. If the backfill can't be exact (Redis lost
its data, or the events expired meanwhile), the sink gets a ``reset``.

Because every publish runs as one script, ids are issued in the order the
messages are published, and one pub/sub connection receives them in that
order: the node's feed is in id order across all its topics.

The modules, one job each: :mod:`~broker.redis.connection`, :mod:`~broker.redis.publish`,
:mod:`~broker.redis.history`, :mod:`~broker.redis.feed`, :mod:`~broker.redis.directory`,
put together by :mod:`~broker.redis.broker`.

Passing faults (what makes a Redis restart or failover heal by itself):

* Connections are checked when taken from the pool: RESP2, because redis-py's
  RESP3 pool skips its check for a connection the server closed, so after a
  Redis restart every pooled connection failed once ("Connection closed by
  server"). Reads are retried once on a connection error (they are
  idempotent); a publish never is: it may have run before its answer was
  lost, and sending it again would publish it twice.
* At most ``pool`` commands are in flight; more wait their turn (up to
  ``POOL_WAIT`` seconds) instead of failing with "Too many connections".
* The feed's subscriptions survive an outage: :meth:`RedisBroker.subscribe`
  takes topics while the feed is down, and the reconnect subscribes and
  backfills them from the feed's position, so clients can start at that
  position without Redis (:meth:`RedisBroker.position`).
* With Sentinel, a failover can lose what asynchronous replication had not
  copied yet. A node that finds the new primary's head below an id it has
  already delivered or published raises the data set's epoch above it
  (``mark_lost.lua``), and every resume from before it gets ``reset``
  (``lost``) instead of a silent hole. ``replicas_ack`` makes a publish wait
  (``WAIT``) until that many replicas have it, so nothing accepted is lost.
"""

from broker.redis.broker import RedisBroker
from broker.redis.connection import HISTORY_SCRIPT, MARK_LOST_SCRIPT, POOL_WAIT, PUBLISH_SCRIPT, RedisTarget
from broker.redis.history import STORM_WINDOW
from broker.redis.publish import ACK_TIMEOUT_MS

__all__ = [
    "ACK_TIMEOUT_MS",
    "HISTORY_SCRIPT",
    "MARK_LOST_SCRIPT",
    "POOL_WAIT",
    "PUBLISH_SCRIPT",
    "STORM_WINDOW",
    "RedisBroker",
    "RedisTarget",
]
