"""Unit tests of api.mercure.matchers, one (or a few) per rule of the Mercure spec (spec/mercure.md, 1.0).

Test names start with the spec section they hold the code to: terminology, subscription, matcher_types,
exact_matching, url_pattern, topic_matcher_list, publication (reserved hub namespace included).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from api.mercure.matchers import (
    DEFAULT_HUB_URL,
    EXACT,
    LEGACY,
    MATCHER_TYPES,
    MAX_MATCHER_LENGTH,
    MAX_MATCHERS,
    MAX_PATTERN_GROUPS,
    MAX_REGEXP_COST,
    MAX_REGEXP_LENGTH,
    MAX_TEMPLATE_EXPRESSIONS,
    MAX_TEMPLATE_LENGTH,
    MAX_TOPIC_LENGTH,
    URLPATTERN,
    Matcher,
    MatcherError,
    MatcherLimitError,
    Matchers,
    ReservedTopicError,
    UriTemplate,
    addresses_reserved_namespace,
    check_publication_topic,
    compile_matcher,
    forbidden_character,
)

HUB = "https://hub.example.com/.well-known/mercure"


def query(*items: tuple[str, str]) -> Matchers:
    return Matchers.from_query(list(items), base_url=HUB)


def pattern(value: str) -> Matcher:
    return compile_matcher(URLPATTERN, value, base_url=HUB)


# -- Terminology: what a topic (and a matcher value) may hold ------------------------------------------------------

FORBIDDEN = [
    "\x00",
    "\x09",
    "\x0a",
    "\x0d",
    "\x1f",
    "\x7f",
    "\x80",
    "\x85",
    "\x9f",
    "\u00ad",  # soft hyphen (Cf)
    "\u200b",  # zero-width space (Cf)
    "\u200d",
    "\u202e",  # right-to-left override (Cf)
    "\u2066",
    "\ufeff",
    "\U000e0001",
    "\U00013439",  # Cf since Unicode 15 (the spec cites 17; Python 3.11 knows 14)
    "\ud800",  # a lone surrogate: what undecodable bytes become, not UTF-8
]


@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_terminology_topic_must_not_contain_controls_or_format_characters(char: str) -> None:
    assert forbidden_character(f"https://example.com/a{char}b") == char
    with pytest.raises(MatcherError) as info:
        check_publication_topic(f"https://example.com/a{char}b", hub_url=HUB)
    assert info.value.status == 400


@pytest.mark.parametrize("text", ["https://example.com/café", "https://例え.jp/本", "urn:x:👍", "a b", "é\u0301"])
def test_terminology_other_unicode_is_allowed(text: str) -> None:
    assert forbidden_character(text) is None
    check_publication_topic(text, hub_url=HUB)


@given(st.text(max_size=40))
def test_terminology_forbidden_character_agrees_with_the_unicode_database(text: str) -> None:
    import unicodedata

    def bad(c: str) -> bool:
        code = ord(c)
        return (
            code < 0x20 or 0x7F <= code <= 0x9F or unicodedata.category(c) in ("Cf", "Cs") or 0x13439 <= code <= 0x1343F
        )

    expected = next((c for c in text if bad(c)), None)
    assert forbidden_character(text) == expected


# -- Subscription: the query parameters -----------------------------------------------------------------------------


def test_subscription_bare_match_selects_the_default_exact_matcher_type_not_a_uri_template() -> None:
    matchers = query(("match", "https://example.com/books/{id}"))
    assert [m.type for m in matchers] == [EXACT]
    assert matchers.matches("https://example.com/books/{id}")
    assert not matchers.matches("https://example.com/books/1")


def test_subscription_match_exact_is_the_explicit_spelling_of_the_default() -> None:
    assert query(("match_exact", "foo")) == query(("match", "foo"))
    assert query(("match_exact", "foo")).matches("foo")


def test_subscription_match_urlpattern_selects_the_urlpattern_matcher_type() -> None:
    matchers = query(("match_urlpattern", "https://example.com/bar/:id"))
    assert [m.type for m in matchers] == [URLPATTERN]
    assert matchers.matches("https://example.com/bar/42")


def test_subscription_several_parameters_in_any_combination() -> None:
    """The spec's example: two exact topics and a URL pattern; any topic matching one matcher is received."""
    matchers = query(
        ("match", "https://example.com/foo"),
        ("match", "bar"),
        ("match_urlpattern", "https://example.com/bar/:id"),
        ("match_exact", "baz"),
    )
    assert len(matchers) == 4
    for topic in ["https://example.com/foo", "bar", "https://example.com/bar/1", "baz"]:
        assert matchers.matches(topic), topic
    for topic in ["https://example.com/foo/1", "https://example.com/bar", "qux", "https://example.com/bar/1/2"]:
        assert not matchers.matches(topic), topic


