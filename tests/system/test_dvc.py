"""The DVC pipeline on a clean clone: ``dvc repro`` with no remote and no network, then an experiment.

The clone is of the working repository's HEAD (uncommitted work is not in it). Its own ``src/`` is put first on
PYTHONPATH so the stages run the cloned code; the venv's dvc and sanshi-ml entry points are used, and MLflow logs to
a temporary SQLite store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sanshi_ml.data.records import ColumnMap, load_records
from tests.conftest import DEMO_CSV, REPO

pytestmark = pytest.mark.slow  # a full repro and one experiment: about a minute on 2 cores

BIN = Path(sys.executable).parent
TARGETS = ("category", "sanshi", "unit", "appeal")


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if shutil.which("git") is None or not (BIN / "dvc").exists():
        pytest.fail("git and the venv's dvc are needed (make setup installs dvc)")
    root = tmp_path_factory.mktemp("dvc")
    repo = root / "clone"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    _run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(repo)], root, env)
    for key, value in (("user.name", "test"), ("user.email", "test@example.invalid")):
        _run(["git", "config", key, value], repo, env)
    assert not (repo / "models" / "demo").exists() and not (repo / ".dvc" / "cache").exists()
    return {"repo": repo, "root": root, "env": env}


def test_repro_runs_the_whole_pipeline_then_an_experiment_shows_in_metrics_diff(clone):
    repo, env = clone["repo"], clone["env"]
    assert "remote" not in (repo / ".dvc" / "config").read_text(encoding="utf-8")
    _run([str(BIN / "dvc"), "repro"], repo, env)

    prepared = json.loads((repo / "data" / "prepared" / "prepare.json").read_text(encoding="utf-8"))
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    from sanshi_ml.config import parse_params

    demo_hash = load_records(DEMO_CSV, ColumnMap.from_config(parse_params(params).data.columns)).content_hash()
    assert prepared["data_sha256"] == demo_hash  # the prepared file is the demo export, validated
    model = json.loads((repo / "models" / "demo" / "metadata.json").read_text(encoding="utf-8"))
    assert model["data"]["sha256"] == demo_hash and (repo / "models" / "demo" / "model.joblib").is_file()
    metrics = json.loads((repo / "reports" / "demo" / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["targets"]) == set(TARGETS)
    assert metrics["source"] == "out_of_fold"  # the training data: graded by the out-of-fold estimate
    assert metrics["targets"]["sanshi"]["macro_f1"] == model["metrics"]["sanshi"]["macro_f1"]
    for target in TARGETS:
        for plot in ("confusion.png", "coverage.png", "coverage.csv", "reliability.png"):
            assert (repo / "reports" / "demo" / f"{target}_{plot}").stat().st_size > 0
    status = _run([str(BIN / "dvc"), "status"], repo, env).stdout
    assert "up to date" in status
    # The train stage logged a run, tagged with the same data hash.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("sanshi-ml").experiment_id])
    assert run.data.tags["data_sha256"] == demo_hash and run.data.params["train.C"] == str(params["train"]["C"])
    assert run.info.run_id == model["mlflow_run_id"]

    # Commit the repro's results so the experiment is compared against exactly these numbers.
    _run(["git", "add", "dvc.lock", "reports/demo/metrics.json"], repo, env)
    _run(["git", "commit", "--quiet", "--allow-empty", "-m", "repro"], repo, env)
    _run([str(BIN / "dvc"), "exp", "run", "-S", "train.C=0.05"], repo, env)
    assert yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["train"]["C"] == 0.05
    diff = json.loads(_run([str(BIN / "dvc"), "metrics", "diff", "--json"], repo, env).stdout)
    changes = diff["reports/demo/metrics.json"]
    after = json.loads((repo / "reports" / "demo" / "metrics.json").read_text(encoding="utf-8"))
    key = "targets.category.macro_f1"
    assert changes[key]["old"] == pytest.approx(metrics["targets"]["category"]["macro_f1"])
    assert changes[key]["new"] == pytest.approx(after["targets"]["category"]["macro_f1"])
    assert changes[key]["diff"] != 0
    assert len(client.search_runs([run.info.experiment_id])) == 2  # the experiment's training was tracked too
