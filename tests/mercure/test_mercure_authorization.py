"""Unit tests of api.mercure.authorization, one (or a few) per rule of the Mercure spec (spec/mercure.md, 1.0).

Test names start with the spec section they hold the code to: presenting (the access token), token_validation,
authorization_details, topic_matcher_list, publishers, subscribers, payloads, error_responses. Tokens are minted
here with PyJWT: HS256 with a secret (StaticKey.from_secret), ES256 with a generated key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from api.auth.keys import JwksKeys, KeysUnavailable, StaticKey
from api.mercure.authorization import (
    INVALID_TOKEN_DESCRIPTION,
    LEGACY_COOKIE_NAME,
    MAX_AUTHORIZATION_DETAILS,
    MAX_TOKEN_LENGTH,
    MAX_TOKEN_MATCHERS,
    RECOMMENDED_COOKIE_NAME,
    BearerError,
    MercureGrant,
    MercureTokenVerifier,
    bearer_challenge,
    grant_from_claims,
    insufficient_scope,
    invalid_request,
    invalid_token,
    is_access_token_type,
    missing_token,
    token_from,
)
from api.mercure.matchers import EXACT, URLPATTERN, Matcher, Matchers, compile_matcher

HUB = "https://hub.example.com/.well-known/mercure"
AUDIENCE = HUB
ISSUER = "https://issuer.example"
SECRET = "a-test-secret-that-is-long-enough-for-hs256-hs384-and-hs512-too!"
METADATA = "https://hub.example.com/.well-known/oauth-protected-resource/.well-known/mercure"

EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())
EC_PUBLIC_PEM = (
    EC_PRIVATE.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
OTHER_EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())


def detail(actions: Any, topics: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "mercure", "actions": actions, "topics": topics, **extra}


EVERYTHING = [detail(["publish", "subscribe"], [{"match": "*"}])]


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 600,
        "sub": "urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6",
        "authorization_details": EVERYTHING,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any] | None = None, *, typ: str | None = "at+jwt", **header: Any) -> str:
    headers = {"typ": typ, **header} if typ is not None else header
    return jwt.encode(claims() if payload is None else payload, SECRET, algorithm="HS256", headers=headers)


def es256(payload: dict[str, Any] | None = None, *, key: Any = EC_PRIVATE, **header: Any) -> str:
    return jwt.encode(
        claims() if payload is None else payload, key, algorithm="ES256", headers={"typ": "at+jwt", **header}
    )


def verifier(keys: Any = None, **options: Any) -> MercureTokenVerifier:
    options.setdefault("audience", AUDIENCE)
    options.setdefault("issuers", (ISSUER,))
    options.setdefault("base_url", HUB)
    return MercureTokenVerifier(keys or StaticKey.from_secret(SECRET, "HS256"), **options)


async def rejected(token: str, v: MercureTokenVerifier | None = None) -> BearerError:
    with pytest.raises(BearerError) as info:
        await (v or verifier()).verify(token)
    assert info.value.status == 401
    assert info.value.error == "invalid_token"
    return info.value


# -- Token Validation -----------------------------------------------------------------------------------------------


async def test_token_validation_accepts_a_valid_hs256_access_token() -> None:
    grant = await verifier().verify(hs256())
    assert grant.may_publish("https://example.com/x")
    assert grant.may_receive("https://example.com/x")
    assert grant.subject == "urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6"
    assert grant.issuer == ISSUER


async def test_token_validation_accepts_a_valid_es256_access_token() -> None:
    keys = StaticKey.from_public_key(EC_PUBLIC_PEM, "ES256")
    grant = await verifier(keys).verify(es256())
    assert grant.may_publish("x")
    await rejected(es256(key=OTHER_EC_PRIVATE), verifier(keys))


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "At+Jwt", "application/at+jwt", "Application/AT+JWT"])
async def test_token_validation_typ_at_jwt_compared_case_insensitively_application_prefix_omitted(typ: str) -> None:
    assert is_access_token_type(typ)
    await verifier().verify(hs256(typ=typ))


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt ", "application/jwt", "text/at+jwt", "id_token+jwt", ""])
async def test_token_validation_other_typ_is_rejected(typ: str | None) -> None:
    await rejected(hs256(typ=typ) if typ is not None else jwt.encode(claims(), SECRET, algorithm="HS256"))


async def test_token_validation_typ_must_be_a_string() -> None:
    assert not is_access_token_type(["at+jwt"])
    await rejected(jwt.encode(claims(), SECRET, algorithm="HS256", headers={"typ": 1}))


async def test_token_validation_algorithm_not_on_the_allowlist_is_rejected() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS384", headers={"typ": "at+jwt"})
    await rejected(token)
    await verifier(StaticKey.from_secret(SECRET, "HS256,HS384")).verify(token)


def _unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}."


async def test_token_validation_alg_none_is_never_accepted() -> None:
    await rejected(_unsigned(claims(), {"alg": "none", "typ": "at+jwt"}))
    await rejected(_unsigned(claims(), {"alg": "None", "typ": "at+jwt"}))


async def test_token_validation_alg_must_fit_the_key_no_algorithm_confusion() -> None:
    """An HS256 token whose secret is the public key's PEM must not verify against that public key."""
    keys = StaticKey.from_public_key(EC_PUBLIC_PEM, "ES256")
    signing_input = _unsigned(claims(), {"alg": "HS256", "typ": "at+jwt"})[:-1]
    signature = hmac.new(EC_PUBLIC_PEM.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    await rejected(token, verifier(keys))


async def test_token_validation_key_material_in_the_token_is_never_used() -> None:
    """A token signed with its own key, announced in ``jwk``/``jku``/``x5u``, is not accepted."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    keys = StaticKey.from_public_key(EC_PUBLIC_PEM, "ES256")
    for extra in ({"jwk": jwk}, {"jku": "https://attacker.example/jwks"}, {"x5u": "https://attacker.example/c"}):
        await rejected(es256(key=attacker, **extra), verifier(keys))


async def test_token_validation_kid_only_chooses_among_trusted_keys() -> None:
    first = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_PRIVATE.public_key()))
    second = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(OTHER_EC_PRIVATE.public_key()))
    jwks = {"keys": [{**first, "kid": "one", "use": "sig"}, {**second, "kid": "two", "use": "sig"}]}
    keys = JwksKeys(
        "https://issuer.example/jwks", "ES256", transport=httpx.MockTransport(lambda _: httpx.Response(200, json=jwks))
    )
    await keys.start()
    try:
        v = verifier(keys)
        assert (await v.verify(es256(kid="one"))).may_publish("x")
        assert (await v.verify(es256(key=OTHER_EC_PRIVATE, kid="two"))).may_publish("x")
        await rejected(es256(kid="two"), v)  # the kid picks a trusted key; the signature must still verify with it
        await rejected(es256(kid="three"), v)
    finally:
        await keys.close()


async def test_token_validation_unreachable_keys_are_a_passing_cause_not_an_invalid_token() -> None:
    keys = JwksKeys(
        "https://issuer.example/jwks", "ES256", transport=httpx.MockTransport(lambda _: httpx.Response(503))
    )
    await keys.start()
    try:
        with pytest.raises(KeysUnavailable):
            await verifier(keys).verify(es256(kid="one"))
    finally:
        await keys.close()


async def test_token_validation_keys_per_issuer_never_pooled() -> None:
    """With keys per issuer, a token is verified with its own issuer's keys only."""
    a = StaticKey.from_public_key(EC_PUBLIC_PEM, "ES256")
    b_pem = OTHER_EC_PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b = StaticKey.from_public_key(b_pem.decode(), "ES256")
    v = MercureTokenVerifier({"https://a.example": a, "https://b.example": b}, audience=AUDIENCE, base_url=HUB)
    assert v.issuers == {"https://a.example", "https://b.example"}
    await v.verify(es256(claims(iss="https://a.example")))
    await v.verify(es256(claims(iss="https://b.example"), key=OTHER_EC_PRIVATE))
    await rejected(es256(claims(iss="https://b.example")), v)  # A's key, B's identity
    await rejected(es256(claims(iss="https://c.example")), v)
    await rejected(es256(claims(iss=None)), v)


async def test_token_validation_exp_is_required() -> None:
    await rejected(hs256(claims(exp=None)))


async def test_token_validation_exp_is_enforced_including_on_the_first_request() -> None:
    await rejected(hs256(claims(exp=int(time.time()) - 1)))


async def test_token_validation_exp_gets_no_leeway() -> None:
    await rejected(hs256(claims(exp=int(time.time()) - 5)), verifier(leeway=60))


@pytest.mark.parametrize("exp", ["9999999999", True, None, [1]])
async def test_token_validation_exp_must_be_a_number(exp: Any) -> None:
    payload = claims()
    payload["exp"] = exp
    await rejected(hs256(payload))


async def test_token_validation_nbf_is_enforced_when_present() -> None:
    await rejected(hs256(claims(nbf=int(time.time()) + 120)), verifier(leeway=30))
    await verifier(leeway=30).verify(hs256(claims(nbf=int(time.time()) + 10)))  # an issuer's clock a little ahead
    await verifier().verify(hs256(claims(nbf=int(time.time()) - 10)))
    await rejected(hs256(claims(nbf="0")))


async def test_token_validation_aud_is_required() -> None:
    await rejected(hs256(claims(aud=None)))


async def test_token_validation_aud_string_or_array_must_hold_the_resource_identifier() -> None:
    await verifier().verify(hs256(claims(aud=AUDIENCE)))
    await verifier().verify(hs256(claims(aud=["https://other.example", AUDIENCE])))
    await rejected(hs256(claims(aud="https://other.example/.well-known/mercure")))
    await rejected(hs256(claims(aud=["https://other.example"])))
    await rejected(hs256(claims(aud=AUDIENCE + "/")))


def test_token_validation_the_resource_identifier_must_be_configured() -> None:
    with pytest.raises(ValueError, match="resource identifier"):
        MercureTokenVerifier(StaticKey.from_secret(SECRET, None), audience="")


async def test_token_validation_iss_must_be_a_trusted_issuer() -> None:
    v = verifier(issuers=(ISSUER, "https://second.example"))
    await v.verify(hs256(claims(iss="https://second.example")))
    await rejected(hs256(claims(iss="https://evil.example")), v)
    await rejected(hs256(claims(iss=None)), v)
    await rejected(hs256(claims(iss=ISSUER.upper())), v)


async def test_token_validation_no_trusted_issuer_configured_means_no_iss_check() -> None:
    v = verifier(issuers=())
    await v.verify(hs256(claims(iss=None)))
    await v.verify(hs256(claims(iss="https://anyone.example")))


async def test_token_validation_other_rfc9068_claims_are_not_required() -> None:
    minimal = {"aud": AUDIENCE, "exp": int(time.time()) + 60, "authorization_details": EVERYTHING}
    grant = await verifier(issuers=()).verify(hs256(minimal))
    assert grant.subject is None
    assert grant.may_receive("x")


async def test_token_validation_iat_in_the_future_is_not_a_reason_to_reject() -> None:
    await verifier().verify(hs256(claims(iat=int(time.time()) + 3600)))


async def test_token_validation_bad_signature_is_rejected() -> None:
    token = hs256()
    head, body, signature = token.split(".")
    await rejected(f"{head}.{body}.{signature[:-4]}AAAA")
    other = jwt.encode(claims(), SECRET + "x", algorithm="HS256", headers={"typ": "at+jwt"})
    await rejected(other)


async def test_token_validation_critical_header_parameters_are_rejected() -> None:
    await rejected(hs256(crit=["exp"]))


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "a.b.c.d.e", "e30.e30.", "x" * (MAX_TOKEN_LENGTH + 1)])
async def test_token_validation_malformed_tokens_are_invalid_tokens(token: str) -> None:
    await rejected(token)