def test_subscription_identical_matchers_may_be_deduplicated() -> None:
    matchers = query(("match", "a"), ("match_exact", "a"), ("match", "b"), ("match", "a"))
    assert [m.value for m in matchers] == ["a", "b"]


def test_subscription_parameters_outside_the_match_namespace_are_left_to_the_caller() -> None:
    matchers = query(("last_event_id", "x"), ("access_token", "t"), ("xmatch", "y"), ("match", "a"))
    assert [m.value for m in matchers] == ["a"]
    assert len(query()) == 0


@pytest.mark.parametrize(
    "name",
    ["Match", "MATCH", "match_Exact", "MATCH_URLPATTERN", "match_urlPattern", "matchURLPattern", "match_regex",
     "match_", "matches", "matching", "match_uritemplate", "mAtCh_exact"],
)  # fmt: skip
def test_subscription_unknown_name_in_the_reserved_match_namespace_is_rejected(name: str) -> None:
    with pytest.raises(MatcherError) as info:
        query((name, "https://example.com/foo"))
    assert info.value.status == 400
    assert name in str(info.value)


def test_subscription_parameter_names_are_case_sensitive() -> None:
    query(("match", "a"), ("match_exact", "b"), ("match_urlpattern", "/c"))
    with pytest.raises(MatcherError):
        query(("Match_exact", "b"))


@pytest.mark.parametrize("parameter", ["match", "match_exact", "match_urlpattern"])
@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_subscription_value_must_be_utf8_without_controls_or_format_characters(parameter: str, char: str) -> None:
    with pytest.raises(MatcherError) as info:
        query((parameter, f"https://example.com/{char}"))
    assert info.value.status == 400


@pytest.mark.parametrize(
    "value",
    ["https://example.com/:id(", "https://example.com/(?a)", "https://exa mple.com/", "/:id/:id", "/(a)(", "https://example.com/{"],
)  # fmt: skip
def test_subscription_value_not_valid_for_its_matcher_type_is_rejected(value: str) -> None:
    with pytest.raises(MatcherError) as info:
        query(("match_urlpattern", value))
    assert info.value.status == 400
    query(("match", value))  # the same string is a fine exact matcher


def test_subscription_matcher_count_limit() -> None:
    query(*[("match", f"t{i}") for i in range(MAX_MATCHERS)])
    with pytest.raises(MatcherLimitError) as info:
        query(*[("match", f"t{i}") for i in range(MAX_MATCHERS + 1)])
    assert info.value.status == 400


def test_subscription_matcher_count_limit_counts_every_parameter_even_duplicates() -> None:
    with pytest.raises(MatcherLimitError):
        query(*[("match", "same")] * (MAX_MATCHERS + 1))


