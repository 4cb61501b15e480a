"""The id a client holds when topics are spread over partitions: one position per partition, in one short text.

With ``P`` partitions (``HERALD_REDIS_PARTITIONS``) every partition issues its
own sequence (``max(last + 1, now_us)``, the one-Redis rule), so no single
integer says how far a client got. The ``id:`` a node writes is its position
in every partition at that event: the vector's largest value in hex, then
each partition's distance below it, also hex, separated by dots
(``"6620a3b41c5f2.0.4d2.3e8"``; hex because Python formats it in C, once
per event). Sequences are microsecond clocks, so busy partitions sit close
together and cost a few characters each; a partition quiet for an hour
costs about nine. The text is the same for
every subscriber of a node (it is the node's position, not the client's), so
a frame is still encoded once per event.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CURSOR = re.compile(r"[0-9a-f]{1,14}(?:\.[0-9a-f]{1,14})+")
MAX_TEXT = 15 * 17
"""The longest cursor text parsed (16 partitions of 14 hex digits, with their dots): anything longer is not one."""


def encode(vector: Sequence[int]) -> str:
    """The cursor text of ``vector`` (one non-negative position per partition)."""
    top = max(vector)
    return ".".join([format(top, "x"), *(format(top - v, "x") for v in vector)])


def decode(text: str, partitions: int) -> list[int] | None:
    """The vector ``text`` holds for a deployment of ``partitions``; None when it is not such a cursor.

    Linear in the text, and the text is bounded (:data:`MAX_TEXT`), so a hostile ``Last-Event-ID`` costs nothing.
    """
    if len(text) > MAX_TEXT or _CURSOR.fullmatch(text) is None:
        return None
    parts = text.split(".")
    if len(parts) != partitions + 1:
        return None
    top = int(parts[0], 16)
    vector = [top - int(p, 16) for p in parts[1:]]
    if min(vector) < 0 or max(vector) != top:
        return None
    return vector
