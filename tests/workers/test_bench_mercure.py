"""``make bench``'s Mercure rows: the hub vs the native API on the same node, alternated, medians and ratio."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from workers.bench import scenarios
from workers.bench.render import mercure_section, render
from workers.bench.scenarios import mercure_figures, protocol_args
from workers.bench.systems import MERCURE_AUDIENCE, Herald, HeraldMercure, System
from workers.loadtest.config import subscribe_path


def _saturated(delivered: int, lost: int = 0, p99: float = 20.0, bound: bool = True) -> dict[str, Any]:
    return {"delivered_per_s": delivered, "lost": lost, "p99_ms": p99, "passed": lost == 0, "server_bound": bound}


def _idle(kb: float, seconds: float = 0.25) -> dict[str, Any]:
    return {"connections": 2000, "connected": 2000, "kb_per_connection": kb, "connect_all_s": seconds}


def _mercure(native: list[dict[str, Any]], mercure: list[dict[str, Any]], idle: bool = True) -> dict[str, Any]:
    """A ``mercure`` entry of the results, as :func:`scenarios.mercure_cost` records it."""
    return {
        "repeats": len(native),
        "fanout": {"subscribers": 1000, "mode": "closed", "native": native, "mercure": mercure},
        "idle": {
            "connections": 2000,
            "native": [_idle(12.0), _idle(13.0)],
            "mercure": [_idle(20.0, 0.5), _idle(21.0, 0.4)],
        }
        if idle
        else {},
    }


def _results(mercure: dict[str, Any] | None) -> dict[str, Any]:
    base: dict[str, Any] = {"date": "-", "machine": "-", "throughput_subscribers": [], "modes": {}, "systems": {}}
    return base if mercure is None else {**base, "mercure": mercure}


def test_the_figures_are_medians_and_the_ratio_is_the_median_of_the_rounds() -> None:
    # Round 2 was slow for both (other programs): its ratio is still a fair one, and the medians ignore it.
    measured = _mercure(
        [_saturated(1_000_000), _saturated(500_000), _saturated(1_100_000)],
        [_saturated(800_000), _saturated(450_000), _saturated(770_000)],
    )
    figures = mercure_figures(measured)
    assert (figures["native_median"], figures["mercure_median"]) == (1_000_000, 770_000)
    assert (figures["native_best"], figures["mercure_best"]) == (1_100_000, 800_000)
    assert figures["ratios"] == [0.8, 0.9, 0.7]
    assert figures["ratio_median"] == pytest.approx(0.8)
    assert figures["no_loss"] is True
    assert figures["server_bound"] == "6 of 6"
    assert figures["kb_per_connection"] == {"native": 12.5, "mercure": 20.5}


def test_a_lost_event_or_a_run_the_node_did_not_bound_is_reported() -> None:
    figures = mercure_figures(_mercure([_saturated(1_000_000)], [_saturated(900_000, lost=2, bound=False)], idle=False))
    assert figures["no_loss"] is False
    assert figures["server_bound"] == "1 of 2"
    assert figures["kb_per_connection"] == {"native": None, "mercure": None}


def test_the_page_has_the_mercure_table_its_ratio_and_every_run() -> None:
    measured = _mercure(
        [_saturated(1_000_000, p99=20.0), _saturated(1_200_000, p99=30.0)],
        [_saturated(800_000, p99=25.0), _saturated(1_080_000, p99=35.0)],
    )
    text = render(_results(measured))
    assert "## Mercure hub vs native API" in text
    assert (
        "| delivered events/s, 1,000 subscribers, at saturation (closed loop), median | 1,100,000 | 940,000 | 0.85x |"
        in text
    )
    assert "| best run | 1,200,000 | 1,080,000 | 0.90x |" in text
    assert "| KB per idle connection (2,000), median | 12.5 | 20.5 | 1.64x |" in text
    assert "| seconds for 2,000 connects at once, median | 0.25 | 0.45 | 1.80x |" in text
    assert "Rounds' ratios: 0.80x, 0.90x." in text
    assert "25.0 ms native, 30.0 ms Mercure" in text
    assert "exactly once in every run: yes" in text
    assert sum(line.startswith(("- native, ", "- mercure, ")) for line in text.splitlines()) == 8  # every run listed
    assert mercure_section(_results(None)) == []
    assert "## Mercure" not in render(_results(None))
    # No idle rounds (the memory half skipped): no memory row.
    assert "KB per idle" not in "\n".join(mercure_section(_results(_mercure([_saturated(1)], [_saturated(1)], False))))


def test_the_two_sides_alternate_on_the_same_node_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def saturation(system: System, subscribers: int, seconds: float) -> dict[str, Any]:
        calls.append(("fanout", system.protocol))
        return _saturated(1_000_000 if system.protocol == "native" else 900_000)

    def idle(system: System, count: int) -> dict[str, Any]:
        calls.append(("idle", system.protocol))
        return _idle(12.0 if system.protocol == "native" else 20.0)

    monkeypatch.setattr(scenarios, "saturation", saturation)
    monkeypatch.setattr(scenarios, "idle", idle)
    result = scenarios.mercure_cost(subscribers=10, seconds=1, repeats=3, idle_connections=50, idle_repeats=2)
    assert calls == [
        ("fanout", "native"), ("fanout", "mercure"), ("fanout", "mercure"), ("fanout", "native"),
        ("fanout", "native"), ("fanout", "mercure"), ("idle", "native"), ("idle", "mercure"),
        ("idle", "mercure"), ("idle", "native"),
    ]  # fmt: skip
    assert len(result["fanout"]["native"]) == len(result["fanout"]["mercure"]) == 3
    assert result["idle"]["connections"] == 50
    assert mercure_figures(result)["ratio_median"] == pytest.approx(0.9)


def test_the_mercure_system_drives_the_hub_with_mercure_tokens() -> None:
    mercure, native = HeraldMercure("mercure"), HeraldMercure("native")
    assert protocol_args(mercure) == ["--protocol", "mercure"]
    assert protocol_args(native) == protocol_args(Herald()) == []
    # The node is the same: a secret and the hub's audience, in the node's and the tool's environment.
    for system in (mercure, native):
        env = system.command()[1]
        assert env["HERALD_MERCURE_AUDIENCE"] == MERCURE_AUDIENCE
        assert env["HERALD_JWT_SECRET"] == system.secret
        assert system.client_env()["HERALD_MERCURE_AUDIENCE"] == MERCURE_AUDIENCE
    token = mercure.token(subscribe=["idle"])
    assert token is not None
    assert mercure.secret is not None
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = jwt.decode(token, mercure.secret, algorithms=["HS256"], audience=MERCURE_AUDIENCE)
    assert {"type": "mercure", "actions": ["subscribe"], "topics": [{"match": "idle", "match_type": "urlpattern"}]} in (
        claims["authorization_details"]
    )
    assert "herald" in jwt.decode(native.token(subscribe=["idle"]) or "", options={"verify_signature": False})
    assert subscribe_path(mercure.loadtest_system, ["idle"], mercure.protocol) == "/.well-known/mercure?match=idle"


@pytest.mark.timeout(90)
def test_idle_mercure_connections_are_all_opened_through_the_hub() -> None:
    # The compiled client on /.well-known/mercure?match=idle with a Mercure token: every stream opened.
    result = scenarios.idle(HeraldMercure("mercure"), count=100)
    assert result["connected"] == 100
    assert result["connect_errors"] == {}
    assert result["rss_after_mb"] > result["rss_before_mb"] > 0