@pytest.mark.parametrize("sub", [1, ["a"], {"a": 1}])
async def test_token_validation_sub_must_be_a_string_when_present(sub: Any) -> None:
    await rejected(hs256(claims(sub=sub)))


@given(st.text(max_size=80))
@settings(max_examples=100, deadline=None)
async def test_token_validation_any_other_string_is_an_invalid_token(token: str) -> None:
    with pytest.raises(BearerError) as info:
        await verifier().verify(token)
    assert (info.value.status, info.value.error) == (401, "invalid_token")


# -- the cache of verified tokens -----------------------------------------------------------------------------------


async def test_token_cache_verifies_a_token_once_until_it_expires() -> None:
    v = verifier()
    token = hs256()
    first = await v.verify(token)
    assert await v.verify(token) is first
    assert (v.verified, v.cached) == (1, 1)


async def test_token_cache_never_serves_an_expired_token(monkeypatch: pytest.MonkeyPatch) -> None:
    v = verifier()
    now = time.time()
    token = hs256(claims(exp=int(now) + 2))
    await v.verify(token)
    assert v.cached == 1
    later = SimpleNamespace(time=lambda: now + 3)  # exp has passed: for the cache and for the verifier
    monkeypatch.setattr("api.auth.cache.time", later)
    monkeypatch.setattr("api.mercure.authorization.time", later)
    await rejected(token, v)
    assert v.cached == 0


