"""The development environment is the lock (issue 21): complete, current, and what is installed.

`make install` syncs the venv to requirements/dev-<cpu|gpu>.lock. These tests fail when someone adds or
changes a requirement in pyproject.toml without `make lock`, and when the running environment holds a
distribution that the lock does not pin at that version.
"""

from __future__ import annotations

import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "requirements"
PROJECT = "transfer-pipeline"
LOCKED_PYTHONS = {"3.11": "", "3.12": "-py3.12"}  # interpreter -> lock-name suffix (3.12: cpu only)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a `uv pip compile` lock."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := PIN.match(line):
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def lock_target_environment(python: str = "3.11") -> dict[str, str]:
    """Marker values of the platform the locks were compiled for (not of this machine)."""
    env = default_environment()
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def requirements_of(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The project's requirements with these extras, self-references (project[onnx]) expanded."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    wanted, seen, found = list(extras), set(), [Requirement(r) for r in project["dependencies"]]
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                wanted.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def lock_problems(pyproject: Path, lock: Path, extras: list[str], python: str = "3.11") -> list[str]:
    """What in pyproject's requirements the lock does not satisfy (empty: the lock is current)."""
    pins, env, problems = read_lock(lock), lock_target_environment(python), []
    for requirement in requirements_of(pyproject, extras):
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is required but not in {lock.name}: run `make lock`")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement} is required but {lock.name} pins {name}=={pins[name]}: run `make lock`")
    return problems


@pytest.mark.parametrize(
    ("lock", "flavour", "python"),
    [("dev-cpu", "cpu", "3.11"), ("dev-gpu", "gpu", "3.11"), ("dev-cpu-py3.12", "cpu", "3.12")],
)
def test_each_lock_satisfies_every_requirement_of_pyproject(lock: str, flavour: str, python: str) -> None:
    assert lock_problems(REPO / "pyproject.toml", LOCKS / f"{lock}.lock", [flavour, "dev"], python) == []


def test_both_interpreters_lock_the_same_versions() -> None:
    """3.12's lock starts from 3.11's pins: a difference is a package that differs by interpreter on purpose."""
    py311, py312 = read_lock(LOCKS / "dev-cpu.lock"), read_lock(LOCKS / "dev-cpu-py3.12.lock")
    differ = {name: (py311[name], py312[name]) for name in py311.keys() & py312.keys() if py311[name] != py312[name]}
    assert differ == {}


def test_a_dependency_added_without_relocking_is_caught(tmp_path: Path) -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    added = tmp_path / "pyproject.toml"
    added.write_text(pyproject.replace("dependencies = [\n", 'dependencies = [\n  "polars>=1",\n', 1))
    assert lock_problems(added, LOCKS / "dev-cpu.lock", ["cpu", "dev"]) == [
        "polars>=1 is required but not in dev-cpu.lock: run `make lock`"
    ]
    narrowed = tmp_path / "narrowed.toml"
    narrowed.write_text(re.sub(r'"keras>=[^"]*"', '"keras>=99"', pyproject))
    assert [p for p in lock_problems(narrowed, LOCKS / "dev-cpu.lock", ["cpu", "dev"]) if p.startswith("keras")]


def test_every_lock_pins_with_hashes() -> None:
    for lock in [*LOCKS.glob("*.lock"), *(REPO / "infra" / "requirements").glob("*.lock")]:
        text = lock.read_text(encoding="utf-8")
        pinned = sum(1 for line in text.splitlines() if PIN.match(line))
        assert pinned and text.count("--hash=sha256:") >= pinned, f"{lock.name}: every pin needs its hashes"


def installed_flavour() -> str | None:
    names = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
    return "cpu" if "tensorflow-cpu" in names else "gpu" if "tensorflow" in names else None


@pytest.mark.skipif(
    f"{sys.version_info.major}.{sys.version_info.minor}" not in LOCKED_PYTHONS
    or (platform.system(), platform.machine()) != ("Linux", "x86_64"),
    reason="the locks are for Python 3.11 and 3.12 on x86_64 Linux; elsewhere `make install` resolves pyproject",
)
def test_the_running_environment_is_exactly_the_lock() -> None:
    flavour = installed_flavour()
    assert flavour, "no TensorFlow installed: not an environment `make install` made"
    suffix = LOCKED_PYTHONS[f"{sys.version_info.major}.{sys.version_info.minor}"]
    pins = read_lock(LOCKS / f"dev-{flavour}{suffix}.lock")
    stray = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name != PROJECT and pins.get(name) != dist.version:
            stray[name] = f"{dist.version} installed, lock has {pins.get(name, 'nothing')}"
    assert stray == {}, "the environment differs from the lock: `make install` syncs it"
