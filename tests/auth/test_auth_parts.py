"""The parts of access control on their own: selectors, the verifier and its cache, where tokens are found."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import token as tokens
from api.__main__ import check_access, is_loopback
from api.auth import access as access_module
from api.auth import verifier as tokens_module
from api.auth.access import Access
from api.auth.credentials import bearer_token, cookie_token, subscriber_token
from api.auth.keys import JwksKeys, KeyConfigError, StaticKey, parse_algorithms
from api.auth.selectors import MAX_SELECTOR_LENGTH, MAX_SELECTORS, InvalidSelector, TopicMatcher, selector_tokens
from api.auth.verifier import InvalidToken, TokenVerifier
from api.settings import Settings

SECRET = secrets.token_urlsafe(48)

# -- selectors ------------------------------------------------------------------

SEGMENT = st.text(alphabet="abcxyz019_-.:@", min_size=1, max_size=6)


@pytest.mark.parametrize(
    ("selector", "sub", "topic", "covered"),
    [
        ("news", None, "news", True),
        ("news", None, "news2", False),
        ("user/1/*", None, "user/1/inbox", True),
        ("user/1/*", None, "user/12/x", False),
        ("user/1/*", None, "user/1/a/b", False),
        ("user/1/**", None, "user/1/a/b", True),
        ("user/1/**", None, "user/12/a", False),
        ("orders/*-eu", None, "orders/7-eu", True),
        ("orders/*-eu", None, "orders/7/x-eu", False),
        ("user/{sub}/**", "42", "user/42/notes", True),
        ("user/{sub}/**", "42", "user/4/notes", False),
        ("user/{sub}/**", None, "user/{sub}/notes", False),
        ("user/{sub}/**", "*", "user/anything/x", False),  # the subject is literal, never a pattern
        ("user/{sub}/**", "1/x", "user/1/x/y", False),  # a subject holding / matches nothing
        ("user/{sub}/**", "", "user//x", False),
        ("a.b", None, "aXb", False),  # . is a character, not a regex wildcard
        ("**", None, "any/thing/at/all", True),
    ],
)
def test_selector_examples(selector: str, sub: str | None, topic: str, covered: bool) -> None:
    assert TopicMatcher([selector], sub).covers(topic) is covered


@settings(max_examples=300, deadline=None)
@given(SEGMENT, SEGMENT, st.lists(SEGMENT, min_size=1, max_size=3))
def test_a_single_star_never_crosses_a_slash_nor_extends_a_segment(user: str, other: str, rest: list[str]) -> None:
    """``user/U/*`` matches exactly the topics one segment below ``user/U``: never ``user/U2/x``, never deeper."""
    matcher = TopicMatcher([f"user/{user}/*"])
    assert matcher.covers(f"user/{user}/{rest[0]}")
    assert not matcher.covers(f"user/{user}/" + "/".join([*rest, "z"]))
    if other != user:
        assert not matcher.covers(f"user/{other}/{rest[0]}")
        assert not matcher.covers(f"user/{user}{other}/{rest[0]}")


@settings(max_examples=300, deadline=None)
@given(SEGMENT, SEGMENT, st.lists(SEGMENT, min_size=1, max_size=4))
def test_sub_selector_covers_exactly_the_subjects_tree(sub: str, other: str, path: list[str]) -> None:
    matcher = TopicMatcher(["user/{sub}/**"], sub)
    assert matcher.covers(f"user/{sub}/" + "/".join(path))
    if other != sub:
        assert not matcher.covers(f"user/{other}/" + "/".join(path))
        assert not matcher.covers(f"user/{sub}{other}/" + "/".join(path))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab/*{}sub.", min_size=1, max_size=12), st.text(alphabet="ab/.", min_size=1, max_size=12))
def test_a_selector_without_wildcards_matches_only_itself(selector: str, topic: str) -> None:
    literal = "*" not in selector and "{sub}" not in selector
    if literal:
        assert TopicMatcher([selector]).covers(topic) is (topic == selector)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_any_subject_is_substituted_literally_or_not_at_all(sub: str) -> None:
    steps = selector_tokens("user/{sub}/x", sub)
    if steps is not None:
        assert "".join(str(step) for step in steps) == f"user/{sub}/x"
        assert TopicMatcher(["user/{sub}/x"], sub).covers(f"user/{sub}/x") or len(f"user/{sub}/x") > 200
        assert "/" not in sub
        assert "*" not in sub


def backtracking_reference(selectors: list[str]) -> re.Pattern[str]:
    """What selectors meant when they were compiled to Python's (backtracking) regular expressions."""
    patterns = []
    for selector in selectors:
        parts = [{"**": ".*", "*": "[^/]*"}.get(piece, re.escape(piece)) for piece in re.split(r"(\*\*|\*)", selector)]
        patterns.append("".join(parts))
    return re.compile("(?s)" + "|".join(f"(?:{p})" for p in patterns))


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.text(alphabet="ab/*", min_size=1, max_size=8), min_size=1, max_size=3),
    st.text(alphabet="ab/", min_size=1, max_size=10),
)
def test_the_automaton_covers_exactly_what_the_regular_expressions_did(selectors: list[str], topic: str) -> None:
    expected = backtracking_reference(selectors).fullmatch(topic) is not None
    assert TopicMatcher(selectors).covers(topic) is expected


ADVERSARIAL = [
    ["metrics.*.*.*.*.*"],  # HERALD_PUBLIC_TOPICS of the attack: 5 stars, then a topic of 150 dots
    ["*." * 200],  # a token's selector with 200 stars
    ["*a" * 250],
    ["**a" * 170],
    ["*/" * 250],
    [f"{'*x' * 100}{i}" for i in range(MAX_SELECTORS)],  # the most selectors a list may hold
]


