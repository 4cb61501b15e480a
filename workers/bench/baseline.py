"""``python -m workers.bench --baseline REF``: this checkout's Herald against another commit's, side by side.

For a change that must not cost speed (a reshape, a refactor of the hot
path): the same node, built from ``REF`` (a git worktree under
``.run/bench/``) and from this checkout, measured in one run on the same
machine, the two taking turns (A-B, B-A, ...) so that a machine that slows
down or speeds up weighs on both alike. Each figure is the median of its
runs, and the verdict is on the median ratio:

* fan-out at saturation (:func:`~workers.bench.scenarios.saturation`) to
  1,000 and to 5,000 subscribers of one topic: delivered events/s;
* p99 publish-to-deliver at 5,000 subscribers, 20 events/s
  (:func:`~workers.bench.scenarios.latency`);
* 5,000 connects at once and the memory each idle stream holds
  (:func:`~workers.bench.scenarios.idle`);
* the Mercure hub's fan-out at saturation to 1,000 subscribers.

Written to ``docs/benchmarks-baseline.md`` and ``.run/bench/baseline.json``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.bench import scenarios
from workers.bench.systems import ROOT, RUN_DIR, Herald, HeraldMercure, System

DOC = ROOT / "docs" / "benchmarks-baseline.md"
RESULTS = RUN_DIR / "baseline.json"
SIDES = ("before", "after")
"""The baseline's runs, then this checkout's (:func:`workers.bench.scenarios.alternating` takes turns)."""
TOLERANCE = 0.05
"""How far "after" may be from "before" on any figure (the reshape's bound: 5 %)."""

FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("fanout_1000", "delivered events/s, 1,000 subscribers, saturation", True),
    ("fanout_5000", "delivered events/s, 5,000 subscribers, saturation", True),
    ("p99_ms", "p99 ms, 5,000 subscribers, 20 events/s", False),
    ("connect_all_s", "5,000 connects at once, s", False),
    ("connect_p50_ms", "5,000 connects at once: median connect, ms", False),
    ("kb_per_connection", "KB per idle connection", False),
    ("mercure_fanout_1000", "Mercure hub: delivered events/s, 1,000 subscribers, saturation", True),
)
"""Each figure: its key, its label, and whether higher is better."""


def worktree(ref: str) -> tuple[Path, str]:
    """A checkout of ``ref`` under ``.run/bench/`` (made once per commit), and the commit it is."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = RUN_DIR / f"baseline-{commit[:12]}"
    if not (path / "api").is_dir():
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), commit], cwd=ROOT, check=True)
    return path, commit


def _pair(make: Callable[[], System], source: Path) -> tuple[System, System]:
    before, after = make(), make()
    before.source = source
    before.name = f"{before.name}-before"
    after.name = f"{after.name}-after"
    return before, after


def compare(
    ref: str, repeats: int = 5, seconds: float = 5.0, quick: bool = False, only: set[str] | None = None
) -> dict[str, Any]:
    """The figures of :data:`FIGURES` (``only`` some: their keys), ``repeats`` times on each side.

    Memory is measured by the connects' runs (``kb_per_connection`` comes with ``connect_all_s``).
    """
    source, commit = worktree(ref)
    slow = 1 if quick else repeats  # connects are bimodal (a dropped SYN waits a second): as many runs as the rest
    wanted = set(only) if only else {key for key, _, _ in FIGURES}
    if "kb_per_connection" in wanted:
        wanted.add("connect_all_s")
    count = 500 if quick else 5000
    native = _pair(Herald, source)
    figures: dict[str, dict[str, list[float]]] = {}
    print(f"== baseline {commit[:12]} vs this checkout", flush=True)
    for subscribers in (1000, 5000):
        if f"fanout_{subscribers}" in wanted:

            def fanout(system: System, n: int = subscribers) -> float:
                return float(scenarios.saturation(system, n, seconds)["delivered_per_s"])

            figures[f"fanout_{subscribers}"] = scenarios.alternating(repeats, fanout, *native, SIDES)
    if "p99_ms" in wanted:
        figures["p99_ms"] = scenarios.alternating(slow, lambda s: float(scenarios.latency(s)["p99_ms"]), *native, SIDES)
    idle: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}

    def idle_run(system: System) -> float:
        run = scenarios.idle(system, count)
        idle["before" if system is native[0] else "after"].append(run)
        return float(run["connect_all_s"])

    if "connect_all_s" in wanted:
        figures["connect_all_s"] = scenarios.alternating(slow, idle_run, *native, SIDES)
        figures["kb_per_connection"] = {side: [run["kb_per_connection"] for run in runs] for side, runs in idle.items()}
        figures["connect_p50_ms"] = {side: [run["connect_p50_ms"] for run in runs] for side, runs in idle.items()}
    if "mercure_fanout_1000" in wanted:
        mercure = _pair(lambda: HeraldMercure("mercure"), source)
        figures["mercure_fanout_1000"] = scenarios.alternating(
            repeats, lambda s: float(scenarios.saturation(s, 1000, seconds)["delivered_per_s"]), *mercure, SIDES
        )
    return {"baseline": commit, "repeats": repeats, "figures": figures, "machine": None}


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per figure: the medians, the ratio after/before, and whether it is within :data:`TOLERANCE`."""
    rows = []
    for key, label, higher in FIGURES:
        samples = result["figures"].get(key)
        if not samples or not samples["before"] or not samples["after"]:
            continue
        before, after = statistics.median(samples["before"]), statistics.median(samples["after"])
        ratio = after / before if before else float("nan")
        ok = ratio >= 1 - TOLERANCE if higher else ratio <= 1 + TOLERANCE
        rows.append({"key": key, "label": label, "before": before, "after": after, "ratio": ratio, "ok": ok})
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks: this checkout against a baseline commit",
        "",
        "Regenerated by `python -m workers.bench --baseline REF` (never typed): the same node built from",
        f"`{result['baseline'][:12]}` (before) and from this checkout (after), in one run on one machine, the two",
        f"taking turns; medians of {result['repeats']} runs of each, and the",
        f"ratio after/before. Within {TOLERANCE:.0%} is the bound a change that must not cost speed is held to.",
        "",
        f"Measured {result.get('date', '')} on {result.get('machine', '')}.",
        "",
        "| Figure | Before | After | After / before | Within 5 % |",
        "|---|---:|---:|---:|---|",
    ]
    for row in verdicts(result):
        better = "higher is better" if {k: h for k, _, h in FIGURES}[row["key"]] else "lower is better"
        lines.append(
            f"| {row['label']} ({better}) | {row['before']:,.1f} | {row['after']:,.1f} | {row['ratio']:.3f} "
            f"| {'yes' if row['ok'] else '**no**'} |"
        )
    lines += [
        "",
        "The time for all 5,000 connects is bimodal on this machine: a run either has some SYNs dropped",
        "(about 1.1 s: the kernel retransmits after a second) or not (about 0.35 s), whatever the code; its",
        "median says which mode most runs fell in. The median connect time is the code's own figure.",
        "",
        "Every run, in the order measured:",
        "",
    ]
    for key, label, _ in FIGURES:
        samples = result["figures"].get(key)
        if samples:
            lines.append(f"- {label}: before {samples['before']}, after {samples['after']}")
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    DOC.write_text(render(result))
    print(f"written to {DOC}")
