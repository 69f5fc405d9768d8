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

from components.core.config import Params

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])
# Command lines people call beside the stages (batch scoring, export, serving, checks), also at components/<name>.py.
TOP_LEVEL_CLIS = ("predict", "export", "serve", "preflight", "drift_check", "embed")
SECTIONS = set(Params.model_fields)
# Where runs are logged is not an input to what a stage computes: passing the whole `tracking` section
# to the MLflow helpers needs no params entry (a key read by name, e.g. tracking.registered_model, does).
LOGGING_ONLY = {"tracking"}
# Helpers that take a whole section but read only these keys of it.
SECTION_READERS = {"ImageLimits.from_config": ("max_image_bytes", "max_pixels", "allowed_formats")}


# Layers of components/, lowest first: a module may import its own layer and those below it, never above.
# Stages and the CLIs people call sit above every layer, at components/<name>.py.
LAYERS = ("core", "ingestion", "quality", "modeling", "scoring", "lifecycle")


def module_file(module: str) -> Path | None:
    """components.a.b -> components/a/b.py, or a package's __init__.py; None where neither exists."""
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for p in (REPO / "components").rglob("*.py"))


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


def with_packages(module: str) -> set[str]:
    """The module and every package above it: importing components.a.b runs components/__init__.py and
    components/a/__init__.py first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imported_components(module: str, packages_above: bool = True) -> set[str]:
    """components modules and packages imported anywhere in `module` (function-level imports too).

    `from components.pkg import mod` names the module components.pkg.mod where that is a module, else
    (a name defined in components.pkg) the package itself."""
    found: set[str] = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "components" and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_file(submodule) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "components"}
    if packages_above:
        found = set().union(*(with_packages(m) for m in found | {module}))
    found -= {module}
    return {m for m in found if module_file(m)}


def layer_of(module: str) -> str | None:
    """The layer a module lives in; None for components/__init__ and the stages and CLIs above the layers."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import from a lower layer into a higher one, or from a layer into a stage/CLI."""
    found = []
    for module, imports in graph.items():
        own = layer_of(module)
        if own is None:
            continue
        for dep in imports:
            other = layer_of(dep)
            if dep == "components":
                continue
            if other is None or LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{module} ({own}) imports {dep} ({other or 'a stage or CLI'})")
    return sorted(found)


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
    source = module_file(module).read_text()
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
    expected = {module_file(m).relative_to(REPO).as_posix() for m in closure(f"components.{stage}")}
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
        if "dvc.lock" in module_file(m).read_text()
    ]
    assert not readers, f"modules that read dvc.lock: {readers}"


def test_no_stage_imports_another_stage() -> None:
    offenders = {
        s: sorted(
            m
            for m in imported_components(f"components.{s}")
            if m.count(".") == 1 and m.split(".")[1] in STAGES and m != f"components.{s}"
        )
        for s in STAGES
    }
    assert not any(offenders.values()), offenders


def test_components_have_no_import_cycles() -> None:
    modules = all_modules()
    graph = {m: imported_components(m, packages_above=False) for m in modules}
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
        for p in (REPO / "components").rglob("*.py")
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


def test_layers_only_import_downwards() -> None:
    graph = {m: imported_components(m, packages_above=False) for m in all_modules()}
    assert layer_violations(graph) == []


def test_every_module_is_a_stage_a_cli_or_in_a_layer() -> None:
    packages = {p.name for p in (REPO / "components").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"packages that are not a declared layer: {sorted(packages - set(LAYERS))}"
    top = {m.split(".")[1] for m in all_modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS}
    assert top <= set(STAGES) | set(TOP_LEVEL_CLIS), (
        f"move into a layer: {sorted(top - set(STAGES) - set(TOP_LEVEL_CLIS))}"
    )


def test_the_layer_check_catches_an_upward_import_and_a_helper_importing_a_stage() -> None:
    graph = {
        "components.core.files": {"components", "components.core", "components.modeling.data"},
        "components.modeling.data": {"components.core.files"},
        "components.quality.label_issues": {"components.train_head"},
        "components.train_head": {"components.modeling.data"},
    }
    assert layer_violations(graph) == [
        "components.core.files (core) imports components.modeling.data (modeling)",
        "components.quality.label_issues (quality) imports components.train_head (a stage or CLI)",
    ]


def test_imports_resolve_through_subpackages() -> None:
    """`from components.pkg import mod` is the module (and its package), not a package name to skip."""
    found = [
        (importer, f"{node.module}.{alias.name}")
        for importer in all_modules()
        for node in ast.walk(tree(importer))
        if isinstance(node, ast.ImportFrom) and (node.module or "").count(".") == 1 and node.module in all_modules()
        for alias in node.names
        if module_file(f"{node.module}.{alias.name}") and f"{node.module}.{alias.name}" != node.module
    ]
    assert found, "no `from components.<layer> import <module>` anywhere"
    for importer, module in found:
        assert {module, module.rsplit(".", 1)[0]} <= imported_components(importer), (importer, module)
