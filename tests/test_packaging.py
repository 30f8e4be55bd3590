"""The lower bounds in pyproject.toml are what CI tests: each requirement's bound is the release
series of the version constraints.txt pins (no bound older than anything ever tested)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if not r.startswith("denseseg")]
    bounds = {}
    for req in reqs:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.replace(" ", ""))
        assert found, f"{req}: write requirements as NAME>=VERSION"
        bounds[found.group(1).lower().replace("_", "-")] = found.group(2)
    return bounds


def test_every_lower_bound_is_the_tested_release_series() -> None:
    pins, bounds = _pins(), _bounds()
    untested = sorted(set(bounds) - set(pins))
    assert untested == ["timm"], f"requirements CI never installs: {untested}"
    for name, bound in bounds.items():
        if name in pins:
            assert pins[name].startswith(bound), f"{name}>={bound} but CI tests {pins[name]}"