async def test_token_cache_is_bounded() -> None:
    v = verifier(cache_size=3)
    for i in range(10):
        await v.verify(hs256(claims(jti=str(i))))
    assert v.cached <= 3


async def test_token_cache_is_emptied_when_the_key_set_changes() -> None:
    class Rotating(StaticKey):
        generation = 0

    keys = Rotating(SECRET.encode(), frozenset({"HS256"}))
    v = verifier(keys)
    await v.verify(hs256())
    keys.generation = 1
    await v.verify(hs256())
    assert v.verified == 2


async def test_token_cache_holds_only_tokens_that_verified() -> None:
    v = verifier()
    await rejected(hs256(claims(aud="nope")), v)
    assert v.cached == 0
    assert v.rejected == 1


# -- Authorization Details ------------------------------------------------------------------------------------------


def grant_of(details: Any) -> MercureGrant:
    payload = {"exp": time.time() + 60}
    if details is not ...:
        payload["authorization_details"] = details
    return grant_from_claims(payload, base_url=HUB)


@pytest.mark.parametrize("kind", ["mercure", "https://mercure.rocks/authorization-detail"])
def test_authorization_details_mercure_type(kind: str) -> None:
    grant = grant_of([{"type": kind, "actions": ["publish"], "topics": [{"match": "a"}]}])
    assert grant.may_publish("a")
    assert not grant.may_receive("a")


