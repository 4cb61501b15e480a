"""Topic matchers of the Mercure protocol, and the checks a published topic must pass.

Everything here follows ``spec/mercure.md`` (Mercure 1.0, draft-dunglas-mercure-08);
section names below are the spec's.

**Matchers.** "Subscription": a subscriber names what it wants with query
parameters whose name encodes the matcher type: the bare ``match`` selects the
*default* matcher type, which is ``exact`` ("Exact Matching"; not a URI
template: templates and the ``topic`` parameter belong to pre-standardization
revisions), ``match_exact`` is its explicit spelling, ``match_urlpattern``
selects ``urlpattern`` ("URL Pattern"). Any mix, repeated. For legacy clients,
the pre-standardization ``topic`` parameter is accepted too (as the reference
hub's ``deprecated_topic`` build does): a selector that is exact, ``*``, or an
RFC 6570 URI template (:class:`UriTemplate`, a linear-time automaton, bounded);
the same reading applies to the selectors of a legacy ``mercure`` token claim. Every name in the
reserved ``match`` namespace (equal to ``match`` or beginning with it, ASCII
case-insensitively) that is not one of those three, case-sensitively, is
refused (400), as is a value that is not valid UTF-8, holds a C0/C1 control,
DEL or a format (``Cf``) character, or is not a well-formed URL pattern, and a
request over the limits below. "Matcher Types": the value ``*`` is the
wildcard, matching every topic whatever the matcher type. "Topic Matcher
List": a token's ``topics`` are objects ``{"match": ..., "match_type": ...}``,
``match_type`` optional (default ``exact``), case-sensitive, and one the hub
supports; :meth:`Matchers.from_token_topics` reads them with the same rules.

"Exact Matching" is a case-sensitive comparison of the strings (for valid
UTF-8, a byte-for-byte one): nothing is resolved or normalized.

"URL Pattern": patterns follow the URL Pattern Standard, ``ignoreCase`` never
set. A relative pattern, or a relative topic, is resolved against the hub's
URL (``base_url``); an absolute pattern is compiled without a base (a base
would fill in components the pattern left out, which the standard defines for
relative patterns only). A topic that can't be parsed as a URL never matches.

**The URL Pattern engine, and why evaluation is bounded.** The spec requires
a linear-time regular-expression engine or a cost/time limit
("URL Pattern", "URL-Pattern Denial of Service"). The ``urlpattern`` package
(PyPI) is a thin PyO3 binding of ``denoland/rust-urlpattern`` (the engine of
Deno's URLPattern), which compiles each component to the Rust ``regex`` crate:
finite automata (a lazy DFA, a one-pass DFA, a PikeVM, a backtracker bounded
by a visited set), with no backtracking engine, so matching is
``O(pattern size x topic length)`` whatever the pattern; it parses URLs with
the ``url`` crate (the WHATWG URL Standard). Python's ``re`` (backtracking)
is never used on a pattern. Linear is not free, though: the constant grows
with the number of capture groups and with the size of custom regular
expressions (many groups make a test of a long topic take milliseconds; a
large repeated class takes far longer to compile, Unicode classes being large). So
a pattern is also held to a cost budget when it is compiled:

* at most :data:`MAX_PATTERN_GROUPS` groups (named groups, wildcards and
  regular-expression groups);
* custom regular-expression groups (``:id(\\d+)``) of at most
  :data:`MAX_REGEXP_LENGTH` characters in all, expanding to at most
  :data:`MAX_REGEXP_COST` atoms (counted repetitions multiply), written in
  this subset: literals, ``.``, ``[...]`` classes, ``|``, ``*``, ``+``,
  ``?``, ``{n}``/``{n,}``/``{n,m}``, ``(?:...)``, escaped punctuation, and
  ``\\d \\D \\w \\W \\s \\S``. ``\\d``/``\\w`` are handed to the engine as
  the ASCII classes ECMAScript gives them (the URL Pattern Standard compiles
  to ECMAScript regular expressions; the Rust crate's are Unicode-wide and
  much larger). Inline flags, lookaround, back-references and ``\\p{...}``
  are refused (the engine has no lookaround or back-references at all).

and a topic longer than :data:`MAX_TOPIC_LENGTH` is never evaluated against a
URL pattern: "treated as not matching" per "URL Pattern" (such a topic can't
be published here anyway). Within these bounds, a test costs well under a
millisecond; compiled patterns are shared (an LRU cache), so ten thousand
subscribers with the same pattern cost one compilation.

**Publication.** :func:`check_publication_topic` applies "Terminology" (no
C0/C1/DEL/``Cf`` characters, valid UTF-8) and "Publication": the topic is
resolved against the hub's URL with the WHATWG URL parser (the one URL Pattern
matching uses), its path has dot-segments removed and percent-encoded
unreserved characters decoded, and a path equal to the hub URL's path or under
it is the reserved hub namespace (403, whatever the scheme or authority). The
topic ``*`` (the wildcard: no matcher can select it alone, "Matcher Types") is
refused too (400), and so is a topic over :data:`MAX_TOPIC_LENGTH` (413,
"Publication": limits on field lengths).

The character classes are those of Unicode 17 as the spec cites them; Python
3.11 knows Unicode 14, so the format characters added since (U+13439..U+1343F,
Unicode 15) are listed here by hand.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from urlpattern import URLPattern

EXACT: Final = "exact"
URLPATTERN: Final = "urlpattern"
MATCHER_TYPES: Final = (EXACT, URLPATTERN)
"""The matcher types this hub supports ("Matcher Types"), in canonical spelling."""
LEGACY: Final = "legacy"
"""Pre-standardization topic selectors (the ``topic`` subscribe parameter, the ``mercure`` claim's lists):
exact, ``*``, or an RFC 6570 URI template. Internal: not a ``match_type`` a token may name."""
DEFAULT_MATCHER_TYPE: Final = EXACT
WILDCARD: Final = "*"

QUERY_PARAMETERS: Final = {"match": EXACT, "match_exact": EXACT, "match_urlpattern": URLPATTERN}
"""Subscribe query parameter -> matcher type ("Subscription", "Summary of Matcher Types")."""
LEGACY_QUERY_PARAMETER: Final = "topic"
"""The pre-standardization subscribe parameter: a legacy topic selector (see :class:`UriTemplate`)."""

DEFAULT_HUB_URL: Final = "https://localhost/.well-known/mercure"
"""The base used when none is given; the hub passes its own URL ("Discovery")."""

MAX_MATCHERS: Final = 100
"""Topic matcher query parameters in one subscribe request; also entries of one token ``topics`` list.

"Subscription": hubs SHOULD cap the number of matchers per request; a request over it is a 400.
"""
MAX_MATCHER_LENGTH: Final = 2048
"""UTF-8 bytes of one matcher value (the cap of "Subscription" on "the length of each matcher's pattern")."""
MAX_TOPIC_LENGTH: Final = 2048
"""UTF-8 bytes of a published topic ("Publication": field-length limits, 413): one an exact matcher can name."""
MAX_PATTERN_GROUPS: Final = 32
"""Named groups, wildcards and regular-expression groups in one URL pattern (see the module's docstring)."""
MAX_REGEXP_LENGTH: Final = 64
"""Characters of custom regular-expression groups in one URL pattern, all groups together."""
MAX_REGEXP_COST: Final = 128
"""Atoms the custom regular-expression groups of one URL pattern expand to (``{n}`` multiplies by n)."""
PATTERN_CACHE_SIZE: Final = 4096
"""Compiled URL patterns kept (keyed by pattern and base URL)."""
MAX_TEMPLATE_LENGTH: Final = 512
"""Characters of a legacy URI template (a selector holding ``{``)."""
MAX_TEMPLATE_EXPRESSIONS: Final = 16
"""``{...}`` expressions in one legacy URI template."""
MAX_TEMPLATE_STEPS: Final = 100_000
"""Automaton steps one URI template test may take; past it the topic is treated as not matching."""

# Unicode 15+ format characters Python 3.11's Unicode 14 database does not know ("Terminology" cites Unicode 17).
_NEWER_FORMAT_CHARACTERS: Final = frozenset(chr(cp) for cp in range(0x13439, 0x13440))
_ASCII_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f]")
_MATCH_NAMESPACE: Final = re.compile(r"match", re.IGNORECASE | re.ASCII)
_PERCENT_ENCODED: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class MatcherError(ValueError):
    """A matcher or a topic breaks a rule of the spec; ``status`` is the HTTP answer, the message says why."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class MatcherLimitError(MatcherError):
    """Over an implementation-defined limit: 400 for a subscribe request ("Subscription"), 413 for a publication."""


class ReservedTopicError(MatcherError):
    """The topic addresses the reserved hub namespace: 403 ("Publication")."""

    status = 403


# -- characters ("Terminology", "Subscription", "Publication") -----------------------------------------------------


def forbidden_character(value: str) -> str | None:
    """The first character a topic, matcher, ``id`` or ``type`` must not hold, or None.

    C0 (U+0000-U+001F), DEL, C1 (U+0080-U+009F), format characters (``Cf``),
    and lone surrogates (what a decoder leaves for bytes that are not UTF-8).
    """
    if value.isascii():
        found = _ASCII_FORBIDDEN.search(value)
        return found.group() if found else None
    for char in value:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return char
        if code >= 0xA0 and (unicodedata.category(char) in ("Cf", "Cs") or char in _NEWER_FORMAT_CHARACTERS):
            return char
    return None


def describe_character(char: str) -> str:
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return f"U+{code:04X} (not valid UTF-8)"
    kind = "a format character" if code >= 0xA0 else "a control character"
    return f"U+{code:04X} ({kind})"


def check_characters(value: str, what: str) -> None:
    """Raise MatcherError (400) when ``value`` holds a character the spec forbids in ``what``."""
    char = forbidden_character(value)
    if char is not None:
        raise MatcherError(f"{what} must not contain {describe_character(char)}")


def _utf8_length(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


# -- URL patterns ("URL Pattern") ----------------------------------------------------------------------------------

_REGEXP_CLASSES: Final = {
    # ECMAScript's meaning (the URL Pattern Standard compiles to ECMAScript regular expressions).
    "d": "[0-9]",
    "D": "[^0-9]",
    "w": "[0-9A-Za-z_]",
    "W": "[^0-9A-Za-z_]",
    "s": r"\s",
    "S": r"\S",
}
_REGEXP_ESCAPABLE: Final = frozenset("^$\\.*+?()[]{}|/-")


def _is_name_start(char: str) -> bool:
    return char == "$" or char.isidentifier()


def _regexp_end(value: str, start: int) -> int:
    """Index just past the ``)`` closing the regular-expression group opened at ``start`` (the standard's tokenizer)."""
    depth = 1
    index = start + 1
    if index < len(value) and value[index] == "?":
        raise MatcherError("a regular-expression group must not start with '?'")
    while index < len(value):
        char = value[index]
        if not char.isascii():
            raise MatcherError("a regular-expression group must be ASCII")
        if char == "\\":
            index += 2
            continue
        if char == ")":
            depth -= 1
            if depth == 0:
                if index == start + 1:
                    raise MatcherError("a regular-expression group must not be empty")
                return index + 1
        elif char == "(":
            depth += 1
            if value[index + 1 : index + 2] != "?":
                raise MatcherError("a group nested in a regular expression must be non-capturing: (?:...)")
        index += 1
    raise MatcherError("a regular-expression group is not closed")


_COUNTED: Final = re.compile(r"\{(\d{1,6})(?:(,)(\d{0,6}))?\}")


def _rewrite_regexp(body: str) -> tuple[str, int]:
    """The group's regular expression in the subset the hub accepts, for the engine; and its expansion (atoms).

    Raises MatcherError for what is outside the subset (see the module's docstring).
    """
    out: list[str] = []
    # Expansion estimate: a stack of (atoms so far in this group, atoms of the current alternative).
    stack: list[list[int]] = [[0, 0]]
    last = 0  # atoms of the last item, which a quantifier multiplies
    index = 0
    in_class = False
    while index < len(body):
        char = body[index]
        if char == "\\":
            escaped = body[index + 1 : index + 2]
            if escaped in _REGEXP_CLASSES:
                replacement = _REGEXP_CLASSES[escaped]
                out.append(replacement[1:-1] if in_class and not replacement.startswith(("[^", "\\")) else replacement)
            elif escaped in _REGEXP_ESCAPABLE:
                out.append("\\" + escaped)
            else:
                raise MatcherError(f"the escape \\{escaped} is not supported in a regular-expression group")
            index += 2
            if not in_class:
                last = 1
                stack[-1][1] += 1
            continue
        if in_class:
            if char == "[":
                raise MatcherError("a character class must not contain '[' unescaped")
            if body.startswith("--", index):
                raise MatcherError("a character class must not contain '--'")
            if char == "]":
                in_class = False
            # '&&' and '~~' are set operations to the engine, literals to ECMAScript: escaped.
            out.append("\\" + char if char in "&~" else char)
            index += 1
            continue
        if char == "[":
            in_class = True
            out.append(char)
            index += 1
            if body[index : index + 1] == "^":
                out.append("^")
                index += 1
            if body[index : index + 1] == "]":  # a literal ] first in a class
                out.append("\\]")
                index += 1
            last = 1
            stack[-1][1] += 1
            continue
        if char == "(":
            if body[index : index + 3] != "(?:":
                raise MatcherError("only non-capturing groups (?:...) may be nested in a regular expression")
            out.append("(?:")
            stack.append([0, 0])
            index += 3
            continue
        if char == ")":
            total, current = stack.pop()
            last = total + current
            stack[-1][1] += last
            out.append(")")
            index += 1
            continue
        if char == "|":
            stack[-1][0] += stack[-1][1]
            stack[-1][1] = 0
            out.append("|")
            index += 1
            continue
        if char == "{":
            counted = _COUNTED.match(body, index)
            if counted is None:
                raise MatcherError("a '{' in a regular-expression group must be a repetition {n}, {n,} or {n,m}")
            low, comma, high = counted.groups()
            if comma and high and int(high) < int(low):
                raise MatcherError("a repetition {n,m} needs n <= m")
            times = max(int(low), int(high or 0), 1)
            stack[-1][1] += last * (times - 1)
            last *= times
            out.append(counted.group())
            index = counted.end()
            continue
        if char in "*+?":
            out.append(char)
            index += 1
            continue
        out.append(char)  # a literal, '.', '^' or '$'
        last = 1
        stack[-1][1] += 1
        index += 1
    if in_class:
        raise MatcherError("a character class is not closed")
    total, current = stack[0]
    return "".join(out), total + current


def _bounded_source(value: str) -> str:
    """The pattern as handed to the engine; MatcherError when it is over the cost budget or outside the subset."""
    out: list[str] = []
    groups = 0
    regexp_length = 0
    regexp_cost = 0
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\":
            out.append(value[index : index + 2])
            index += 2
            continue
        if char == "(":
            end = _regexp_end(value, index)
            body = value[index + 1 : end - 1]
            regexp_length += len(body)
            if regexp_length > MAX_REGEXP_LENGTH:
                raise MatcherLimitError(
                    f"the regular-expression groups of a URL pattern are limited to {MAX_REGEXP_LENGTH} characters"
                )
            rewritten, cost = _rewrite_regexp(body)
            regexp_cost += cost
            if regexp_cost > MAX_REGEXP_COST:
                raise MatcherLimitError(
                    f"the regular-expression groups of a URL pattern expand to more than {MAX_REGEXP_COST} atoms"
                )
            out.append(f"({rewritten})")
            groups += 1
            index = end
        else:
            if char == "*" or (char == ":" and _is_name_start(value[index + 1 : index + 2] or "-")):
                groups += 1
            out.append(char)
            index += 1
        if groups > MAX_PATTERN_GROUPS:
            raise MatcherLimitError(f"a URL pattern is limited to {MAX_PATTERN_GROUPS} groups")
    return "".join(out)


@functools.lru_cache(maxsize=PATTERN_CACHE_SIZE)
def _compile_urlpattern(value: str, base_url: str) -> URLPattern:
    source = _bounded_source(value)
    try:
        return URLPattern(source)  # absolute: no base ("URL Pattern": the base is for relative patterns)
    except (ValueError, TypeError):
        pass
    try:
        return URLPattern(source, base_url)
    except (ValueError, TypeError) as exc:
        raise MatcherError(f"not a well-formed URL pattern: {exc}") from None


# -- legacy URI templates (pre-standardization topic selectors) ---------------------------------------------------

_UNRESERVED_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%")
_RESERVED_CHARS: Final = _UNRESERVED_CHARS | frozenset(":/?#[]@!$&'()*+,;=")
# operator -> (the expansion's first character, or "" ; the characters a value may hold, separators included)
_TEMPLATE_OPERATORS: Final = {
    "": ("", _UNRESERVED_CHARS | {","}),
    "+": ("", _RESERVED_CHARS),
    "#": ("#", _RESERVED_CHARS),
    ".": (".", _UNRESERVED_CHARS | {","}),
    "/": ("/", _UNRESERVED_CHARS | {",", "/"}),
    ";": (";", _UNRESERVED_CHARS | {",", ";", "="}),
    "?": ("?", _UNRESERVED_CHARS | {",", "&", "="}),
    "&": ("&", _UNRESERVED_CHARS | {",", "&", "="}),
}
_VARSPEC: Final = re.compile(
    r"(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*(?::[1-9][0-9]{0,3}|\*)?"
)


class UriTemplate:
    """An RFC 6570 (levels 1-4) URI template, tested against topics: does some expansion produce the topic?

    How the pre-standardization hubs (and the reference hub's ``deprecated_topic`` build) read a topic
    selector holding ``{``. Each expression ``{op var,...}`` matches the empty string (its variables
    undefined) or the operator's first character (``#``, ``.``, ``/``, ``;``, ``?``, ``&``; none for simple
    and ``+``) followed by characters a value may expand to: unreserved characters and percent-encoding for
    simple expansion, so ``{id}`` never crosses a ``/``; reserved characters too for ``+`` and ``#``; the
    operator's separators between values (``name=`` pairs for ``;``, ``?``, ``&``, whose names are not
    checked; ``:n`` prefixes not enforced). Literal text is compared as is.

    The template compiles to a small automaton (literals, and an optional first character followed by a
    loop on a character set) simulated with a set of states: time is linear in the topic length times the
    template's size, never exponential; Python's backtracking ``re`` is not used. Templates are bounded
    (:data:`MAX_TEMPLATE_LENGTH`, :data:`MAX_TEMPLATE_EXPRESSIONS`) and one test is held to
    :data:`MAX_TEMPLATE_STEPS` (past it: not matching).
    """

    __slots__ = ("_elements", "_prefix", "template")

    def __init__(self, template: str) -> None:
        if len(template) > MAX_TEMPLATE_LENGTH:
            raise MatcherLimitError(f"a URI template is limited to {MAX_TEMPLATE_LENGTH} characters")
        self.template = template
        # (first character or "", loop set or None): a literal when the set is None
        elements: list[tuple[str, frozenset[str] | None]] = []
        expressions = 0
        index = 0
        while index < len(template):
            char = template[index]
            if char == "}":
                raise MatcherError("a URI template has an unmatched '}'")
            if char != "{":
                elements.append((char, None))
                index += 1
                continue
            end = template.find("}", index)
            if end < 0:
                raise MatcherError("a URI template expression is not closed")
            expressions += 1
            if expressions > MAX_TEMPLATE_EXPRESSIONS:
                raise MatcherLimitError(f"a URI template is limited to {MAX_TEMPLATE_EXPRESSIONS} expressions")
            body = template[index + 1 : end]
            operator = body[:1] if body[:1] in _TEMPLATE_OPERATORS and body[:1] else ""
            variables = body[len(operator) :]
            if not variables or not all(_VARSPEC.fullmatch(spec) for spec in variables.split(",")):
                raise MatcherError(f"not a valid URI template expression: {{{body}}}")
            first, allowed = _TEMPLATE_OPERATORS[operator]
            elements.append((first, frozenset(allowed)))
            index = end + 1
        self._elements = tuple(elements)
        prefix: list[str] = []
        for literal, loop in elements:
            if loop is not None:
                break
            prefix.append(literal)
        self._prefix = "".join(prefix)

    def matches(self, topic: str) -> bool:
        if len(topic) > MAX_TOPIC_LENGTH or not topic.startswith(self._prefix):
            return False
        elements = self._elements
        end = len(elements)
        # A state: (element index, inside): inside a variable element once its first character was read.
        states = self._closure({(0, False)})
        steps = 0
        for char in topic:
            following: set[tuple[int, bool]] = set()
            for position, inside in states:
                if position == end:
                    continue
                first, allowed = elements[position]
                if allowed is None:
                    if char == first:
                        following.add((position + 1, False))
                elif inside or not first:
                    if char in allowed:
                        following.add((position, True))
                elif char == first:
                    following.add((position, True))
            steps += len(states)
            if not following or steps > MAX_TEMPLATE_STEPS:
                return False
            states = self._closure(following)
        return (end, False) in states

    def _closure(self, states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
        """Add the states reachable without reading: a variable element may end (or be empty) anywhere."""
        elements = self._elements
        pending = list(states)
        while pending:
            position, _ = pending.pop()
            if position < len(elements) and elements[position][1] is not None:
                state = (position + 1, False)
                if state not in states:
                    states.add(state)
                    pending.append(state)
        return states


@functools.lru_cache(maxsize=PATTERN_CACHE_SIZE)
def _compile_template(value: str) -> UriTemplate:
    return UriTemplate(value)


# -- matchers ------------------------------------------------------------------------------------------------------


class Matcher:
    """One topic matcher: a matcher type and its value (a subscription, in the spec's words)."""

    __slots__ = ("_base_url", "_pattern", "_template", "type", "value", "wildcard")

    def __init__(self, match_type: str, value: str, *, base_url: str = DEFAULT_HUB_URL) -> None:
        """Check and compile; raises MatcherError. Prefer :func:`compile_matcher`.

        ``match_type`` is one of :data:`MATCHER_TYPES`, or :data:`LEGACY` for a pre-standardization topic
        selector: ``*``, a URI template when it holds ``{`` or ``}``, an exact topic otherwise.
        """
        if match_type not in MATCHER_TYPES and match_type != LEGACY:
            raise MatcherError(f"unsupported matcher type {match_type!r} (supported: {', '.join(MATCHER_TYPES)})")
        check_matcher_value(value)
        self.type = match_type
        self.value = value
        self.wildcard = value == WILDCARD
        self._base_url = base_url
        self._pattern: URLPattern | None = None
        self._template: UriTemplate | None = None
        if match_type == URLPATTERN and not self.wildcard:
            self._pattern = _compile_urlpattern(value, base_url)
        elif match_type == LEGACY and ("{" in value or "}" in value):
            self._template = _compile_template(value)

    @property
    def is_exact(self) -> bool:
        """Matches one topic string only (an index by topic can route it)."""
        return not self.wildcard and self._pattern is None and self._template is None

    def matches(self, topic: str) -> bool:
        if self.wildcard:
            return True
        if self._template is not None:
            return self._template.matches(topic)
        if self._pattern is None:
            return topic == self.value
        if len(topic) > MAX_TOPIC_LENGTH:
            return False  # the evaluation-cost limit of "URL Pattern": treated as not matching, never evaluated
        try:
            return self._pattern.test(topic, self._base_url)
        except (ValueError, TypeError):
            return False  # "URL Pattern": a topic that can't be parsed as a URL does not match

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Matcher) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Matcher({self.type!r}, {self.value!r})"


def check_matcher_value(value: str, what: str = "a topic matcher") -> None:
    """The value constraints every matcher shares ("Subscription"): length, then characters. Raises MatcherError."""
    if len(value) > MAX_MATCHER_LENGTH or _utf8_length(value) > MAX_MATCHER_LENGTH:
        raise MatcherLimitError(f"{what} is limited to {MAX_MATCHER_LENGTH} bytes")
    check_characters(value, what)


def compile_matcher(match_type: str, value: str, *, base_url: str = DEFAULT_HUB_URL) -> Matcher:
    """A checked, compiled matcher. Raises MatcherError (400) naming what is wrong."""
    return Matcher(match_type, value, base_url=base_url)


class Matchers:
    """A set of topic matchers: a subscriber's routing selection, or the topics an access token grants an action on.

    Matching is any-of: exact values are a set lookup, ``*`` matches all, URL
    patterns are tried in turn. Identical matchers (same type and value) are
    kept once (the spec's "Subscription" allows deduplicating them).
    """

    __slots__ = ("_exact", "_matchers", "_patterns", "_wildcard")

    def __init__(self, matchers: Iterable[Matcher] = ()) -> None:
        self._matchers: tuple[Matcher, ...] = tuple(dict.fromkeys(matchers))
        self._wildcard = any(m.wildcard for m in self._matchers)
        self._exact = frozenset(m.value for m in self._matchers if m.is_exact)
        self._patterns = tuple(m for m in self._matchers if not m.wildcard and not m.is_exact)

    @classmethod
    def from_query(cls, items: Iterable[tuple[str, str]], *, base_url: str = DEFAULT_HUB_URL) -> Matchers:
        """The matchers of a subscribe request's query (its decoded name/value pairs, in order).

        Parameters outside the ``match`` namespace (``last_event_id``, ...) are
        left to the caller, except the legacy ``topic`` (:data:`LEGACY_QUERY_PARAMETER`):
        a pre-standardization selector, exact, ``*`` or a URI template
        (:class:`UriTemplate`). Raises MatcherError (400) for an unknown ``match*``
        name, an invalid value, or more than :data:`MAX_MATCHERS` matchers.
        """
        found: list[Matcher] = []
        for name, value in items:
            if name == LEGACY_QUERY_PARAMETER:
                match_type: str | None = LEGACY
            elif not _MATCH_NAMESPACE.match(name):
                continue
            else:
                match_type = QUERY_PARAMETERS.get(name)
            if match_type is None:
                raise MatcherError(
                    f"unknown topic matcher parameter {name!r}: this hub supports {', '.join(QUERY_PARAMETERS)}"
                    " (every parameter whose name begins with 'match' is reserved for topic matchers)"
                )
            if len(found) >= MAX_MATCHERS:
                raise MatcherLimitError(f"a request is limited to {MAX_MATCHERS} topic matchers")
            try:
                found.append(Matcher(match_type, value, base_url=base_url))
            except MatcherError as exc:
                raise type(exc)(f"{name}={_excerpt(value)}: {exc}", status=exc.status) from None
        return cls(found)

    @classmethod
    def from_token_topics(cls, topics: Any, *, base_url: str = DEFAULT_HUB_URL) -> Matchers:
        """The matchers of a token's ``topics`` list ("Topic Matcher List"). Raises MatcherError.

        A non-empty JSON array of objects, each with a string ``match`` and an
        optional string ``match_type`` naming a supported matcher type
        (case-sensitive; absent means ``exact``). Other members are ignored.
        """
        if not isinstance(topics, list) or not topics:
            raise MatcherError("topics must be a non-empty array of topic matcher objects")
        if len(topics) > MAX_MATCHERS:
            raise MatcherLimitError(f"a topics array is limited to {MAX_MATCHERS} topic matchers")
        found: list[Matcher] = []
        for entry in topics:
            if not isinstance(entry, dict):
                raise MatcherError('a topic matcher must be an object {"match": ..., "match_type": ...}')
            value = entry.get("match")
            if not isinstance(value, str):
                raise MatcherError('a topic matcher needs a string "match"')
            match_type = entry.get("match_type", DEFAULT_MATCHER_TYPE)
            if not isinstance(match_type, str):
                raise MatcherError('a topic matcher\'s "match_type" must be a string')
            if match_type not in MATCHER_TYPES:
                raise MatcherError(f"unsupported matcher type {match_type!r} (supported: {', '.join(MATCHER_TYPES)})")
            found.append(Matcher(match_type, value, base_url=base_url))
        return cls(found)

    @classmethod
    def from_legacy_selectors(cls, selectors: Any, *, base_url: str = DEFAULT_HUB_URL) -> Matchers:
        """The matchers of a legacy ``mercure`` claim's ``publish``/``subscribe`` list. Raises MatcherError.

        An array (possibly empty: grants nothing) of topic selectors: strings read the legacy way (exact,
        ``*``, URI template); a topic matcher object (``{"match": ..., "match_type": ...}``) is read as in
        :meth:`from_token_topics`.
        """
        if not isinstance(selectors, list):
            raise MatcherError("a mercure claim's publish/subscribe must be an array of topic selectors")
        if len(selectors) > MAX_MATCHERS:
            raise MatcherLimitError(f"a topic selector array is limited to {MAX_MATCHERS} entries")
        found: list[Matcher] = []
        for entry in selectors:
            if isinstance(entry, str):
                found.append(Matcher(LEGACY, entry, base_url=base_url))
            else:
                found.extend(cls.from_token_topics([entry], base_url=base_url))
        return cls(found)

    @classmethod
    def union(cls, *groups: Matchers) -> Matchers:
        return cls(m for group in groups for m in group)

    @property
    def matchers(self) -> tuple[Matcher, ...]:
        """Every matcher, in the order first given (one subscription each, for the subscription events)."""
        return self._matchers

    @property
    def wildcard(self) -> bool:
        """True when ``*`` is among them: every topic matches."""
        return self._wildcard

    @property
    def exact_topics(self) -> frozenset[str]:
        """The exact values (without ``*``): what an index by topic can route on."""
        return self._exact

    @property
    def has_patterns(self) -> bool:
        return bool(self._patterns)

    def matches(self, topic: str) -> bool:
        if self._wildcard or topic in self._exact:
            return True
        return any(m.matches(topic) for m in self._patterns)

    def matches_any(self, topics: Sequence[str]) -> bool:
        """True when one of ``topics`` matches (an update with alternate topics matches when any of them does)."""
        return any(self.matches(topic) for topic in topics)

    def __iter__(self) -> Iterator[Matcher]:
        return iter(self._matchers)

    def __len__(self) -> int:
        return len(self._matchers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Matchers) and set(self._matchers) == set(other._matchers)

    def __hash__(self) -> int:
        return hash(frozenset(self._matchers))

    def __repr__(self) -> str:
        return f"Matchers({list(self._matchers)!r})"


def _excerpt(value: str, limit: int = 80) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


# -- publication ("Publication", "Reserved Hub Namespace") ---------------------------------------------------------

_ANY_URL: Final = URLPattern({})
"""Matches every URL: its ``exec`` is the WHATWG URL parser, the one URL Pattern matching resolves topics with."""


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/".join(output)


def _decode_unreserved(path: str) -> str:
    def decode(found: re.Match[str]) -> str:
        char = chr(int(found.group(1), 16))
        return char if char in _UNRESERVED else found.group().upper()

    return _PERCENT_ENCODED.sub(decode, path)


def resolved_path(topic: str, hub_url: str) -> str | None:
    """The path of ``topic`` resolved against ``hub_url``, normalized for the reserved-namespace test.

    WHATWG URL parsing (dot-segments removed, ``%2e`` included), then
    percent-encoded unreserved characters decoded and dot-segments removed
    again (RFC 3986). None when the topic can't be parsed as a URL reference.
    """
    try:
        result = _ANY_URL.exec(topic, hub_url)
    except (ValueError, TypeError):
        return None
    if result is None:
        return None
    path = _decode_unreserved(str(result["pathname"]["input"]))
    return _remove_dot_segments(path) if path.startswith("/") else path


@functools.lru_cache(maxsize=16)
def _reserved_prefix(hub_url: str) -> tuple[str, str]:
    path = resolved_path(hub_url, hub_url)
    if path is None:
        raise ValueError(f"the hub URL {hub_url!r} is not a URL")
    return path, path if path.endswith("/") else path + "/"


def addresses_reserved_namespace(topic: str, hub_url: str = DEFAULT_HUB_URL) -> bool:
    """True when ``topic`` names the hub URL's path or a path under it, whatever its scheme and authority."""
    path = resolved_path(topic, hub_url)
    if path is None:
        return False  # "Publication": it can't name a hub path
    hub_path, prefix = _reserved_prefix(hub_url)
    return path == hub_path or path.startswith(prefix)


def check_publication_topic(topic: str, *, hub_url: str = DEFAULT_HUB_URL) -> None:
    """Raise MatcherError unless ``topic`` may be published ("Terminology", "Publication").

    :class:`MatcherLimitError` (413) over :data:`MAX_TOPIC_LENGTH` bytes;
    :class:`MatcherError` (400) for a forbidden character or the wildcard
    ``*``; :class:`ReservedTopicError` (403) for the reserved hub namespace.
    """
    if len(topic) > MAX_TOPIC_LENGTH or _utf8_length(topic) > MAX_TOPIC_LENGTH:
        raise MatcherLimitError(f"a topic is limited to {MAX_TOPIC_LENGTH} bytes", status=413)
    check_characters(topic, "a topic")
    if topic == WILDCARD:
        raise MatcherError("the topic '*' is the reserved wildcard; no matcher could select it alone")
    if addresses_reserved_namespace(topic, hub_url):
        raise ReservedTopicError(
            "the topic addresses the hub's reserved namespace (the hub URL's path and below: hub-generated topics)"
        )
