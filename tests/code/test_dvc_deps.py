"""dvc.yaml's stages depend on every module their command runs, so that editing any of them puts the stage out of
date (``dvc status``) instead of leaving stale models and metrics looking current."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import yaml

from tests.conftest import REPO

# The module whose function each stage's `sanshi-ml` command calls. A new stage gets its line here.
STAGE_ENTRY = {
    "prepare": "sanshi_ml.stages.prepare",
    "train": "sanshi_ml.stages.train",
    "evaluate": "sanshi_ml.stages.evaluate",
    "score": "sanshi_ml.scoring",
    "report": "sanshi_ml.stages.report",
}
SRC = REPO / "src"


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _module_file(graph: grimp.ImportGraph, module: str) -> Path:
    path = SRC / Path(*module.split("."))
    package = path / "__init__.py"
    return package if package.exists() else path.with_suffix(".py")


def _needed(graph: grimp.ImportGraph, entry: str) -> set[Path]:
    """The files of the entry module, everything it imports within the package (at any depth, lazily or not), the
    CLI that parses the command's options, and, with the model core, the package's resources (word lists, the
    责任清单)."""
    modules = {entry, *graph.find_upstream_modules(entry), "sanshi_ml.cli"}
    if graph.find_children(entry):  # a package: its modules run too
        modules |= {m for m in graph.modules if m.startswith(entry + ".")}
    files = {_module_file(graph, m) for m in modules if m.startswith("sanshi_ml")}
    if any(m.startswith("sanshi_ml.core") for m in modules):
        files.add(SRC / "sanshi_ml" / "resources")
    return files


def test_every_stage_has_a_known_entry_module():
    assert set(_stages()) == set(STAGE_ENTRY), "add the new stage's entry module to STAGE_ENTRY"


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_a_stage_depends_on_every_module_its_command_runs(stage):
    graph = grimp.build_graph("sanshi_ml")
    deps = [REPO / dep for dep in _stages()[stage].get("deps", []) if not str(dep).startswith("${")]
    missing = sorted(
        str(path.relative_to(REPO))
        for path in _needed(graph, STAGE_ENTRY[stage])
        if not any(path == dep or dep in path.parents for dep in deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps: {missing}"