def test_authorization_details_tokens_without_a_mercure_detail_grant_nothing() -> None:
    for details in (..., [], [{"type": "payment_initiation", "actions": ["publish"], "topics": [{"match": "*"}]}]):
        grant = grant_of(details)
        assert grant.publish is None
        assert grant.subscribe is None
        assert not grant.may_publish("a")
        assert not grant.may_receive("a")


def test_authorization_details_entries_of_other_types_are_ignored_whatever_their_shape() -> None:
    grant = grant_of(
        [{"type": "other", "topics": "not an array", "actions": 3}, detail(["subscribe"], [{"match": "a"}])]
    )
    assert grant.may_receive("a")


def test_authorization_details_type_Mercure_is_not_the_mercure_type() -> None:
    assert grant_of([{"type": "Mercure", "actions": ["publish"], "topics": [{"match": "*"}]}]).publish is None


def test_authorization_details_actions_publish_and_subscribe() -> None:
    grant = grant_of([detail(["publish"], [{"match": "p"}]), detail(["subscribe"], [{"match": "s"}])])
    assert grant.may_publish("p")
    assert not grant.may_publish("s")
    assert grant.may_receive("s")
    assert not grant.may_receive("p")
    both = grant_of([detail(["subscribe", "publish"], [{"match": "b"}])])
    assert both.may_publish("b")
    assert both.may_receive("b")


def test_authorization_details_unrecognized_actions_are_ignored_and_grant_nothing() -> None:
    grant = grant_of([detail(["publish", "admin"], [{"match": "a"}]), detail(["moderate"], [{"match": "b"}])])
    assert grant.may_publish("a")
    assert not grant.may_publish("b")
    assert not grant.may_receive("b")


def test_authorization_details_a_grant_is_any_detail_with_the_action_and_a_matching_topic() -> None:
    grant = grant_of(
        [
            detail(["subscribe"], [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}]),
            detail(["subscribe"], [{"match": "https://example.com/announcements"}]),
        ]
    )
    assert grant.may_receive("https://example.com/books/1")
    assert grant.may_receive("https://example.com/announcements")
    assert not grant.may_receive("https://example.com/users/1")


@pytest.mark.parametrize(
    "details",
    [
        {"type": "mercure"},
        None,
        "mercure",
        ["mercure"],
        [{"actions": ["publish"], "topics": [{"match": "a"}]}],
        [{"type": 1, "actions": ["publish"], "topics": [{"match": "a"}]}],
        [detail([], [{"match": "a"}])],
        [detail("publish", [{"match": "a"}])],
        [detail(["publish", 1], [{"match": "a"}])],
        [detail(["publish"], [])],
        [detail(["publish"], ["a"])],
        [detail(["publish"], [{"match": "a", "match_type": "regex"}])],
        [detail(["publish"], [{"match": "/(", "match_type": "urlpattern"}])],
        [{"type": "mercure", "topics": [{"match": "a"}]}],
        [{"type": "mercure", "actions": ["publish"]}],
        [detail(["subscribe"], [{"match": "a"}], payload="not an object")],
        [detail(["subscribe"], [{"match": "a"}], payload=["a"])],
    ],
)
def test_authorization_details_malformed_mercure_details_reject_the_token(details: Any) -> None:
    with pytest.raises(BearerError) as info:
        grant_of(details)
    assert (info.value.status, info.value.error) == (401, "invalid_token")


