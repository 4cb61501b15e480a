"""The one subscribe decision (api/subscribe.py) in process: every entrance's plan meets the same rules.

The entrances themselves are tested against real nodes (``test_api_stream.py``, ``tests/adapter/test_lane.py``,
``tests/mercure/test_mercure_hub.py``); these pin what the decision does with a plan, whatever made it.
"""

from __future__ import annotations

import pytest

from api.auth.keys import KeysUnavailable
from api.core.hub import Hub
from api.core.routing import Selection
from api.core.stream import EventStreamResponse, RetryLaterResponse
from api.errors import RequestRejected
from api.mercure.matchers import Matchers
from api.mercure.space import space_of
from api.mercure.updates import UPDATES_TOPIC
from api.subscribe import (
    Plan,
    check_topics,
    keys_unavailable,
    native_plan_now,
    open_subscription,
    open_subscription_now,
)
from broker.base import BrokerUnavailable
from broker.memory import MemoryBroker


@pytest.fixture
def hub() -> Hub:
    return Hub(MemoryBroker(), client_buffer=1 << 20, heartbeat=15, max_connections=2)


def outcomes(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(hub.metrics, "connect", seen.append)
    return seen


async def answer(hub: Hub, plan: Plan) -> object:
    return await open_subscription(hub, plan, retry_ms=1000, heartbeat=15, on_overflow=None)


@pytest.mark.timeout(10)
async def test_every_plan_meets_one_connection_limit_and_is_told_to_come_back(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = outcomes(hub, monkeypatch)
    space_of(hub, hub._broker)
    mercure = Plan(
        selection=Selection(UPDATES_TOPIC, exact=frozenset({"a"}), matcher=Matchers.from_query([("match", "a")]))
    )
    assert isinstance(await answer(hub, Plan(("a",))), EventStreamResponse)
    assert isinstance(await answer(hub, mercure), EventStreamResponse)
    refused = [await answer(hub, Plan(("b",))), await answer(hub, mercure)]
    assert all(isinstance(r, RetryLaterResponse) and r.outcome == "retry_full" for r in refused)
    assert open_subscription_now(hub, Plan(("c",)), None) is None  # the lane's way: not here, and nothing counted
    assert seen == ["accepted", "accepted", "retry_full", "retry_full"]
    assert hub.stats()["connections"] == 2


@pytest.mark.timeout(10)
async def test_a_plan_that_may_not_wait_is_told_to_come_back_with_its_cursor(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = outcomes(hub, monkeypatch)

    async def down(*_: object) -> None:
        raise BrokerUnavailable("down")

    monkeypatch.setattr(hub._broker, "history", down)
    monkeypatch.setattr(hub._broker, "position", down)
    plan = Plan(("a",), cursor="5", may_wait=False, cursor_header=b"mercure-last-event-id")
    response = await answer(hub, plan)
    assert isinstance(response, RetryLaterResponse)
    assert (b"mercure-last-event-id", b"5") in response.raw_headers
    waiting = await answer(hub, Plan(("a",), cursor="5"))  # may wait: a stream that waits for the broker
    assert isinstance(waiting, EventStreamResponse)
    assert not waiting.opened_at_once
    assert seen == ["retry_broker", "waited"]
    assert hub.stats()["connections"] == 1  # the refused one left nothing registered


@pytest.mark.timeout(10)
async def test_a_grant_expiry_and_the_plans_headers_reach_the_stream(hub: Hub) -> None:
    plan = Plan(("a",), expires_at=4_102_444_800.0, headers=((b"x-extra", b"1"),))
    response = await answer(hub, plan)
    assert isinstance(response, EventStreamResponse)
    assert (b"x-extra", b"1") in response.raw_headers
    (connection,) = hub._connections
    assert connection.expires_at == 4_102_444_800.0


def test_topics_are_checked_once_for_every_entrance() -> None:
    assert check_topics(["a", "b", "a"], 10) == ("a", "b")
    for bad in ([], ["a"] * 11, ["no spaces"]):
        with pytest.raises(RequestRejected):
            check_topics(bad, 10)


def test_the_lane_plans_only_what_needs_no_awaiting() -> None:
    class Closed:
        enabled = True

        def authorize_subscribe_now(self, token: str | None, topics: tuple[str, ...]) -> tuple[bool, None]:
            return (token == "known", None)

    class Open:
        enabled = False

    assert native_plan_now(Open(), ("a",), None) == Plan(("a",))  # type: ignore[arg-type]
    assert native_plan_now(Closed(), ("a",), "known") == Plan(("a",))  # type: ignore[arg-type]
    assert native_plan_now(Closed(), ("a",), "unknown") is None  # type: ignore[arg-type]


def test_every_entrance_counts_a_verifier_that_cannot_check_tokens_now(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native route and the Mercure endpoint both answer it with keys_unavailable: come back, counted once."""
    seen = outcomes(hub, monkeypatch)
    response = keys_unavailable(hub, 1000, KeysUnavailable("the JWKS is unreachable"))
    assert isinstance(response, RetryLaterResponse)
    assert response.outcome == "retry_keys"
    assert seen == ["retry_keys"]
