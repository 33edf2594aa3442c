"""sanshi-ml tune: candidate settings, cross-validated ranking, MLflow nested runs, and the best params file."""

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sanshi_ml.cli import app
from sanshi_ml.config import ConfigError, load_params
from sanshi_ml.data.records import ColumnMap, load_records
from sanshi_ml.stages.tune import apply_setting, candidate_settings, tune, write_best
from tests.conftest import DEMO_CSV


def test_small_spaces_are_searched_exhaustively_large_ones_sampled_without_repeats():
    grid = candidate_settings({"train.C": [0.3, 1.0], "features.min_df": [1, 2]}, n_trials=10, seed=0)
    assert sorted((s["train.C"], s["features.min_df"]) for s in grid) == [(0.3, 1), (0.3, 2), (1.0, 1), (1.0, 2)]
    space = {"train.C": [0.1, 0.3, 0.7, 1.5], "features.char_ngram_max": [0, 2, 3], "features.min_df": [1, 2]}
    sampled = candidate_settings(space, n_trials=5, seed=0)
    assert len(sampled) == 5 and len({tuple(sorted(s.items())) for s in sampled}) == 5
    assert candidate_settings(space, n_trials=5, seed=0) == sampled  # the seed fixes the sample
    assert candidate_settings({}, n_trials=3, seed=0) == [{}]
    with pytest.raises(ConfigError, match="non-empty list"):
        candidate_settings({"train.C": 0.3}, n_trials=3, seed=0)


def test_settings_are_validated_like_params(repo_params):
    assert apply_setting(repo_params, {"train.class_weight": None}).train.class_weight is None
    with pytest.raises(ConfigError, match="unknown parameter 'train.Cee'"):
        apply_setting(repo_params, {"train.Cee": 1.0})
    with pytest.raises(ConfigError):
        apply_setting(repo_params, {"train.C": -1})


@pytest.fixture(scope="module")
def demo_records(repo_params):
    return load_records(DEMO_CSV, ColumnMap.from_config(repo_params.data.columns))


def test_tune_ranks_by_cross_validation_and_logs_nested_runs(tmp_path, repo_params, demo_records):
    params = repo_params.model_copy(deep=True)
    params.tracking.enabled = True
    params.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params.tracking.experiment = "tune-test"
    params.tune.space = {"features.char_ngram_max": [0, 2], "train.C": [0.7]}
    params.split.stratify_target = "subcategory"  # not a target of this data: folds stratify on the first target
    result = tune(demo_records, params, target="sanshi", cv=2, progress=lambda _m: None)
    scores = [t.score("sanshi") for t in result.trials]
    assert len(result.trials) == 2 and scores == sorted(scores, reverse=True)
    assert {t.setting["features.char_ngram_max"] for t in result.trials} == {0, 2}
    assert all(0 < s <= 1 for s in scores) and set(result.best.scores) == set(demo_records.targets)

    client = MlflowClient(tracking_uri=params.tracking.uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tune.best_run_id"] == result.best.run_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert {run.info.run_id for run in children} == {t.run_id for t in result.trials}
    best = client.get_run(result.best.run_id)
    assert best.data.metrics["cv.sanshi.macro_f1.mean"] == pytest.approx(result.best.score("sanshi"))
    assert best.data.params["features.char_ngram_max"] == str(result.best.setting["features.char_ngram_max"])
    assert len(client.get_metric_history(result.best.run_id, "cv.sanshi.macro_f1.fold")) == 2

    path = write_best(result, params, tmp_path / "best.yaml")
    written = load_params(path)
    assert written.features.char_ngram_max == result.best.setting["features.char_ngram_max"]
    assert "cross-validated macro-F1" in path.read_text(encoding="utf-8").splitlines()[0]


def test_cli_tune_needs_a_search_space_and_names_a_bad_key(tmp_path):
    runner = CliRunner()
    params = yaml.safe_load((DEMO_CSV.parents[2] / "params.yaml").read_text(encoding="utf-8"))
    params["tracking"]["enabled"] = False
    params.setdefault("tune", {})["space"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["tune", str(DEMO_CSV), "--params", str(path), "--out", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "tune.space" in result.output and "Traceback" not in result.output
    params["tune"]["space"] = {"train.Cee": [1.0]}
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["tune", str(DEMO_CSV), "--params", str(path), "--out", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "train.Cee" in result.output and "Traceback" not in result.output


def test_cli_tune_reports_a_deleted_experiment_in_one_line(tmp_path):
    runner = CliRunner()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.create_experiment("gone"))
    params = yaml.safe_load((DEMO_CSV.parents[2] / "params.yaml").read_text(encoding="utf-8"))
    params["tracking"].update(enabled=True, uri=store, experiment="gone")
    params["tune"]["space"] = {"train.C": [0.7]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["tune", str(DEMO_CSV), "--params", str(path), "--out", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "deleted" in result.output and "Traceback" not in result.output