def test_authorization_details_no_partial_acceptance() -> None:
    with pytest.raises(BearerError):
        grant_of([detail(["publish"], [{"match": "*"}]), detail(["subscribe"], [{"match": "a", "match_type": "X"}])])


def test_authorization_details_limit_on_the_number_of_mercure_details() -> None:
    grant_of([detail(["publish"], [{"match": f"t{i}"}]) for i in range(MAX_AUTHORIZATION_DETAILS)])
    with pytest.raises(BearerError, match="authorization details"):
        grant_of([detail(["publish"], [{"match": f"t{i}"}]) for i in range(MAX_AUTHORIZATION_DETAILS + 1)])


def test_authorization_details_limit_on_topic_matchers() -> None:
    per = MAX_TOKEN_MATCHERS // 4
    grant_of([detail(["publish"], [{"match": f"t{i}"} for i in range(per)]) for _ in range(4)])
    with pytest.raises(BearerError, match="topic matchers"):
        grant_of([detail(["publish"], [{"match": f"t{i}"} for i in range(per)]) for _ in range(5)])
    with pytest.raises(BearerError):  # one topics array over the per-list cap
        grant_of([detail(["publish"], [{"match": f"t{i}"} for i in range(MAX_TOKEN_MATCHERS)])])


async def test_authorization_details_failures_are_invalid_tokens_at_verification() -> None:
    token = hs256(claims(authorization_details=[detail(["publish"], [{"match": "a", "match_type": "Exact"}])]))
    error = await rejected(token, verifier(resource_metadata=METADATA))
    assert error.resource_metadata == METADATA


# -- Topic Matcher List ---------------------------------------------------------------------------------------------


def test_topic_matcher_list_match_type_is_optional_and_defaults_to_exact() -> None:
    grant = grant_of([detail(["publish"], [{"match": "https://example.com/books/:id"}])])
    assert grant.may_publish("https://example.com/books/:id")
    assert not grant.may_publish("https://example.com/books/1")


@pytest.mark.parametrize(
    "entry", [{"match": "*"}, {"match": "*", "match_type": "exact"}, {"match": "*", "match_type": "urlpattern"}]
)
def test_topic_matcher_list_wildcard_matches_every_topic(entry: dict[str, str]) -> None:
    grant = grant_of([detail(["publish"], [entry])])
    assert grant.may_publish("https://example.com/anything")
    assert grant.may_publish("urn:x")
    assert grant.may_publish("")


def test_topic_matcher_list_relative_urlpattern_resolves_against_the_hub_url() -> None:
    grant = grant_of(
        [detail(["subscribe"], [{"match": "/.well-known/mercure/subscriptions{/*}?", "match_type": "urlpattern"}])]
    )
    assert grant.may_receive("/.well-known/mercure/subscriptions")
    assert grant.may_receive("/.well-known/mercure/subscriptions/exact/a/b")
    assert grant.may_receive("https://hub.example.com/.well-known/mercure/subscriptions/exact/a/b")


# -- Publishers and Subscribers ------------------------------------------------------------------------------------


def test_publishers_need_a_token_granting_publish_on_the_topic() -> None:
    v = verifier(resource_metadata=METADATA)
    grant = grant_of([detail(["publish"], [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}])])
    assert v.require_publish(grant, "https://example.com/books/1") is grant
    with pytest.raises(BearerError) as info:
        v.require_publish(grant, "https://example.com/users/1")
    assert (info.value.status, info.value.error) == (403, "insufficient_scope")
    with pytest.raises(BearerError) as info:
        v.require_publish(None, "https://example.com/books/1")
    assert (info.value.status, info.value.error) == (401, None)
    subscribe_only = grant_of([detail(["subscribe"], [{"match": "*"}])])
    with pytest.raises(BearerError):
        v.require_publish(subscribe_only, "https://example.com/books/1")


def test_subscribers_routing_never_widens_what_the_token_lets_them_read() -> None:
    """The spec's example: routing selects all books, the token grants books 1 and 7; book 2 is not delivered."""
    routing = Matchers.from_query([("match_urlpattern", "https://example.com/books/:id")], base_url=HUB)
    grant = grant_of(
        [detail(["subscribe"], [{"match": "https://example.com/books/1", "match_type": "exact"},
                                {"match": "https://example.com/books/7", "match_type": "exact"}])]
    )  # fmt: skip
    delivered = [
        t for t in (f"https://example.com/books/{i}" for i in (1, 2, 7)) if routing.matches(t) and grant.may_receive(t)
    ]
    assert delivered == ["https://example.com/books/1", "https://example.com/books/7"]


