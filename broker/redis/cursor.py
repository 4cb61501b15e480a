"""The id a client holds when topics are spread over partitions: one position per partition, in one short text.

With ``P`` partitions (``HERALD_REDIS_PARTITIONS``) every partition issues its
own sequence (``max(last + 1, now_us)``, the one-Redis rule), so no single
integer says how far a client got. The ``id:`` a node writes is its position
in every partition at that event: the vector's largest value in base 36,
then each partition's distance below it, also base 36, separated by dots
(``"1a2b3c4d5e.0.k3.1b"``). Sequences are microsecond clocks, so busy
partitions sit close together and cost a character or a few each; a
partition quiet for an hour costs about seven. The text is the same for
every subscriber of a node (it is the node's position, not the client's), so
a frame is still encoded once per event.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_CURSOR = re.compile(r"[0-9a-z]{1,13}(?:\.[0-9a-z]{1,13})+")
MAX_TEXT = 14 * 65
"""The longest cursor text parsed (64 partitions of 13 base-36 digits, with their dots): anything longer is not one."""


def _base36(value: int) -> str:
    if value == 0:
        return "0"
    digits = []
    while value:
        value, digit = divmod(value, 36)
        digits.append(_DIGITS[digit])
    return "".join(reversed(digits))


def encode(vector: Sequence[int]) -> str:
    """The cursor text of ``vector`` (one non-negative position per partition)."""
    top = max(vector)
    return ".".join([_base36(top), *(_base36(top - v) for v in vector)])


def decode(text: str, partitions: int) -> list[int] | None:
    """The vector ``text`` holds for a deployment of ``partitions``; None when it is not such a cursor.

    Linear in the text, and the text is bounded (:data:`MAX_TEXT`), so a hostile ``Last-Event-ID`` costs nothing.
    """
    if len(text) > MAX_TEXT or _CURSOR.fullmatch(text) is None:
        return None
    parts = text.split(".")
    if len(parts) != partitions + 1:
        return None
    top = int(parts[0], 36)
    vector = [top - int(p, 36) for p in parts[1:]]
    if min(vector) < 0 or max(vector) != top:
        return None
    return vector
