"""docs/architecture.md's module map is the code's: regenerated in memory, it must equal the file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("architecture_graph", REPO / "docs" / "architecture_graph.py")
graph = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(graph)


def test_the_module_map_is_current():
    text = graph.DOC.read_text()
    assert graph.rendered(text) == text, "docs/architecture.md is stale: run `make docs`"


def test_the_map_lists_every_module_and_only_declared_layers():
    found = graph.modules()
    listed = graph.module_map()
    missing = [m for m, path in found.items() if f"`{path.relative_to(REPO).as_posix()}`" not in listed]
    assert not missing and len(found) > 60
    assert {graph.group_of(m) for m in found} <= {*graph.LAYERS, graph.TOP}


def test_no_module_is_over_350_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in graph.modules().items()}
    flows = {p.name: len(p.read_text().splitlines()) for p in (REPO / "flows").glob("*.py")}
    assert {m: n for m, n in {**sizes, **flows}.items() if n > 350} == {}