def test_subscribers_without_subscribe_grant_receive_no_private_update() -> None:
    assert not grant_of([detail(["publish"], [{"match": "*"}])]).may_receive("a")


def test_subscribers_grant_expires_with_the_token() -> None:
    exp = int(time.time()) + 42
    assert grant_from_claims({"exp": exp}).expires_at == exp
    with pytest.raises(BearerError):
        grant_from_claims({})


def test_subscription_api_requires_subscribe_on_the_relative_url() -> None:
    v = verifier()
    grant = grant_of(
        [detail(["subscribe"], [{"match": "/.well-known/mercure/subscriptions{/*}?", "match_type": "urlpattern"}])]
    )
    v.require_subscribe(grant, "/.well-known/mercure/subscriptions")
    with pytest.raises(BearerError) as info:
        v.require_subscribe(grant_of([detail(["subscribe"], [{"match": "a"}])]), "/.well-known/mercure/subscriptions")
    assert info.value.status == 403


# -- Payloads -------------------------------------------------------------------------------------------------------


def test_payloads_first_matching_subscribe_detail_wins() -> None:
    """The spec's example: specific payloads first, ``*`` as the default."""
    grant = grant_of(
        [
            detail(["subscribe"], [{"match": "https://example.com/foo"}], payload={"custom1": 1}),
            detail(
                ["subscribe"],
                [{"match": "https://example.com/bar/:id", "match_type": "urlpattern"}],
                payload={"custom2": 2},
            ),
            detail(["subscribe"], [{"match": "*"}], payload={"custom3": 3}),
        ]
    )
    assert grant.subscription_payload(compile_matcher(EXACT, "https://example.com/foo")) == {"custom1": 1}
    assert grant.subscription_payload(compile_matcher(URLPATTERN, "https://example.com/bar/:id", base_url=HUB)) == {
        "custom2": 2
    }
    assert grant.subscription_payload(compile_matcher(EXACT, "https://example.com/bar/1")) == {"custom2": 2}
    assert grant.subscription_payload(compile_matcher(EXACT, "https://example.com/other")) == {"custom3": 3}


def test_payloads_only_subscribe_details_count_and_absent_payload_is_none() -> None:
    grant = grant_of([detail(["publish"], [{"match": "*"}], payload={"p": 1}), detail(["subscribe"], [{"match": "a"}])])
    assert grant.subscription_payload(Matcher(EXACT, "a")) is None
    assert grant.subscription_payload(Matcher(EXACT, "b")) is None


# -- Presenting the Access Token ------------------------------------------------------------------------------------


def raw(**headers: str | list[str]) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers.items():
        for v in [value] if isinstance(value, str) else value:
            out.append((name.replace("_", "-").encode(), v.encode()))
    return out


def test_presenting_authorization_header_bearer() -> None:
    assert token_from(raw(authorization="Bearer abc.def.ghi")) == "abc.def.ghi"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_presenting_bearer_scheme_is_matched_case_insensitively(scheme: str) -> None:
    assert token_from(raw(authorization=f"{scheme} abc")) == "abc"


def test_presenting_cookie_with_a_configurable_name() -> None:
    assert token_from(raw(cookie=f"{RECOMMENDED_COOKIE_NAME}=abc")) == "abc"
    assert token_from(raw(cookie="other=x; hub_token=abc"), "hub_token") == "abc"
    assert token_from(raw(cookie="other=x"), "hub_token") is None
    assert token_from(raw(cookie=f'{RECOMMENDED_COOKIE_NAME}="abc"')) == "abc"


def test_presenting_several_cookie_names_first_present_wins() -> None:
    names = (RECOMMENDED_COOKIE_NAME, LEGACY_COOKIE_NAME)
    assert token_from(raw(cookie=f"{LEGACY_COOKIE_NAME}=old"), names) == "old"
    assert token_from(raw(cookie=f"{LEGACY_COOKIE_NAME}=old; {RECOMMENDED_COOKIE_NAME}=new"), names) == "new"
    assert token_from(raw(cookie=["a=1", f"{RECOMMENDED_COOKIE_NAME}=split"]), names) == "split"  # HTTP/2 splits


def test_presenting_authorization_header_wins_over_cookie_and_query() -> None:
    headers = raw(authorization="Bearer from-header", cookie=f"{RECOMMENDED_COOKIE_NAME}=from-cookie")
    assert token_from(headers, query=[("access_token", "from-query")]) == "from-header"


