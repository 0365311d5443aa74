"""The environment is locked: every package comes pinned from requirements.lock.

A fresh clone (`make setup`, CI) installs exactly the versions the tests ran on; a
dependency resolved anew could break the project without any change to it (as pynndescent
0.7.0 with scipy 1.17 did at 8,192 cells and more).
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import PROJECT

LOCK = PROJECT / "requirements.lock"


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _public(version: str) -> str:
    return version.split("+")[0]  # torch 2.13.0+cpu is the CPU build of 2.13.0


def test_lock_file_pins_every_dependency_of_the_project_recursively() -> None:
    pins = _locked()
    assert len(pins) > 100, "requirements.lock should pin the whole environment"
    missing, todo, seen = [], ["perturbscope"], set()
    while todo:
        name = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            extras = {"test"} if name == "perturbscope" else set()
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in seen:
                continue
            seen.add(dep)
            if dep not in pins:
                missing.append(f"{dep} (needed by {name})")
            todo.append(req.name)
    assert not missing, f"not pinned in requirements.lock (run `make lock`): {missing}"


def test_installed_versions_are_the_locked_ones() -> None:
    wrong = []
    for name, version in _locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (locked {version})")
            continue
        if _public(installed) != _public(version):
            wrong.append(f"{name}: {installed} installed, {version} locked")
    assert not wrong, "the environment differs from requirements.lock (run `make setup`): " + "; ".join(wrong)


def test_direct_pins_of_pyproject_agree_with_the_lock() -> None:
    pins = _locked()
    for text in metadata.requires("perturbscope") or []:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact and canonicalize_name(req.name) in pins:
            assert _public(pins[canonicalize_name(req.name)]) == exact[0], req