@pytest.mark.parametrize("selectors", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@settings(max_examples=50, deadline=None)
@given(filler=st.sampled_from(".ax/"), tail=st.sampled_from(["", "/", "b", "a/"]))
def test_regression_a_crafted_topic_froze_the_node_in_selector_matching(
    selectors: list[str], filler: str, tail: str
) -> None:
    """Backtracking took 12.5 s for one topic of 159 characters; one pass takes a millisecond or so here."""
    matcher = TopicMatcher(selectors)
    topic = "metrics." + filler * (200 - len("metrics.") - len(tail)) + tail
    started = time.perf_counter()
    matcher.covers(topic)
    matcher.covers(topic[:100])
    assert time.perf_counter() - started < 0.5  # generous for a busy machine; the backtracking took seconds


def test_selectors_and_lists_have_limits() -> None:
    with pytest.raises(InvalidSelector, match="at most"):
        TopicMatcher(["a" * (MAX_SELECTOR_LENGTH + 1)])
    with pytest.raises(InvalidSelector, match="at most"):
        TopicMatcher(["a"] * (MAX_SELECTORS + 1))
    with pytest.raises(InvalidSelector, match="substituted"):
        TopicMatcher(["{sub}" * 100], "x" * 10)
    assert TopicMatcher(["**"]).covers("a" * 200)
    assert not TopicMatcher(["**"]).covers("a" * 201)  # no topic is that long


# -- the verifier -----------------------------------------------------------------


def verifier(**kwargs: object) -> TokenVerifier:
    return TokenVerifier(StaticKey.from_secret(SECRET, None), **kwargs)  # type: ignore[arg-type]


async def test_a_connect_storm_with_one_token_costs_one_verification() -> None:
    check = verifier()
    token = tokens.mint(SECRET, subscribe=["user/{sub}/**"], sub="42")
    grants = await asyncio.wait_for(asyncio.gather(*(check.verify(token) for _ in range(5000))), 10)
    assert check.verified == 1
    assert all(g is grants[0] for g in grants)
    assert grants[0].subscribe.covers("user/42/a")


async def test_a_cached_token_stops_working_at_its_exp() -> None:
    check = verifier()
    token = tokens.mint(SECRET, subscribe=["**"], ttl=1)
    grant = await check.verify(token)
    assert grant.expires_at == pytest.approx(time.time() + 1, abs=1.5)
    await asyncio.sleep(max(0.0, grant.expires_at - time.time()) + 0.01)  # the clock must pass exp itself
    with pytest.raises(InvalidToken, match="expired"):
        await check.verify(token)


async def test_exp_gets_no_leeway_but_nbf_does() -> None:
    check = verifier(leeway=30)
    now = int(time.time())
    late = jwt.encode({"exp": now - 5, "herald": {}}, SECRET, "HS256")
    early = jwt.encode({"exp": now + 60, "nbf": now + 10, "herald": {}}, SECRET, "HS256")
    with pytest.raises(InvalidToken, match="expired"):
        await check.verify(late)
    assert (await check.verify(early)).expires_at == now + 60


async def test_failed_verifications_are_not_cached() -> None:
    check = verifier()
    token = jwt.encode({"exp": int(time.time()) + 60}, "y" * 40, "HS256")
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await check.verify(token)
    assert (check.verified, check.rejected) == (0, 3)


def test_verify_now_checks_a_token_with_a_key_held_and_counts_and_caches_it_as_verify_does() -> None:
    check = verifier()
    token = tokens.mint(SECRET, subscribe=["a/**"], sub="7")
    grant = check.verify_now(token)
    assert grant is not None
    assert grant.subscribe.covers("a/b")
    assert check.verify_now(token) is grant  # from the cache now
    assert (check.verified, check.rejected, check.cached) == (1, 0, 1)


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode({"exp": int(time.time()) + 60, "herald": {}}, "y" * 40, "HS256"),  # another key
        jwt.encode({"exp": int(time.time()) - 1, "herald": {}}, SECRET, "HS256"),  # expired
        jwt.encode({"exp": int(time.time()) + 60, "herald": {}}, SECRET, "HS512"),  # an algorithm not configured
        "not.a.token",
    ],
)
def test_verify_now_leaves_a_bad_token_to_verify_counting_nothing(token: str) -> None:
    check = verifier()
    assert check.verify_now(token) is None
    assert (check.verified, check.rejected, check.cached) == (0, 0, 0)


