"""The compiled publisher (``--publisher native``): every event it reports accepted arrives, in order, paced.

A real node (``workers.bench.systems.Herald``, stopped by pid), the load
tool run as an operator would, a few dozen subscribers for a second or two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workers.bench.systems import ROOT, Herald
from workers.loadtest.config import from_args


def run_native(url: str, out: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "workers.loadtest", "--quiet", "--client", "native", "--publisher", "native",
               "--target", url, "--subscribers", "30", "--ramp", "0.2", "--drain", "10", "--json", str(out),
               *args]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.exists(), f"no result written:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("native_tools")
def test_the_native_publisher_paces_single_events_and_every_accepted_one_arrives(tmp_path: Path) -> None:
    with Herald().running() as node:
        modes = {
            "closed": ("--pipeline", "1"),
            "pipelined": ("--pipeline", "4", "--topics", "3", "--publishers", "2"),
            "batches": ("--per-request", "5"),
        }
        results = {
            name: run_native(node.url, tmp_path / f"{name}.json", "--rate", "200", "--duration", "1.5", *args)
            for name, args in modes.items()
        }
    for name, result in results.items():
        publish, delivery = result["publish"], result["delivery"]
        assert result["verdict"]["pass"], (name, result["verdict"])
        assert publish["accepted"] == 300, name  # rate x duration, no more (paced), no fewer (kept up)
        assert (publish["refused"], publish["uncertain"], publish["errors"]) == (0, 0, {}), name
        assert delivery["lost"] == delivery["duplicated"] == delivery["out_of_order"] == 0, name
        assert delivery["delivered"] == delivery["expected"] > 0, name
        assert 150 <= publish["rate"] <= 220, name  # paced to the asked rate, not faster
        assert 0 <= result["tool"]["publisher_cpu"]["mean"] < 0.9, name  # its own CPU, reported
    assert results["closed"]["publish"]["requests"] == 300  # one event per request
    assert results["batches"]["publish"]["requests"] == 60  # exactly 5 per request


def test_the_python_publisher_stays_the_default() -> None:
    config = from_args([])
    assert (config.publisher, config.pipeline, config.per_request) == ("python", 1, 1)
