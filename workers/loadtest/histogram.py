"""A latency histogram in the HdrHistogram style: log-linear buckets, mergeable, small.

Values are whole microseconds. Below 256 µs every value has its own bucket;
above, each power of two is split into 128 buckets, so a bucket's width is
under 1/128 of its value: every percentile is exact to within 0.8 %, from
1 µs to hours, in a fixed 4 KiB-ish table. Two histograms merge by adding
their counts, so each worker process records its own and the parent adds
them up without ever holding a list of samples.

Why not the ``hdrhistogram`` package: its ``record_value`` is pure Python
and several times this one's cost (docs/performance.md), and recording sits
on the load tool's per-event path, where the tool has to out-run the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_SUB_BITS = 8
_HALF = 1 << (_SUB_BITS - 1)
_MAX_SHIFT = 40  # values up to 2**48 µs (about 9 years): nothing real is clamped
_SIZE = (_MAX_SHIFT << (_SUB_BITS - 1)) + (1 << _SUB_BITS)


def bucket_of(value: int) -> int:
    """The bucket index of ``value`` (negative values count as 0)."""
    if value < (1 << _SUB_BITS):
        return value if value > 0 else 0
    shift = min(value.bit_length() - _SUB_BITS, _MAX_SHIFT)
    return (shift << (_SUB_BITS - 1)) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The values ``[low, high]`` that fall in bucket ``index``."""
    if index < (1 << _SUB_BITS):
        return index, index
    shift = (index >> (_SUB_BITS - 1)) - 1
    top = index - (shift << (_SUB_BITS - 1))
    low = top << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of microsecond values; percentiles, mean and max, exact to 0.8 %.

    ``record`` is the hot path: one bucket index and one list increment.
    """

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        self.count = 0
        self.total = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Count ``value`` µs; a negative value counts as 0 in the buckets, the mean and the max alike."""
        if value < 256:
            if value < 0:
                value = 0
            self.counts[value] += 1
        else:
            shift = value.bit_length() - _SUB_BITS
            if shift > _MAX_SHIFT:
                shift = _MAX_SHIFT
            self.counts[(shift << (_SUB_BITS - 1)) + (value >> shift)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def record_many(self, values: Iterable[int]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for index, n in enumerate(other.counts):
            if n:
                counts[index] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> int:
        """The smallest recorded-bucket value at or above fraction ``q`` (0-100) of the counts.

        Reported as the bucket's upper bound (never better than measured),
        capped at the exact maximum.
        """
        if not self.count:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_bounds(index)[1], self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def cumulative(self) -> list[tuple[int, float]]:
        """``(value, fraction of counts at or below it)`` per non-empty bucket: a CDF to plot."""
        out: list[tuple[int, float]] = []
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                out.append((min(bucket_bounds(index)[1], self.max), seen / self.count))
        return out

    def to_json(self) -> dict[str, object]:
        """A sparse form for pipes and files: ``{"buckets": [[index, count], ...], ...}``."""
        buckets = [[i, n] for i, n in enumerate(self.counts) if n]
        return {"buckets": buckets, "count": self.count, "total": self.total, "max": self.max}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Histogram:
        histogram = cls()
        buckets = data["buckets"]
        assert isinstance(buckets, list)
        for index, n in buckets:
            histogram.counts[index] += n
        histogram.count = int(data["count"])  # type: ignore[call-overload]
        histogram.total = int(data["total"])  # type: ignore[call-overload]
        histogram.max = int(data["max"])  # type: ignore[call-overload]
        return histogram

    def summary_ms(self) -> dict[str, float | int]:
        """Count and the percentiles the report quotes, in milliseconds."""
        ms = 1000
        return {
            "count": self.count,
            "mean": round(self.mean / ms, 3),
            "p50": self.percentile(50) / ms,
            "p90": self.percentile(90) / ms,
            "p99": self.percentile(99) / ms,
            "p99_9": self.percentile(99.9) / ms,
            "max": self.max / ms,
        }