def test_verify_now_does_not_wait_for_keys_to_be_fetched() -> None:
    check = TokenVerifier(JwksKeys("http://127.0.0.1:9/jwks.json", None))
    token = jwt.encode({"exp": int(time.time()) + 60, "herald": {}}, "z" * 40, "HS256", headers={"kid": "k1"})
    assert check.verify_now(token) is None  # no key set loaded yet: verify() would fetch it


def test_a_subscription_allowed_at_once_is_kept_until_its_grant_expires_or_the_keys_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = verifier()
    access = Access(check)
    looked: list[str] = []
    verify_now = check.verify_now

    def spy(token: str) -> tokens_module.Grant | None:
        looked.append(token)
        return verify_now(token)

    monkeypatch.setattr(check, "verify_now", spy)
    clock = FakeClock(time.time())
    monkeypatch.setattr(access_module, "time", clock)
    token = tokens.mint(SECRET, subscribe=["a/**"], ttl=3600)
    allowed, grant = access.authorize_subscribe_now(token, ("a/1",))
    assert allowed
    assert grant is not None
    assert access.authorize_subscribe_now(token, ("a/1",)) == (True, grant)
    assert len(looked) == 1  # kept: no second look
    assert access.authorize_subscribe_now(token, ("b",)) == (False, None)  # not covered: the app refuses it
    assert access.authorize_subscribe_now(None, ("a/1",)) == (False, None)
    clock.now = grant.expires_at  # the grant's exp: the kept answer is no answer any more
    access.authorize_subscribe_now(token, ("a/1",))
    assert len(looked) == 3
    clock.now = time.time()
    check.keys.generation = 99  # type: ignore[misc]  # a new key set
    access.authorize_subscribe_now(token, ("a/1",))
    assert len(looked) == 4


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


async def test_the_cache_is_bounded() -> None:
    check = verifier(cache_size=10)
    for i in range(50):
        await check.verify(tokens.mint(SECRET, sub=str(i)))
    assert len(check._cache) <= 10


@pytest.mark.parametrize(
    ("text", "secret", "error"),
    [
        ("none", True, "never accepted"),
        ("None", False, "never accepted"),
        ("HS256", False, "HMAC"),
        ("RS256", True, "needs a public key"),
        ("XX999", True, "unknown algorithm"),
    ],
)
def test_algorithms_come_from_configuration_and_fit_the_key(text: str, secret: bool, error: str) -> None:
    with pytest.raises(KeyConfigError, match=error):
        parse_algorithms(text, secret=secret)


def test_default_algorithms() -> None:
    assert parse_algorithms(None, secret=True) == {"HS256"}
    assert parse_algorithms("", secret=False) == {"RS256", "ES256", "EdDSA"}


# -- where the token is -----------------------------------------------------------


def test_token_locations_in_order() -> None:
    header = [(b"authorization", b"Bearer H"), (b"cookie", b"herald_token=C")]
    assert subscriber_token(header, [("access_token", "Q")], "herald_token") == "H"
    assert subscriber_token(header[1:], [("access_token", "Q")], "herald_token") == "Q"
    assert subscriber_token(header[1:], [], "herald_token") == "C"
    assert subscriber_token([], [], "herald_token") is None


def test_a_non_bearer_authorization_is_an_unusable_token_not_an_absent_one() -> None:
    assert bearer_token([(b"authorization", b"Basic dXNlcjpwYXNz")]) == ""


def test_cookie_is_found_among_others_and_by_its_configured_name() -> None:
    headers = [(b"cookie", b"a=1; session=s; herald_token=T; z=2")]
    assert cookie_token(headers, "herald_token") == "T"
    assert cookie_token(headers, "session") == "s"
    assert cookie_token(headers, "missing") is None


# -- starting a node ----------------------------------------------------------------


def test_a_node_open_to_the_network_without_auth_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="herald.node"):
        check_access(Settings(host="127.0.0.1"))
        assert not caplog.records
        check_access(Settings(host="0.0.0.0"))
        check_access(Settings(host="0.0.0.0", jwt_secret=SECRET))
    assert len(caplog.records) == 1
    assert "access control is off" in caplog.records[0].getMessage()


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback("example.com")


def test_a_cookie_from_a_page_of_an_unlisted_origin_is_not_the_users() -> None:
    from api.auth.cors import Cors

    cors = Cors.parse("https://app.example")
    host = (b"host", b"push.example")
    assert cors.trusts_ambient_credentials([host])  # no Origin: same-origin GET, or not a browser
    assert cors.trusts_ambient_credentials([host, (b"origin", b"https://app.example")])
    assert cors.trusts_ambient_credentials([host, (b"origin", b"https://push.example")])  # the node's own
    assert not cors.trusts_ambient_credentials([host, (b"origin", b"https://evil.example")])
    headers = [host, (b"origin", b"https://evil.example"), (b"cookie", b"herald_token=C")]
    trusted = cors.trusts_ambient_credentials(headers)
    assert subscriber_token(headers, [], "herald_token", trusted) is None
    assert subscriber_token([*headers, (b"authorization", b"Bearer H")], [], "herald_token", trusted) == "H"