def test_presenting_query_parameter_wins_over_cookie_when_the_hub_supports_it() -> None:
    headers = raw(cookie=f"{RECOMMENDED_COOKIE_NAME}=from-cookie")
    assert token_from(headers, query=[("match", "x"), ("access_token", "from-query")]) == "from-query"
    assert token_from(headers) == "from-cookie"  # query method off: the parameter is not looked at


def test_presenting_nothing_is_none() -> None:
    assert token_from([]) is None
    assert token_from(raw(cookie=f"{RECOMMENDED_COOKIE_NAME}=")) is None


def test_presenting_another_authorization_scheme_carries_no_bearer_token() -> None:
    headers = raw(authorization="Basic dXNlcjpwYXNz", cookie=f"{RECOMMENDED_COOKIE_NAME}=abc")
    assert token_from(headers) == "abc"


@pytest.mark.parametrize(
    "headers",
    [
        raw(authorization="Bearer"),
        raw(authorization="Bearer "),
        raw(authorization="Bearer a b"),
        raw(authorization="Bearer a,b"),
        raw(authorization=["Bearer a", "Bearer b"]),
    ],
)
def test_presenting_malformed_bearer_header_is_400_invalid_request(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BearerError) as info:
        token_from(headers)
    assert (info.value.status, info.value.error) == (400, "invalid_request")
    assert info.value.challenge.startswith('Bearer error="invalid_request", error_description="')


def test_presenting_two_access_token_parameters_is_400_invalid_request() -> None:
    with pytest.raises(BearerError) as info:
        token_from([], query=[("access_token", "a"), ("access_token", "b")])
    assert info.value.status == 400


def test_presenting_starlette_headers_and_str_pairs() -> None:
    assert token_from(Headers({"Authorization": "Bearer abc"})) == "abc"
    assert token_from([("Cookie", f"{RECOMMENDED_COOKIE_NAME}=abc")]) == "abc"


async def test_presenting_authenticate_returns_the_grant_or_none() -> None:
    v = verifier(resource_metadata=METADATA)
    assert await v.authenticate([]) is None
    grant = await v.authenticate(raw(cookie=f"{RECOMMENDED_COOKIE_NAME}={hs256()}"))
    assert grant is not None
    assert grant.may_publish("x")
    with pytest.raises(BearerError) as info:
        await v.authenticate(raw(authorization="Bearer"))
    assert info.value.challenge == (
        'Bearer error="invalid_request", error_description="the Authorization header has no token after Bearer",'
        f' resource_metadata="{METADATA}"'
    )


# -- Error Responses ------------------------------------------------------------------------------------------------


def test_error_responses_no_token_is_401_with_a_bare_challenge_and_no_error_code() -> None:
    error = missing_token()
    assert (error.status, error.error) == (401, None)
    assert error.challenge == "Bearer"
    assert missing_token(resource_metadata=METADATA).headers == {
        "WWW-Authenticate": f'Bearer resource_metadata="{METADATA}"'
    }


def test_error_responses_invalid_token_is_401_invalid_token() -> None:
    error = invalid_token("the token has expired", resource_metadata=METADATA)
    assert error.status == 401
    assert error.challenge == (
        f'Bearer error="invalid_token", error_description="{INVALID_TOKEN_DESCRIPTION}", resource_metadata="{METADATA}"'
    )
    assert error.reason == "the token has expired"


async def test_error_responses_invalid_token_does_not_disclose_why() -> None:
    v = verifier()
    expired = await rejected(hs256(claims(exp=int(time.time()) - 10)), v)
    bad_audience = await rejected(hs256(claims(aud="x")), v)
    bad_signature = await rejected(jwt.encode(claims(), SECRET + "!", algorithm="HS256", headers={"typ": "at+jwt"}), v)
    assert expired.challenge == bad_audience.challenge == bad_signature.challenge
    assert len({expired.reason, bad_audience.reason, bad_signature.reason}) == 3


def test_error_responses_insufficient_scope_is_403() -> None:
    error = insufficient_scope("no publish grant", resource_metadata=METADATA)
    assert error.status == 403
    assert error.challenge == (
        f'Bearer error="insufficient_scope", error_description="no publish grant", resource_metadata="{METADATA}"'
    )


def test_error_responses_malformed_presentation_is_400_invalid_request() -> None:
    error = invalid_request("two tokens")
    assert (error.status, error.challenge) == (400, 'Bearer error="invalid_request", error_description="two tokens"')


