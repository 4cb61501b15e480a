"""Topic selectors: the patterns a token's ``publish``/``subscribe`` claims and ``HERALD_PUBLIC_TOPICS`` are made of.

A selector is a topic name in which

* ``*`` matches any run of characters except ``/`` (one path segment, or part of one),
* ``**`` matches any run of characters, ``/`` included,
* ``{sub}`` stands for the token's ``sub`` claim, so one rule serves every user
  (``user/{sub}/**``).

Everything else matches itself only. The subject is substituted as a literal,
never as a pattern: a ``sub`` of ``*`` matches the topic part ``*`` (which no
topic can contain), not every user. A subject that could not be one segment of
a topic name (empty, or holding ``/`` or any character topics do not allow)
makes every selector that uses ``{sub}`` match nothing, so a token for
``sub: "1/x"`` can never reach ``user/1/x/...`` through ``user/{sub}/**``.

A :class:`TopicMatcher` compiles a list of selectors into one regular
expression, once per token (the verifier caches it with the token): deciding a
subscription is one ``fullmatch`` per requested topic, and nothing is looked up
per event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

SUBJECT = "{sub}"
_TOKEN = re.compile(r"\*\*|\*|\{sub\}")
_SEGMENT = re.compile(r"[A-Za-z0-9_\-.:@]{1,200}")
"""What a substituted subject may be: one segment of a topic name (topic characters but ``/``)."""


class InvalidSelector(ValueError):
    """A selector that is not a string, or is empty."""


def selector_pattern(selector: str, subject: str | None) -> str | None:
    """The regular expression (for ``fullmatch``) of one selector; None when it can match nothing."""
    if not isinstance(selector, str) or not selector:
        raise InvalidSelector(f"a selector is a non-empty string, got {selector!r}")
    parts: list[str] = []
    position = 0
    for found in _TOKEN.finditer(selector):
        parts.append(re.escape(selector[position : found.start()]))
        token = found.group()
        if token == "**":
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        else:  # {sub}
            if subject is None or not _SEGMENT.fullmatch(subject):
                return None
            parts.append(re.escape(subject))
        position = found.end()
    parts.append(re.escape(selector[position:]))
    return "".join(parts)


class TopicMatcher:
    """Whether a topic is covered by any of a list of selectors."""

    __slots__ = ("_regex", "selectors")

    def __init__(self, selectors: Iterable[str], subject: str | None = None) -> None:
        self.selectors = tuple(selectors)
        patterns = [p for p in (selector_pattern(s, subject) for s in self.selectors) if p is not None]
        # (?s): a topic never holds a newline, but ``.*`` must not be what decides that.
        self._regex = re.compile("(?s)" + "|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def covers(self, topic: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(topic) is not None

    def first_uncovered(self, topics: Sequence[str]) -> str | None:
        """The first of ``topics`` no selector covers, or None when all are covered."""
        for topic in topics:
            if not self.covers(topic):
                return topic
        return None

    def __bool__(self) -> bool:
        return self._regex is not None

    def __repr__(self) -> str:
        return f"TopicMatcher({list(self.selectors)!r})"


NOTHING = TopicMatcher(())
"""Covers no topic."""


def parse_selector_list(text: str) -> tuple[str, ...]:
    """Selectors from a comma-separated setting (blank items ignored)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