@pytest.mark.parametrize("parameter", ["match", "match_urlpattern"])
def test_subscription_matcher_length_limit_in_utf8_bytes(parameter: str) -> None:
    fits = "/" + "a" * (MAX_MATCHER_LENGTH - 1)
    query((parameter, fits))
    with pytest.raises(MatcherLimitError) as info:
        query((parameter, fits + "a"))
    assert info.value.status == 400
    with pytest.raises(MatcherLimitError):  # "é" is two bytes
        query((parameter, "/" + "é" * (MAX_MATCHER_LENGTH // 2)))


@given(st.lists(st.tuples(st.sampled_from(["match", "match_exact", "match_urlpattern", "matchx", "x"]), st.text())))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_subscription_any_query_is_matchers_or_a_matcher_error(items: list[tuple[str, str]]) -> None:
    status = 200
    try:
        matchers = Matchers.from_query(items, base_url=HUB)
    except MatcherError as exc:
        status = exc.status
        matchers = Matchers()
    assert status in (200, 400)
    for m in matchers:
        assert matchers.matches(m.value) or m.type == URLPATTERN


# -- Matcher Types: the wildcard ------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameter", ["match", "match_exact", "match_urlpattern"])
@given(topic=st.text())
def test_matcher_types_wildcard_matches_every_topic_whatever_the_type(parameter: str, topic: str) -> None:
    matchers = query((parameter, "*"))
    assert matchers.wildcard
    assert matchers.matches(topic)


def test_matcher_types_both_exact_and_urlpattern_are_supported() -> None:
    assert MATCHER_TYPES == ("exact", "urlpattern")
    with pytest.raises(MatcherError):
        compile_matcher("uritemplate", "https://example.com/{id}")


# -- Exact Matching -------------------------------------------------------------------------------------------------


def test_exact_matching_is_case_sensitive() -> None:
    matchers = query(("match", "https://example.com/Foo"))
    assert matchers.matches("https://example.com/Foo")
    assert not matchers.matches("https://example.com/foo")
    assert not matchers.matches("HTTPS://EXAMPLE.COM/Foo")


def test_exact_matching_does_not_resolve_relative_values() -> None:
    matchers = query(("match", "/books/1"))
    assert matchers.matches("/books/1")
    assert not matchers.matches("https://hub.example.com/books/1")


def test_exact_matching_does_not_normalize_unicode_or_iris() -> None:
    nfc, nfd = "https://example.com/caf\u00e9", "https://example.com/cafe\u0301"
    assert not query(("match", nfc)).matches(nfd)
    assert not query(("match", "https://example.com/a%41")).matches("https://example.com/aA")
    assert not query(("match", "https://example.com/a/../b")).matches("https://example.com/b")
    assert not query(("match", "https://EXAMPLE.com/")).matches("https://example.com/")


@given(st.text(), st.text())
def test_exact_matching_never_matches_another_string(value: str, topic: str) -> None:
    assume(value != "*")
    try:
        matcher = compile_matcher(EXACT, value)
    except MatcherError:
        return
    assert matcher.matches(topic) == (topic == value)
    assert matcher.matches(value)


# -- URL Pattern ----------------------------------------------------------------------------------------------------


def test_url_pattern_absolute_pattern() -> None:
    books = pattern("https://example.com/books/:id")
    assert books.matches("https://example.com/books/1")
    assert books.matches("https://example.com/books/1?page=2")  # search and hash default to wildcards
    assert not books.matches("https://example.com/books/1/chapters")
    assert not books.matches("https://example.com/books/")
    assert not books.matches("http://example.com/books/1")
    assert not books.matches("https://example.org/books/1")


def test_url_pattern_relative_pattern_and_topic_resolve_against_the_hub_url() -> None:
    events = pattern("/.well-known/mercure/subscriptions/exact/:topic/:subscriber")
    assert events.matches("/.well-known/mercure/subscriptions/exact/a%2Fb/urn%3Auuid%3A1")
    assert events.matches("https://hub.example.com/.well-known/mercure/subscriptions/exact/a/b")
    assert not events.matches("https://other.example.com/.well-known/mercure/subscriptions/exact/a/b")
    assert pattern("books/:id").matches("books/1")  # relative to the hub URL's directory
    assert pattern("books/:id").matches("https://hub.example.com/.well-known/books/1")


def test_url_pattern_relative_resolution_uses_the_given_hub_url() -> None:
    elsewhere = compile_matcher(URLPATTERN, "/books/:id", base_url="https://other.example/.well-known/mercure")
    assert elsewhere.matches("https://other.example/books/1")
    assert not elsewhere.matches("https://hub.example.com/books/1")


def test_url_pattern_absolute_pattern_takes_nothing_from_the_hub_url() -> None:
    every = pattern("https://example.com/*")
    assert every.matches("https://example.com/a/b")
    assert every.matches("https://example.com/.well-known/x?y#z")  # nor the hub URL's path, query or fragment
    assert not pattern("https://example.com").matches("https://hub.example.com/.well-known/mercure")


def test_url_pattern_host_is_case_insensitive_other_components_are_not() -> None:
    books = pattern("https://example.com/books/:id")
    assert books.matches("https://EXAMPLE.com/books/1")
    assert not books.matches("https://example.com/BOOKS/1")
    assert not pattern("https://example.com/books/abc").matches("https://example.com/books/ABC")


def test_url_pattern_ignore_case_is_never_enabled() -> None:
    assert not pattern("/a/:id(x+)").matches("/a/XX")


def test_url_pattern_unparseable_topic_never_matches() -> None:
    for p in ["*://*/*", "/*", "https://example.com/*", "http\\://[*"]:
        try:
            matcher = pattern(p)
        except MatcherError:
            continue
        assert not matcher.matches("http://[::1/")
        assert not matcher.matches("https://exa mple.com:99999/")


def test_url_pattern_regular_expression_groups_follow_ecmascript() -> None:
    ids = pattern("/books/:id(\\d+)")
    assert ids.matches("/books/12")
    assert not ids.matches("/books/x")
    assert pattern("/d/:y(\\d{4})-:m(\\d{2})").matches("/d/2024-05")
    assert not pattern("/d/:y(\\d{4})-:m(\\d{2})").matches("/d/202-05")
    uuid = pattern("https://example.com/:u([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
    assert uuid.matches("https://example.com/0f8fad5b-d9cb-469f-a165-70867728950e")
    assert pattern("/w/:x([^\\W_]+)").matches("/w/abc1")
    assert not pattern("/w/:x([^\\W_]+)").matches("/w/a_b")
    assert pattern("/s/:x([a&&b]+)").matches("/s/&&")  # ECMAScript: '&' literal, no set intersection


@pytest.mark.parametrize(
    "value",
    ["/:x(\\p{L}+)", "/:x((?i)a)", "/:x(a(?=b))", "/:x(a(?!b))", "/:x(\\1)", "/:x(\\bword)", "/:x(\\u0041)",
     "/:x((?<n>a))", "/:x([a--b])", "/:x([[a]])", "/:x(a{)"],
)  # fmt: skip
def test_url_pattern_regular_expressions_outside_the_linear_subset_are_rejected(value: str) -> None:
    with pytest.raises(MatcherError) as info:
        pattern(value)
    assert info.value.status == 400


def test_url_pattern_denial_of_service_group_limit() -> None:
    pattern("/*" * (MAX_PATTERN_GROUPS - 8))
    with pytest.raises(MatcherLimitError):
        pattern("/*" * (MAX_PATTERN_GROUPS + 1))
    with pytest.raises(MatcherLimitError):
        pattern("".join(f"/:n{i}" for i in range(MAX_PATTERN_GROUPS + 1)))


def test_url_pattern_denial_of_service_regexp_length_and_cost_limits() -> None:
    pattern(f"/:x(a{{{MAX_REGEXP_COST}}})")
    with pytest.raises(MatcherLimitError):
        pattern(f"/:x(a{{{MAX_REGEXP_COST + 1}}})")
    with pytest.raises(MatcherLimitError):
        pattern("/:x((?:(?:a{8}){8}){8})")  # nested repetitions multiply
    with pytest.raises(MatcherLimitError):
        pattern("/:x(" + "a" * (MAX_REGEXP_LENGTH + 1) + ")")
    with pytest.raises(MatcherLimitError):
        pattern("/:x(\\w{1000})")  # ~100 ms to compile in the engine; refused before


ADVERSARIAL_TOPICS = [
    "https://hub.example.com/" + "a" * 2000,
    "https://hub.example.com/" + "ab" * 1000,
    "/" + "a/" * 1000,
    "https://hub.example.com/" + "a/" * 600 + "?" + "b" * 400 + "#" + "c" * 100,
    "https://hub.example.com/" + "%C3%A9" * 330,
]
WORST_PATTERNS = [
    "/*" * (MAX_PATTERN_GROUPS - 2),
    "".join(f"/:n{i}(.*)" for i in range(MAX_PATTERN_GROUPS // 2 - 1)),
    "/:x((?:a*b*){64})",
    "/:x((?:a|aa|aaa)*b)",
    "/:x((?:.|..){40})/*",
    "*://*.*.*.*:*/*?*#*",
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", WORST_PATTERNS)
def test_url_pattern_denial_of_service_worst_patterns_match_in_bounded_time(value: str) -> None:
    matcher = pattern(value)
    started = time.perf_counter()
    for topic in ADVERSARIAL_TOPICS * 10:
        matcher.matches(topic)
    per_test = (time.perf_counter() - started) / (len(ADVERSARIAL_TOPICS) * 10)
    assert per_test < 0.005, f"{per_test * 1000:.2f} ms per test"


PIECES = st.sampled_from(
    ["a", "b", "/", ":id", ":x", "*", "(a*)", "(a+)+", "((?:a|aa)*)", "((?:a*)*b)", "(.*)", "(.*.*.*c)",
     "((?:a|b)*c)", "([^/]+)", "(\\d+)", "{", "}", "?", "+", ".", "-", "(?:a{4}){4}", "(a{16})"]
)  # fmt: skip


@pytest.mark.timeout(20)
@given(st.lists(PIECES, min_size=1, max_size=24), st.sampled_from(ADVERSARIAL_TOPICS), st.integers(1, 2000))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_url_pattern_denial_of_service_adversarial_patterns_never_take_long(
    pieces: list[str], topic: str, cut: int
) -> None:
    """A URL pattern match never takes long, whatever the pattern (within the limits) and the topic."""
    try:
        matcher = pattern("/" + "".join(pieces))
    except MatcherError:
        return
    started = time.perf_counter()
    matcher.matches(topic[:cut])
    matcher.matches(topic[:cut] + "!")
    assert time.perf_counter() - started < 0.05


def test_url_pattern_topics_over_the_length_limit_are_never_evaluated() -> None:
    every = pattern("/*")
    assert every.matches("/" + "a" * (MAX_TOPIC_LENGTH - 1))
    assert not every.matches("/" + "a" * MAX_TOPIC_LENGTH)
    assert query(("match", "/" + "a" * 10)).matches("/" + "a" * 10)


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_url_pattern_any_topic_is_a_yes_or_no_never_an_error(topic: str) -> None:
    for matcher in (pattern("/books/:id"), pattern("https://example.com/*"), pattern("*://*/*")):
        assert isinstance(matcher.matches(topic), bool)


def test_url_pattern_compilations_are_shared() -> None:
    assert pattern("/shared/:id")._pattern is pattern("/shared/:id")._pattern


# -- Topic Matcher List (the matchers of a token) -------------------------------------------------------------------


def test_topic_matcher_list_match_type_defaults_to_exact() -> None:
    matchers = Matchers.from_token_topics([{"match": "https://example.com/books/1"}], base_url=HUB)
    assert [m.key for m in matchers] == [(EXACT, "https://example.com/books/1")]


def test_topic_matcher_list_urlpattern_and_exact() -> None:
    matchers = Matchers.from_token_topics(
        [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}, {"match": "x", "match_type": "exact"}],
        base_url=HUB,
    )
    assert matchers.matches("https://example.com/books/7")
    assert matchers.matches("x")
    assert not matchers.matches("https://example.com/books")


@pytest.mark.parametrize("match_type", [None, "exact", "urlpattern"])
def test_topic_matcher_list_wildcard_whatever_the_match_type(match_type: str | None) -> None:
    entry = {"match": "*"} if match_type is None else {"match": "*", "match_type": match_type}
    assert Matchers.from_token_topics([entry]).matches("anything at all")


@pytest.mark.parametrize(
    "topics",
    [
        [],
        "https://example.com/",
        {"match": "x"},
        ["https://example.com/"],
        [{"match_type": "exact"}],
        [{"match": 1}],
        [{"match": None}],
        [{"match": "x", "match_type": "Exact"}],
        [{"match": "x", "match_type": "URLPattern"}],
        [{"match": "x", "match_type": "uritemplate"}],
        [{"match": "*", "match_type": "regex"}],
        [{"match": "x", "match_type": None}],
        [{"match": "/(", "match_type": "urlpattern"}],
        [{"match": "a\u200bb"}],
        [{"match": "x"}, "y"],
        [{"match": "x"}] * (MAX_MATCHERS + 1),
    ],
)
def test_topic_matcher_list_malformed_entries_are_rejected(topics: object) -> None:
    with pytest.raises(MatcherError):
        Matchers.from_token_topics(topics)


def test_topic_matcher_list_other_members_are_ignored() -> None:
    assert Matchers.from_token_topics([{"match": "x", "note": 1}]).matches("x")


# -- matching an update ---------------------------------------------------------------------------------------------


def test_matches_any_matches_when_one_of_the_topics_does() -> None:
    matchers = query(("match", "b"), ("match_urlpattern", "/c/:id"))
    assert matchers.matches_any(["a", "b"])
    assert matchers.matches_any(["a", "/c/1"])
    assert not matchers.matches_any(["a", "/c"])
    assert not matchers.matches_any([])


def test_matchers_union_and_views() -> None:
    union = Matchers.union(query(("match", "a")), query(("match_urlpattern", "/b/*"), ("match", "a")))
    assert [m.key for m in union] == [(EXACT, "a"), (URLPATTERN, "/b/*")]
    assert union.exact_topics == {"a"}
    assert union.has_patterns
    assert not union.wildcard


# -- Publication: the topic ------------------------------------------------------------------------------------------

RESERVED = [
    "/.well-known/mercure",
    "/.well-known/mercure/",
    "/.well-known/mercure/subscriptions/exact/a/b",
    "https://hub.example.com/.well-known/mercure/subscriptions/exact/a/b",
    "https://anything.example/.well-known/mercure/subscriptions",  # regardless of authority
    "http://hub.example.com:8080/.well-known/mercure",
    "foo://host/.well-known/mercure/x",  # regardless of scheme
    "mailto:/.well-known/mercure/x",
    "//evil.example/.well-known/mercure/x",
    "/.well-known/%6Dercure/subscriptions",  # percent-encoded unreserved characters are decoded
    "/.well-known/%6dercure/x",
    "/%2Ewell-known/mercure/x",
    "/.well-known/mercure%2Fx".replace("%2F", "/"),
    "/.well-known/mercure/../mercure/x",  # dot-segments are removed
    "/.well-known/mercure/%2e%2E/mercure/x",
    "/a/../.well-known/mercure",
    "/.well-known/./mercure/x",
    "https://hub.example.com\\.well-known\\mercure\\x",  # the WHATWG parser reads backslashes as slashes
    "mercure/subscriptions",  # relative: resolved against the hub URL, /.well-known/mercure/subscriptions
    "./mercure",
    "?query",  # the hub URL itself
    "#fragment",
    "",
]
NOT_RESERVED = [
    "https://example.com/books/1",
    "/.well-known/mercurex",
    "/.well-known/mercure-x/y",
    "/.well-known/Mercure/x",
    "/.well-known/mercure%2Fx",  # %2F is not unreserved: a segment of its own
    "/.well-known/mercure/../x",
    "urn:.well-known/mercure",  # an opaque path
    "urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6",
    "http://[::1/.well-known/mercure/x",  # can't be parsed: can't name a hub path
    "books",
    "/books/1",
]


@pytest.mark.parametrize("topic", RESERVED)
def test_publication_topic_in_the_reserved_hub_namespace_is_refused_with_403(topic: str) -> None:
    assert addresses_reserved_namespace(topic, HUB)
    with pytest.raises(ReservedTopicError) as info:
        check_publication_topic(topic, hub_url=HUB)
    assert info.value.status == 403


@pytest.mark.parametrize("topic", NOT_RESERVED)
def test_publication_topic_outside_the_reserved_namespace_is_accepted(topic: str) -> None:
    assert not addresses_reserved_namespace(topic, HUB)
    check_publication_topic(topic, hub_url=HUB)


def test_publication_reserved_namespace_follows_the_hub_url_path() -> None:
    hub = "https://example.com/hub"
    assert addresses_reserved_namespace("/hub/subscriptions", hub)
    assert addresses_reserved_namespace("https://x.example/h%75b", hub)
    assert not addresses_reserved_namespace("/.well-known/mercure/subscriptions", hub)
    assert not addresses_reserved_namespace("/hubx", hub)
    assert addresses_reserved_namespace("/.well-known/mercure/x")  # the default hub URL
    assert DEFAULT_HUB_URL.endswith("/.well-known/mercure")


def test_publication_topic_wildcard_is_refused() -> None:
    with pytest.raises(MatcherError) as info:
        check_publication_topic("*", hub_url=HUB)
    assert info.value.status == 400
    check_publication_topic("**", hub_url=HUB)
    check_publication_topic("/*", hub_url=HUB)


def test_publication_topic_length_limit_is_413() -> None:
    check_publication_topic("/" + "a" * (MAX_TOPIC_LENGTH - 1), hub_url=HUB)
    for topic in ["/" + "a" * MAX_TOPIC_LENGTH, "/" + "é" * (MAX_TOPIC_LENGTH // 2)]:
        with pytest.raises(MatcherLimitError) as info:
            check_publication_topic(topic, hub_url=HUB)
        assert info.value.status == 413


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_publication_any_topic_is_accepted_or_refused_with_a_status(topic: str) -> None:
    status, message = 200, "accepted"
    try:
        check_publication_topic(topic, hub_url=HUB)
    except MatcherError as exc:
        status, message = exc.status, str(exc)
    assert status in (200, 400, 403, 413)
    assert message


@given(st.text(alphabet="/.%2eEmrcuwlkn-ab\\", max_size=60))
@settings(max_examples=300)
def test_publication_no_spelling_of_a_hub_path_escapes_the_reserved_namespace(suffix: str) -> None:
    """Whatever dot-segments and encodings a topic uses, it is refused when it resolves under the hub URL's path."""
    from urlpattern import URLPattern

    topic = "https://hub.example.com/" + suffix
    under = URLPattern("https://hub.example.com/.well-known/mercure{/*}?")
    decoded = topic.replace("%6D", "m").replace("%6d", "m").replace("%2E", ".").replace("%2e", ".")
    if under.test(decoded):
        assert addresses_reserved_namespace(topic, HUB), topic


# -- legacy topic selectors (the pre-standardization ``topic`` parameter, URI templates) ----------------------------


def test_legacy_topic_parameter_is_a_selector_not_an_unknown_parameter() -> None:
    matchers = query(("topic", "https://example.com/books/1"), ("match", "a"))
    assert [(m.type, m.value) for m in matchers] == [(LEGACY, "https://example.com/books/1"), (EXACT, "a")]
    assert matchers.exact_topics == {"https://example.com/books/1", "a"}
    assert not matchers.has_patterns
    assert matchers.matches("https://example.com/books/1")
    assert not matchers.matches("https://example.com/books/10")


def test_legacy_topic_wildcard_matches_everything() -> None:
    matchers = query(("topic", "*"))
    assert matchers.wildcard
    assert matchers.matches("https://example.com/anything")


@pytest.mark.parametrize(
    ("template", "topic", "expected"),
    [
        ("https://example.com/books/{id}", "https://example.com/books/1", True),
        ("https://example.com/books/{id}", "https://example.com/books/", True),
        ("https://example.com/books/{id}", "https://example.com/books/a%20b", True),
        ("https://example.com/books/{id}", "https://example.com/books/1/reviews", False),
        ("https://example.com/books/{id}", "https://example.com/authors/1", False),
        ("https://example.com/books/{id}", "https://example.com/books/1?x", False),
        ("https://example.com/{+path}", "https://example.com/a/b?c=d", True),
        ("https://example.com/{+path}/end", "https://example.com/a/b/end", True),
        ("https://example.com/{+path}/end", "https://example.com/a/b/endx", False),
        ("https://example.com/books{/id,sub}", "https://example.com/books/1/2", True),
        ("https://example.com/books{/id}", "https://example.com/books", True),
        ("https://example.com/search{?q,page}", "https://example.com/search?q=a&page=2", True),
        ("https://example.com/search{?q}{&page}", "https://example.com/search?q=a&page=2", True),
        ("https://example.com/doc{#section}", "https://example.com/doc#a/b", True),
        ("https://example.com/x{.fmt}", "https://example.com/x.json", True),
        ("https://example.com/x{;v}", "https://example.com/x;v=1", True),
        ("{a}/{b}", "x/y", True),
        ("{a}/{b}", "x/y/z", False),
    ],
)
def test_legacy_uri_template_matching(template: str, topic: str, expected: bool) -> None:
    assert UriTemplate(template).matches(topic) is expected
    assert query(("topic", template)).matches(topic) is expected


@pytest.mark.parametrize("template", ["https://example.com/{", "https://example.com/}", "{}", "{a b}", "{!a}", "{a,}"])
def test_legacy_malformed_uri_template_is_400(template: str) -> None:
    with pytest.raises(MatcherError) as info:
        query(("topic", template))
    assert info.value.status == 400


def test_legacy_uri_template_limits() -> None:
    with pytest.raises(MatcherLimitError):
        UriTemplate("x" * (MAX_TEMPLATE_LENGTH + 1) + "{a}")
    with pytest.raises(MatcherLimitError):
        UriTemplate("{a}" * (MAX_TEMPLATE_EXPRESSIONS + 1))
    assert not UriTemplate("{+a}").matches("x" * (MAX_TOPIC_LENGTH + 1))


def test_legacy_uri_template_worst_case_is_bounded() -> None:
    template = UriTemplate("{+a}" + "a" * 400 + "{+b}" * 15)
    started = time.perf_counter()
    template.matches("a" * MAX_TOPIC_LENGTH + "b")
    assert time.perf_counter() - started < 1.0


def test_legacy_matcher_type_is_not_a_token_match_type() -> None:
    with pytest.raises(MatcherError):
        Matchers.from_token_topics([{"match": "https://example.com/{id}", "match_type": LEGACY}])


def test_legacy_selectors_of_a_mercure_claim() -> None:
    matchers = Matchers.from_legacy_selectors(
        ["https://example.com/books/{id}", "exact", {"match": "https://example.com/:x", "match_type": URLPATTERN}]
    )
    assert matchers.matches("https://example.com/books/1")
    assert matchers.matches("exact")
    assert matchers.matches("https://example.com/y")
    assert not matchers.matches("https://example.com/books/1/2")
    assert len(Matchers.from_legacy_selectors([])) == 0
    with pytest.raises(MatcherError):
        Matchers.from_legacy_selectors("https://example.com/{id}")
    with pytest.raises(MatcherLimitError):
        Matchers.from_legacy_selectors(["x"] * (MAX_MATCHERS + 1))
