"""MLflow tracking and the registry end to end, on a real SQLite store in a temporary directory.

Two runs are trained on the demo data with different C; one is promoted, and loading ``@champion`` must give that
run's model (same artifact sha256, same answers), not the other's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sanshi_ml.artifacts import load_model, sha256_file
from sanshi_ml.cli import app
from sanshi_ml.config import with_overrides
from sanshi_ml.stages.evaluate import evaluate
from sanshi_ml.stages.train import train
from sanshi_ml.suggest import Suggester
from sanshi_ml.tracking import champion_uri, load_registered_model_dir, promote
from tests.conftest import DEMO_CSV

pytestmark = pytest.mark.slow  # two trainings and a registry: about 20 s

TEXTS = [
    "A3区青青家园小区的电梯坏了一个多月，物业一直不修",
    "楼上邻居每天深夜拖动家具，噪音太大，沟通无果",
    "建议在学校门口增设红绿灯",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, repo_params):
    """Two tracked runs (C=0.2, and C=1.5 with a 25% holdout) in a fresh SQLite store; calibration folds cut to 3
    for speed."""
    root = tmp_path_factory.mktemp("mlflow")
    params = {}
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        for name, C, holdout in (("a", 0.2, 0.0), ("b", 1.5, 0.25)):
            params[name] = with_overrides(
                repo_params,
                {
                    "train.C": C,
                    "train.calibration_cv": 3,
                    "tracking.enabled": True,
                    "split.holdout": holdout,
                    "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                },
            )
            runs[name] = train([DEMO_CSV], params[name], model_dir=root / f"model_{name}", progress=lambda _m: None)
        yield {"root": root, "params": params["a"], "runs": runs}
        mlflow.set_tracking_uri(previous)


def test_each_run_records_params_tags_metrics_plots_and_model(store):
    client = MlflowClient(store["params"].tracking.uri)
    result = store["runs"]["a"]
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.C"] == "0.2" and run.data.params["split.seed"] == "42"
    assert run.data.params["data.columns.targets.sanshi"] == "三事"
    assert run.data.tags["data_sha256"] == result.metadata["data"]["sha256"]
    assert run.data.tags["git_commit"] == (result.metadata["git_commit"] or "unknown")
    assert run.data.tags["model_sha256"] == sha256_file(result.model_dir / "model.joblib")
    m = run.data.metrics
    assert m["category.macro_f1"] == pytest.approx(result.metrics["category"]["macro_f1"])
    for label, stats in result.metrics["sanshi"]["per_class"].items():
        assert m[f"sanshi.f1.{label}"] == pytest.approx(stats["f1"])
    assert "unit.f1.社区居委会/村委会" in m and "category.slice.year_2024.accuracy" in m
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {
        "evaluation/metrics.json",
        "evaluation/sanshi_confusion.png",
        "evaluation/category_coverage.png",
        "evaluation/category_coverage.csv",
    } <= artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="evaluation/metrics.json", dst_path=str(store["root"] / "dl")
    )
    logged = json.loads(open(local, encoding="utf-8").read())
    assert logged["targets"]["sanshi"]["accuracy"] == pytest.approx(result.metrics["sanshi"]["accuracy"])
    assert logged["source"] == run.data.tags["metrics_source"] == "out_of_fold"
    assert not any(key.startswith("holdout.") for key in m)


def test_a_run_with_a_holdout_logs_both_sets_of_figures_and_says_which_is_which(store):
    client = MlflowClient(store["params"].tracking.uri)
    result = store["runs"]["b"]
    run = client.get_run(result.run_id)
    assert run.data.tags["metrics_source"] == "out_of_fold + holdout"
    m = run.data.metrics
    assert m["category.macro_f1"] == pytest.approx(result.metrics["category"]["macro_f1"])
    assert m["holdout.category.macro_f1"] == pytest.approx(result.holdout.metrics["category"]["macro_f1"])
    assert m["holdout.sanshi.n"] == len(result.holdout.records) < m["sanshi.n"] == len(result.records)
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id,
        artifact_path="evaluation_holdout/metrics.json",
        dst_path=str(store["root"] / "holdout_download"),
    )
    logged = json.loads(Path(local).read_text(encoding="utf-8"))
    assert logged["source"] == "holdout" and "untouched holdout" in logged["scope"]
    assert logged["targets"]["unit"]["accuracy"] == pytest.approx(result.holdout.metrics["unit"]["accuracy"])
    # The model: a pyfunc with a signature and an input example, its metadata pointing back at the run.
    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["title", "text"]
    assert {"sanshi", "sanshi_confidence", "sanshi_needs_review", "policy_conflict"} <= set(
        info.signature.outputs.input_names()
    )
    assert info.saved_input_example_info is not None
    model_dir = load_registered_model_dir(f"runs:/{result.run_id}/model", store["root"] / "by_run")
    assert json.loads((model_dir / "metadata.json").read_text(encoding="utf-8"))["mlflow_run_id"] == result.run_id


def test_champion_alias_loads_the_promoted_run_and_moves_on_promotion(store):
    params, runs = store["params"], store["runs"]
    sha = {k: sha256_file(r.model_dir / "model.joblib") for k, r in runs.items()}
    assert sha["a"] != sha["b"]

    version = promote(runs["a"].run_id, params)
    assert version.run_id == runs["a"].run_id
    champion = load_model(load_registered_model_dir(champion_uri(params), store["root"] / "champion1"))
    assert champion.metadata["artifact"]["sha256"] == sha["a"]
    expected = Suggester.from_loaded(load_model(runs["a"].model_dir)).score_frame(TEXTS)
    pd.testing.assert_frame_equal(Suggester.from_loaded(champion).score_frame(TEXTS), expected)

    # The pyfunc flavour answers like the model it wraps (through the same Suggester).
    pyfunc = mlflow.pyfunc.load_model(champion_uri(params))
    answer = pyfunc.predict(pd.DataFrame({"title": [None, None, "红绿灯"], "text": TEXTS[:2] + ["建议在学校门口增设"]}))
    np.testing.assert_array_equal(answer["sanshi"].to_numpy()[:2], expected["sanshi"].to_numpy()[:2])

    # Promote the other run from the command line: the alias moves, version 2 is b's model.
    params_file = store["root"] / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(), allow_unicode=True), encoding="utf-8")
    out = CliRunner().invoke(app, ["promote", runs["b"].run_id, "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    assert "version 2" in out.output and "models:/sanshi-triage@champion" in out.output
    moved_dir = load_registered_model_dir(champion_uri(params), store["root"] / "champion2")
    moved = load_model(moved_dir)
    # The registered model carries its recorded outcomes: evaluating it on its training data grades the rows by
    # them (the out-of-fold and holdout figures logged with the run), not by the model that saw them.
    report = evaluate([DEMO_CSV], moved_dir, store["root"] / "champion2_report", params)
    assert report["source"] == "out_of_fold"
    assert report["targets"]["unit"]["macro_f1"] == pytest.approx(runs["b"].metrics["unit"]["macro_f1"])
    assert report["holdout"]["targets"]["unit"]["macro_f1"] == pytest.approx(
        runs["b"].holdout.metrics["unit"]["macro_f1"]
    )
    assert moved.metadata["artifact"]["sha256"] == sha["b"]
    alias = MlflowClient(params.tracking.uri).get_model_version_by_alias("sanshi-triage", "champion")
    assert str(alias.version) == "2" and alias.tags["data_sha256"] == runs["b"].metadata["data"]["sha256"]


def test_promote_best_picks_the_run_with_the_highest_metric(store):
    params, runs = store["params"], store["runs"]
    best = max(runs.values(), key=lambda r: r.metrics["category"]["macro_f1"])
    worst = min(runs.values(), key=lambda r: r.metrics["category"]["macro_f1"])
    assert promote(None, params, best_metric="category.macro_f1").run_id == best.run_id
    assert promote(None, params, best_metric="category.macro_f1", lowest=True).run_id == worst.run_id


def test_promote_errors_are_one_line_with_exit_status_2(store):
    params_file = store["root"] / "params.yaml"
    params_file.write_text(yaml.safe_dump(store["params"].model_dump(), allow_unicode=True), encoding="utf-8")
    runner = CliRunner()
    for args, message in (
        (["promote", "no-such-run"], "run 'no-such-run' not found"),
        (["promote", "--best", "category.no_such_metric"], "has the metric"),
        (["promote"], "give a RUN_ID or --best METRIC"),
    ):
        out = runner.invoke(app, [*args, "--params", str(params_file)])
        assert out.exit_code == 2, out.output
        assert message in out.output and "Traceback" not in out.output
