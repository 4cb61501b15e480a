"""The package builds without setuptools' warnings, and its wheel carries everything the code reads.

``pip install .`` used to print setuptools'
``Package 'api.static' is absent from the packages configuration`` (the same
for ``broker/lua`` and ``workers/loadtest/csrc``), and the package list had
forgotten ``api.auth``. The wheel is built here, from a copy of the project's
own files, by setuptools' own build backend (PEP 517, what ``pip install .``
calls) at the version ``uv.lock`` pins, with nothing fetched, and checked: no
such warning, and every module and data file of ``api``, ``broker`` and
``workers`` inside (the Swagger UI files, the Lua scripts, the C sources of
the load tool).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ops.launch import ROOT

BUILD_TIMEOUT = 120  # seconds; a build takes a few
BUILD_WHEEL = "import sys\nfrom setuptools import build_meta\nprint('built', build_meta.build_wheel(sys.argv[1]))\n"
"""A PEP 517 frontend in three lines: setuptools' backend, run in the source tree, as pip runs it for a build."""
PACKAGES = ("api", "broker", "workers", "ops")


def source_files() -> list[str]:
    """The project's files (tracked, or new and not ignored) that the build uses: no caches, no build output."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git checkout to list its files")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(name for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, set[str]]:
    """Build the wheel from a copy of the sources; the build's output and the wheel's file names."""
    base = tmp_path_factory.mktemp("wheel")
    src, out = base / "src", base / "out"
    for name in [*source_files(), "pyproject.toml", "README.md"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", BUILD_WHEEL, str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    wheels = list(out.glob("herald-*.whl"))
    assert len(wheels) == 1, output[-2000:]
    with zipfile.ZipFile(wheels[0]) as wheel:
        return output, set(wheel.namelist())


def test_setuptools_has_nothing_to_warn_about(built: tuple[str, set[str]]) -> None:
    output, _ = built
    warned = [line.strip() for line in output.splitlines() if "absent from the" in line]
    assert warned == []


def test_the_wheel_carries_every_module_and_data_file(built: tuple[str, set[str]]) -> None:
    _, names = built
    files = source_files()
    expected = [name for name in files if name.endswith(".py") or not name.startswith("ops/")]
    missing = [name for name in expected if name not in names]
    assert missing == []
    for pattern in (
        "api/auth/*.py",
        "api/static/index.html",
        "api/static/swagger/swagger-ui-bundle.js",
        "api/static/swagger/swagger-ui.css",
        "api/static/swagger/LICENSE",
        "broker/lua/*.lua",
        "workers/loadtest/csrc/*.c",
        "workers/loadtest/csrc/*.h",
    ):
        assert any(Path(name).match(pattern) for name in names), pattern
    assert not any(name.startswith("tests/") for name in names)
    assert not any("__pycache__" in name for name in names)
