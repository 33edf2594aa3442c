"""The analysts' notebooks: committed without outputs, and every one runs top to bottom (nbmake) on the demo data.

The notebooks write their models and MLflow runs to temporary directories; MLFLOW_TRACKING_URI points at a
temporary store too, so a notebook that forgot to choose a store still could not touch the repository's mlflow.db.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
EXPECTED = ("01_explore.ipynb", "02_train_and_compare.ipynb", "03_review_queue.ipynb")


def test_the_three_notebooks_are_committed_without_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(EXPECTED) <= set(found)
    for name in found:
        notebook = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert code, f"{name} has no code"
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{name}: outputs not stripped (run `.venv/bin/nbstripout notebooks/*.ipynb`)"
            )
        source = "".join("".join(c["source"]) for c in code)
        assert "from sanshi_ml" in source, f"{name} should call the package, not carry its own copy of the logic"


@pytest.mark.slow  # about 30 s: three kernels, two trainings tracked, one untracked
def test_every_notebook_runs_on_the_demo_data(tmp_path):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SANSHI_NOTEBOOK_DATA": "demo",
        "MPLBACKEND": "Agg",
    }
    repo_store = REPO / "mlflow.db"
    before = repo_store.stat().st_mtime_ns if repo_store.exists() else None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbmake",
            "--nbmake-timeout=300",
            "-q",
            "-p",
            "no:cacheprovider",
            str(NOTEBOOKS),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert f"{len(list(NOTEBOOKS.glob('*.ipynb')))} passed" in done.stdout
    after = repo_store.stat().st_mtime_ns if repo_store.exists() else None
    assert after == before, "a notebook wrote to the repository's mlflow.db"
