"""The DAG cannot drift from the code: dvc.yaml lists each stage's code, params and input files.

Read from the code itself (imports and `params.<section>.<key>` reads, parsed with `ast`), so a new
import or setting that dvc.yaml does not list fails here instead of silently not rerunning a stage.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from components.config import Params

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])
SECTIONS = set(Params.model_fields)
# Where runs are logged is not an input to what a stage computes: passing the whole `tracking` section
# to the MLflow helpers needs no params entry (a key read by name, e.g. tracking.registered_model, does).
LOGGING_ONLY = {"tracking"}
# Helpers that take a whole section but read only these keys of it.
SECTION_READERS = {"ImageLimits.from_config": ("max_image_bytes", "max_pixels", "allowed_formats")}


PACKAGE_INIT = "components.__init__"


@cache
def tree(module: str) -> ast.Module:
    return ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())


def imported_components(module: str) -> set[str]:
    """components.* modules imported anywhere in `module` (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.ImportFrom) and node.module == "components":
            found |= {f"components.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("components.")}
    if module.startswith("components.") and module != PACKAGE_INIT:
        found.add(PACKAGE_INIT)  # importing any components.x runs the package's __init__ first
    return {m for m in found if (REPO / (m.replace(".", "/") + ".py")).is_file()}


def closure(module: str) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in imported_components(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def params_read(module: str) -> set[str]:
    """'section' or 'section.key' for every `params.<section>[.<key>]` read in the module."""
    reads: set[str] = set()
    parents = {child: node for node in ast.walk(tree(module)) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree(module)):
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "params"
            and node.attr in SECTIONS
        ) or isinstance(parents.get(node), ast.Attribute):
            continue  # `params.a.b` is counted below, by key
        call = parents.get(node)
        reader = ast.unparse(call.func) if isinstance(call, ast.Call) else ""
        if reader in SECTION_READERS:
            reads |= {f"{node.attr}.{key}" for key in SECTION_READERS[reader]}
        elif node.attr not in LOGGING_ONLY:
            reads.add(node.attr)
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    for section, key in re.findall(r"\bparams\.(\w+)\.(\w+)", source):
        if section in SECTIONS:
            reads.add(section if key.startswith("model_") else f"{section}.{key}")  # model_dump(): all of it
    return reads


def listed_params(stage: str) -> set[str]:
    listed: set[str] = set()
    for item in DVC["stages"][stage].get("params", []):
        listed |= set(item) if isinstance(item, dict) else {item}
    return listed


def covered(read: str, listed: set[str]) -> bool:
    section = read.split(".")[0]
    return read in listed or section in listed or (read == section and any(p.startswith(section + ".") for p in listed))


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_modules_the_stage_imports(stage: str) -> None:
    expected = {f"{m.replace('.', '/')}.py" for m in closure(f"components.{stage}")}
    listed = {d for d in DVC["stages"][stage]["deps"] if d.startswith("components/")}
    assert listed == expected, (
        f"dvc.yaml stage {stage}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_every_setting_a_stage_reads_is_in_its_params(stage: str) -> None:
    listed = listed_params(stage)
    reads = set().union(*(params_read(m) for m in closure(f"components.{stage}")))
    missing = sorted(r for r in reads if not covered(r, listed))
    assert not missing, f"dvc.yaml stage {stage} reads settings it does not list under params: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_file_on_the_command_line_is_a_dep_or_an_out(stage: str) -> None:
    spec = DVC["stages"][stage]
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", []) + spec.get("metrics", [])}
    outs |= {next(iter(p)) if isinstance(p, dict) else p for p in spec.get("plots", [])}
    deps = set(spec["deps"])
    paths = [t for t in spec["cmd"].split() if "/" in t and not t.startswith("-") and not t.startswith("components.")]
    stray = [
        p
        for p in paths
        if p not in deps
        and not any(p == o or p.startswith(o.rstrip("/") + "/") or o.startswith(p.rstrip("/") + "/") for o in outs)
    ]
    assert not stray, f"stage {stage}: {stray} on its command line are neither deps nor outs"


def test_no_stage_reads_dvc_lock() -> None:
    readers = [
        m
        for m in sorted(set().union(*(closure(f"components.{s}") for s in STAGES)))
        if "dvc.lock" in (REPO / (m.replace(".", "/") + ".py")).read_text()
    ]
    assert not readers, f"modules that read dvc.lock: {readers}"


def test_no_stage_imports_another_stage() -> None:
    offenders = {
        s: sorted(
            m for m in imported_components(f"components.{s}") if m.split(".")[1] in STAGES and m != f"components.{s}"
        )
        for s in STAGES
    }
    assert not any(offenders.values()), offenders


def test_components_have_no_import_cycles() -> None:
    modules = [f"components.{p.stem}" for p in (REPO / "components").glob("*.py") if p.stem != "__init__"]
    graph = {m: imported_components(m) - {m} for m in modules}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep]) if dep in path else dep}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])


def test_components_never_import_prefect() -> None:
    users = [
        p.name
        for p in (REPO / "components").glob("*.py")
        if re.search(r"^\s*(from|import) prefect", p.read_text(), re.M)
    ]
    assert not users, users


def test_every_stage_can_use_the_run_cache() -> None:
    """DVC skips its run-cache for a stage with any `cache: false` output: reports are cached like models,
    so `dvc exp apply` and a run-cache restore bring every stage's reports back."""
    uncached = {
        stage: [next(iter(out)) for out in spec.get("outs", []) if isinstance(out, dict) and not _cached(out)]
        for stage, spec in DVC["stages"].items()
    }
    assert {stage: outs for stage, outs in uncached.items() if outs} == {}


def _cached(out: dict) -> bool:
    return all((options or {}).get("cache", True) for options in out.values())
