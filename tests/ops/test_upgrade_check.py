"""``make upgrade-check``'s own parts: what it reports as moved, and how it tries the adapter on a new uvicorn."""

from __future__ import annotations

import re
from pathlib import Path

from api import adapter
from ops import upgrade_check
from ops.launch import ROOT


def test_moved_lists_every_version_that_changed_came_or_went() -> None:
    before = {"uvicorn": "0.55.0", "redis": "8.2.0", "gone": "1.0"}
    after = {"uvicorn": "0.56.1", "redis": "8.2.0", "new": "2.0"}
    assert upgrade_check.moved(before, after) == [
        "  gone: 1.0 -> (gone)",
        "  new: (new) -> 2.0",
        "  uvicorn: 0.55.0 -> 0.56.1",
    ]
    assert upgrade_check.moved(before, before) == []


def test_a_new_uvicorn_is_added_to_the_copys_tested_releases_once(tmp_path: Path) -> None:
    gate = tmp_path / "api" / "adapter" / "__init__.py"
    gate.parent.mkdir(parents=True)
    gate.write_text((ROOT / "api" / "adapter" / "__init__.py").read_text())
    assert upgrade_check.try_adapter_on(tmp_path, "9.9.9")
    assert not upgrade_check.try_adapter_on(tmp_path, "9.9.9")
    assert not upgrade_check.try_adapter_on(tmp_path, adapter.TESTED_UVICORN[0])
    line = re.search(r"^TESTED_UVICORN: .*$", gate.read_text(), flags=re.M)
    assert line is not None
    namespace: dict[str, object] = {}
    exec(line.group().replace("TESTED_UVICORN: tuple[str, ...]", "TESTED_UVICORN"), namespace)
    assert namespace["TESTED_UVICORN"] == ("9.9.9", *adapter.TESTED_UVICORN)


def test_a_failed_test_step_is_summed_up_by_its_failures() -> None:
    output = "\n".join(["....F..", "FAILED tests/test_x.py::test_a - AssertionError", "1 failed, 6 passed in 3.2s"])
    summary = upgrade_check.summarize("tests", output)
    assert "FAILED tests/test_x.py::test_a" in summary
    assert "1 failed, 6 passed" in summary