def test_error_responses_realm_when_configured_comes_first() -> None:
    assert bearer_challenge("invalid_token", "x", realm="mercure", resource_metadata=METADATA) == (
        f'Bearer realm="mercure", error="invalid_token", error_description="x", resource_metadata="{METADATA}"'
    )
    assert verifier(realm="hub").missing_token().challenge == 'Bearer realm="hub"'


@given(st.text(max_size=60))
def test_error_responses_error_description_stays_within_rfc6750_characters(description: str) -> None:
    challenge = bearer_challenge("invalid_request", description or "x")
    value = challenge.split('error_description="', 1)[1][:-1]
    assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in value)


def test_error_responses_with_parameters_adds_the_hubs_challenge_parameters() -> None:
    error = invalid_request("x").with_parameters(realm="r", resource_metadata=METADATA)
    assert (
        error.challenge
        == f'Bearer realm="r", error="invalid_request", error_description="x", resource_metadata="{METADATA}"'
    )


# -- legacy tokens (the pre-standardization ``mercure`` claim) ------------------------------------------------------


def legacy_claims(mercure: Any, **overrides: Any) -> dict[str, Any]:
    return claims(authorization_details=None, mercure=mercure, **overrides)


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt"])
async def test_legacy_mercure_claim_is_accepted_with_plain_jwt_typ(typ: str | None) -> None:
    token = hs256(
        legacy_claims({"publish": ["https://example.com/books/{id}"], "subscribe": ["*"], "payload": {"u": 1}}),
        typ=typ,
    )
    grant = await verifier().verify(token)
    assert grant.may_publish("https://example.com/books/1")
    assert not grant.may_publish("https://example.com/books/1/reviews")
    assert not grant.may_publish("https://example.com/authors/1")
    assert grant.may_receive("https://example.com/anything")
    assert [d.payload for d in grant.subscribe_details] == [{"u": 1}]


async def test_legacy_mercure_claim_may_go_without_aud_but_a_wrong_aud_is_refused() -> None:
    grant = await verifier().verify(hs256(legacy_claims({"publish": ["a"]}, aud=None), typ="JWT"))
    assert grant.may_publish("a")
    assert not grant.may_publish("b")
    assert grant.subscribe is None
    await rejected(hs256(legacy_claims({"publish": ["a"]}, aud="https://other.example/hub"), typ="JWT"))


async def test_legacy_typ_and_missing_aud_are_not_accepted_for_other_tokens() -> None:
    await rejected(hs256(typ="JWT"))  # authorization_details: not legacy
    await rejected(hs256(claims(aud=None)))
    await rejected(hs256(claims(authorization_details=None), typ="JWT"))  # no mercure claim at all
    both = claims(mercure={"publish": ["*"]})
    await rejected(hs256(both, typ="JWT"))
    grant = await verifier().verify(
        hs256(claims(authorization_details=[detail(["subscribe"], [{"match": "x"}])], mercure={"publish": ["*"]}))
    )
    assert grant.publish is None  # with authorization_details, the mercure claim is ignored


async def test_legacy_token_still_needs_signature_exp_and_issuer() -> None:
    legacy = legacy_claims({"publish": ["*"]}, aud=None)
    await rejected(jwt.encode(legacy, "another-secret-that-is-long-enough-for-hs256-xxxxxxxxxx", algorithm="HS256"))
    await rejected(hs256({k: v for k, v in legacy.items() if k != "exp"}))
    await rejected(hs256({**legacy, "iss": "https://untrusted.example"}))


def test_legacy_namespaced_claim_wins_and_lists_are_checked() -> None:
    grant = grant_from_claims(
        legacy_claims({"publish": ["a"]}) | {"https://mercure.rocks/": {"publish": ["b"]}}, base_url=HUB
    )
    assert grant.may_publish("b")
    assert not grant.may_publish("a")
    empty = grant_from_claims(legacy_claims({"publish": [], "subscribe": []}), base_url=HUB)
    assert empty.publish is None
    assert empty.subscribe is None


@pytest.mark.parametrize(
    "mercure",
    ["x", ["x"], {"publish": "x"}, {"subscribe": [1]}, {"publish": ["{"]}, {"publish": ["a"] * 101}],
)
def test_legacy_malformed_mercure_claim_is_invalid_token(mercure: Any) -> None:
    with pytest.raises(BearerError) as info:
        grant_from_claims(legacy_claims(mercure), base_url=HUB)
    assert info.value.error == "invalid_token"
