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

A :class:`TopicMatcher` compiles a list of selectors once per token (the
verifier caches it with the token): deciding a subscription is one pass over
each requested topic, and nothing is looked up per event.

Matching never backtracks. Topics and selectors come from clients (a topic in
a query string, selectors in a signed token), and a backtracking regular
expression built from ``*`` and ``**`` takes time exponential in the number of
stars: one anonymous ``GET /events`` once froze a node for seconds. The
selectors are instead one nondeterministic automaton whose states are bits of
an integer (the "shift-and" method): each character of the topic is a few
integer operations on all the selectors' states at once, so a match costs time
linear in the topic, times the selectors' total length over the machine's word
size. Limits on both keep that small: a topic has at most 200 characters (the
topic syntax), a selector at most :data:`MAX_SELECTOR_LENGTH`, a list at most
:data:`MAX_SELECTORS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

SUBJECT = "{sub}"
_TOKEN = re.compile(r"\*\*|\*|\{sub\}")
_SEGMENT = re.compile(r"[A-Za-z0-9_\-.:@]{1,200}")
"""What a substituted subject may be: one segment of a topic name (topic characters but ``/``)."""

MAX_SELECTOR_LENGTH = 512
"""Characters one selector may have (with ``{sub}`` substituted); longer ones are refused, not truncated."""

MAX_SELECTORS = 256
"""Selectors one list may hold (a token's ``publish`` or ``subscribe``, ``HERALD_PUBLIC_TOPICS``)."""

MAX_TOPIC_LENGTH = 200
"""The longest topic name (the topic syntax, :data:`api.models.TOPIC_PATTERN`); a longer one is covered by nothing."""


class InvalidSelector(ValueError):
    """A selector that is not a string, is empty or too long, or a list of too many."""


class _Star:
    __slots__ = ("crosses_slash",)

    def __init__(self, crosses_slash: bool) -> None:
        self.crosses_slash = crosses_slash


STAR = _Star(False)
"""``*``: any run of characters but ``/``."""
DOUBLE_STAR = _Star(True)
"""``**``: any run of characters."""

Token = str | _Star
"""One step of a selector: a literal character, or a star."""


def selector_tokens(selector: str, subject: str | None) -> tuple[Token, ...] | None:
    """The steps of one selector (``{sub}`` substituted); None when it can match nothing.

    Adjacent stars are one star (``**`` if any of them is): the same topics
    match, and no two star steps ever follow each other, which
    :class:`TopicMatcher` relies on.
    """
    if not isinstance(selector, str) or not selector:
        raise InvalidSelector(f"a selector is a non-empty string, got {selector!r}")
    if len(selector) > MAX_SELECTOR_LENGTH:
        raise InvalidSelector(f"a selector has at most {MAX_SELECTOR_LENGTH} characters, got {len(selector)}")
    steps: list[Token] = []
    position = 0
    for found in _TOKEN.finditer(selector):
        steps.extend(selector[position : found.start()])
        token = found.group()
        if token == SUBJECT:
            if subject is None or not _SEGMENT.fullmatch(subject):
                return None
            steps.extend(subject)
        else:
            star = DOUBLE_STAR if token == "**" else STAR
            last = steps[-1] if steps else None
            if isinstance(last, _Star):
                steps[-1] = DOUBLE_STAR if star.crosses_slash or last.crosses_slash else STAR
            else:
                steps.append(star)
        position = found.end()
    steps.extend(selector[position:])
    if len(steps) > MAX_SELECTOR_LENGTH:
        raise InvalidSelector(f"a selector has at most {MAX_SELECTOR_LENGTH} characters with {{sub}} substituted")
    return tuple(steps)


class TopicMatcher:
    """Whether a topic is covered by any of a list of selectors, in one pass over the topic.

    All the selectors are one automaton. Its states are the bits of an
    integer: the selectors' steps laid end to end, each selector preceded by
    a start bit. Bit ``i`` set after some characters of the topic means "the
    selector owning step ``i`` matches them up to and including that step".
    For each character ``c``:

    * a literal step ``c`` follows a matched step: ``(D << 1) & literal[c]``
      (a start bit is no step, so nothing shifts from one selector into the next);
    * a star step that matched goes on matching: ``D & stars`` (``**`` also
      for ``/``);
    * a star may match nothing: ``D |= (D << 1) & stars``, once, as no two
      stars are adjacent.

    A topic is covered when an accepting bit (a selector's last step) is set
    at its end. No state is ever revisited for the same character, so the
    time is one pass, whatever the selectors.
    """

    __slots__ = ("_accept", "_crossing", "_literal", "_stars", "_start", "selectors")

    def __init__(self, selectors: Iterable[str], subject: str | None = None) -> None:
        self.selectors = tuple(selectors)
        if len(self.selectors) > MAX_SELECTORS:
            raise InvalidSelector(f"a list holds at most {MAX_SELECTORS} selectors, got {len(self.selectors)}")
        literal: dict[str, int] = {}
        start = stars = crossing = accept = 0
        bit = 0
        for selector in self.selectors:
            steps = selector_tokens(selector, subject)
            if steps is None:
                continue
            start |= 1 << bit
            for step in steps:
                bit += 1
                if isinstance(step, _Star):
                    stars |= 1 << bit
                    if step.crosses_slash:
                        crossing |= 1 << bit
                else:
                    literal[step] = literal.get(step, 0) | 1 << bit
            accept |= 1 << bit
            bit += 1
        self._literal = literal
        self._stars = stars
        self._crossing = crossing
        self._accept = accept
        self._start = start | ((start << 1) & stars)  # a leading star may match nothing

    def covers(self, topic: str) -> bool:
        if not self._accept or len(topic) > MAX_TOPIC_LENGTH:
            return False
        state = self._start
        literal, stars, crossing = self._literal, self._stars, self._crossing
        for char in topic:
            state = ((state << 1) & literal.get(char, 0)) | (state & (crossing if char == "/" else stars))
            if not state:
                return False
            state |= (state << 1) & stars
        return state & self._accept != 0

    def first_uncovered(self, topics: Sequence[str]) -> str | None:
        """The first of ``topics`` no selector covers, or None when all are covered."""
        for topic in topics:
            if not self.covers(topic):
                return topic
        return None

    def __bool__(self) -> bool:
        return self._accept != 0

    def __repr__(self) -> str:
        return f"TopicMatcher({list(self.selectors)!r})"


NOTHING = TopicMatcher(())
"""Covers no topic."""


def parse_selector_list(text: str) -> tuple[str, ...]:
    """Selectors from a comma-separated setting (blank items ignored)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
