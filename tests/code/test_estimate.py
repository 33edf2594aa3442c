"""The model `train` saves learns from every row, and what it reports honestly estimates that model: the out-of-fold
estimate, the optional untouched holdout, and `evaluate`, which never grades rows the model trained on by the model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sanshi_ml.artifacts import ArtifactError, load_model
from sanshi_ml.config import ConfigError, load_params, with_overrides
from sanshi_ml.core.model import ModelError, TriageModel
from sanshi_ml.data.records import ColumnMap, load_records, split_indices, subset
from sanshi_ml.evaluation.estimate import ESTIMATE_FILE, HOLDOUT_FILE, estimate
from sanshi_ml.evaluation.metrics import evaluate_model
from sanshi_ml.stages.evaluate import evaluate, grade
from sanshi_ml.stages.train import train
from tests.conftest import DEMO_CSV

TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


@pytest.fixture(scope="module")
def demo_records(repo_params):
    return load_records(DEMO_CSV, ColumnMap.from_config(repo_params.data.columns))


@pytest.fixture(scope="module")
def with_holdout(tmp_path_factory, repo_params):
    """The demo data trained with a 25% untouched holdout."""
    params = with_overrides(repo_params, {"split.holdout": 0.25})
    model_dir = tmp_path_factory.mktemp("holdout") / "model"
    return train([DEMO_CSV], params, model_dir=model_dir, progress=lambda _m: None, track=False), params


def test_the_saved_model_learns_from_every_labelled_row(demo_model_dir, demo_records, repo_params):
    loaded = load_model(demo_model_dir)
    assert loaded.metadata["data"]["n_train"] == len(demo_records) == 418
    for name, head in loaded.model.heads.items():
        assert head.n_train == int(demo_records.has_label(name).sum())
    # The very model a plain fit on all rows gives: the saved model answers like it, record for record.
    direct = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(
        demo_records, progress=lambda _m: None
    )
    texts = demo_records.model_texts[:60]
    saved, _ = loaded.model.predict(texts)
    fitted, _ = direct.predict(texts)
    for name in saved:
        np.testing.assert_array_equal(saved[name].labels, fitted[name].labels)
        np.testing.assert_allclose(saved[name].confidence, fitted[name].confidence, atol=1e-6)


def test_the_estimate_grades_no_step_on_the_rows_it_was_fitted_to(demo_records, repo_params):
    """With labels shuffled there is nothing to learn. Graded on the rows it was fitted to, the review threshold
    finds a few lucky rows it can accept at 100% accuracy; the estimate, where each fold's threshold was chosen
    without that fold, finds chance-level answers and accepts next to nothing."""
    shuffled = subset(demo_records, np.arange(len(demo_records)))
    rng = np.random.default_rng(0)
    for name in TARGETS:
        shuffled.frame[name] = rng.permutation(shuffled.frame[name].to_numpy())
    model = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(
        shuffled, progress=lambda _m: None
    )
    found = estimate(model, shuffled)
    honest = evaluate_model(model, shuffled, predictions=found.predictions, uncalibrated=found.uncalibrated)
    assert found.folds == repo_params.train.calibration_cv
    lucky = [name for name, head in model.heads.items() if head.threshold_info["holdout_accuracy"] == 1.0]
    assert lucky  # the threshold's own rows promise perfect answers …
    for name in TARGETS:
        majority = shuffled.frame[name].value_counts(normalize=True).iloc[0]
        assert honest[name]["accuracy"] <= majority + 0.05, (name, honest[name]["accuracy"], majority)
        assert honest[name]["coverage_at_threshold"] < 0.02
    for name in lucky:  # … which rows the thresholds did not see do not keep
        assert (honest[name]["accuracy_at_threshold"] or 0.0) <= 0.5
    # Every row's review threshold comes from a chain fitted without its fold, not from the shipped head.
    assert len(np.unique(found.predictions["unit"].row_thresholds)) > 1


def test_repeated_texts_share_one_outcome(demo_records, demo_model_dir):
    graded = grade(demo_records, load_model(demo_model_dir))
    groups = demo_records.frame["group"].to_numpy()
    repeated = pd.Series(groups).duplicated(keep=False).to_numpy()
    assert repeated.sum() == 4
    for name, pred in graded.predictions.items():
        frame = pd.DataFrame(
            {"group": groups[repeated], "label": pred.labels[repeated], "confidence": pred.confidence[repeated]}
        )
        assert (frame.groupby("group").nunique() == 1).all().all(), name


def test_evaluate_on_the_training_export_reports_the_estimate_not_the_model_on_its_own_rows(
    demo_model_dir, tmp_path, repo_params
):
    payload = evaluate([DEMO_CSV], demo_model_dir, tmp_path, repo_params)
    meta = json.loads((demo_model_dir / "metadata.json").read_text(encoding="utf-8"))
    assert payload["source"] == "out_of_fold" and payload["rows"] == {"out_of_fold": 418, "unseen_rows": 0}
    assert "out-of-fold estimate" in payload["scope"]
    for name, figures in meta["metrics"].items():
        assert payload["targets"][name]["macro_f1"] == figures["macro_f1"]  # what train reported, exactly
        assert payload["targets"][name]["accuracy"] < 0.99  # not the model grading rows it has seen
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written["source"] == "out_of_fold" and written["targets"]["unit"]["ece"] == payload["targets"]["unit"]["ece"]


def test_an_export_mixing_training_rows_and_new_rows_grades_each_kind_for_what_it_is(
    demo_model_dir, tmp_path, repo_params, demo_records
):
    frame = pd.read_csv(DEMO_CSV, dtype=str, keep_default_na=False)
    frame = frame[frame["工单编号"].isin(demo_records.frame["id"])]  # the rows with text, in the records' order
    new = frame.iloc[100:160].copy()
    new["诉求内容"] = new["诉求内容"] + "，已经反映多次。"
    new["工单编号"] = new["工单编号"] + "-new"
    mixed = pd.concat([frame.iloc[:40], new])
    path = tmp_path / "mixed.csv"
    mixed.to_csv(path, index=False)
    payload = evaluate([path], demo_model_dir, tmp_path / "report", repo_params)
    assert payload["source"] == "out_of_fold_and_unseen_rows"
    assert payload["rows"] == {"out_of_fold": 40, "unseen_rows": 60}
    loaded = load_model(demo_model_dir)
    records = load_records(path, ColumnMap.from_config(repo_params.data.columns))
    graded = grade(records, loaded)
    # The new rows: the model's own answers. The training rows: their out-of-fold outcomes, as train recorded them.
    own, _ = loaded.model.predict(records.model_texts[40:])
    np.testing.assert_array_equal(graded.predictions["unit"].labels[40:], own["unit"].labels)
    whole = grade(demo_records, loaded)
    np.testing.assert_array_equal(graded.predictions["unit"].labels[:40], whole.predictions["unit"].labels[:40])
    np.testing.assert_allclose(graded.predictions["unit"].confidence[:40], whole.predictions["unit"].confidence[:40])


def test_a_holdout_is_measured_by_a_model_that_never_saw_it_and_the_saved_model_still_learns_from_it(
    with_holdout, demo_records
):
    result, params = with_holdout
    meta = result.metadata
    fit_idx, held_idx = split_indices(demo_records, 0.25, params.split.seed, params.split.stratify_target)
    assert len(result.holdout.records) == len(held_idx) == meta["holdout"]["rows"] == meta["data"]["n_holdout"]
    assert meta["data"]["n_train"] == len(demo_records)  # the saved model: every row, the holdout's included
    assert result.model.heads["sanshi"].n_train == len(demo_records)
    # The holdout figures are those of a model fitted on the other rows only.
    probe = TriageModel(params.text, params.features, params.train).fit(
        subset(demo_records, fit_idx), progress=lambda _m: None
    )
    expected = probe.predict_records(subset(demo_records, held_idx))
    for name in TARGETS:
        np.testing.assert_array_equal(result.holdout.predictions[name].labels, expected[name].labels)
    assert meta["holdout"]["metrics"]["unit"]["macro_f1"] == result.holdout.metrics["unit"]["macro_f1"]
    assert "untouched holdout" in meta["holdout"]["description"] and meta["metrics_source"] == "out_of_fold"
    assert (result.model_dir / HOLDOUT_FILE).is_file() and (result.model_dir / ESTIMATE_FILE).is_file()


def test_evaluate_reports_the_holdout_beside_the_estimate(with_holdout, tmp_path):
    result, params = with_holdout
    payload = evaluate([DEMO_CSV], result.model_dir, tmp_path, params)
    assert payload["source"] == "out_of_fold"
    holdout = payload["holdout"]
    assert holdout["source"] == "holdout" and holdout["rows"] == len(result.holdout.records)
    for name in TARGETS:
        assert holdout["targets"][name]["macro_f1"] == result.holdout.metrics[name]["macro_f1"]
        assert holdout["targets"][name]["coverage_at_threshold"] == pytest.approx(
            result.holdout.metrics[name]["coverage_at_threshold"]
        )


def test_retraining_without_a_holdout_removes_the_old_holdout_file(with_holdout, repo_params, tmp_path):
    result, _ = with_holdout
    target = tmp_path / "model"
    import shutil

    shutil.copytree(result.model_dir, target)
    train([DEMO_CSV], repo_params, model_dir=target, progress=lambda _m: None, track=False)
    assert not (target / HOLDOUT_FILE).exists()
    assert json.loads((target / "metadata.json").read_text(encoding="utf-8"))["holdout"] is None


def test_a_changed_outcome_file_is_refused(demo_model_dir, tmp_path, repo_params):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(demo_model_dir, copy)
    table = pd.read_parquet(copy / ESTIMATE_FILE)
    table["unit__confidence"] = 0.99  # flatter figures
    table.to_parquet(copy / ESTIMATE_FILE)
    with pytest.raises(ArtifactError, match="integrity check failed"):
        evaluate([DEMO_CSV], copy, tmp_path / "report", repo_params)
    (copy / ESTIMATE_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        evaluate([DEMO_CSV], copy, tmp_path / "report", repo_params)


def test_a_model_saved_with_a_held_out_split_is_still_evaluated_on_the_rows_it_never_saw(
    demo_model_dir, tmp_path, repo_params, demo_records
):
    """Models saved before the shipped model trained on every row recorded a split and no outcomes: they load, and
    on their training data only their held-out split is graded."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(demo_model_dir, old)
    meta = json.loads((old / "metadata.json").read_text(encoding="utf-8"))
    for key in ("estimate", "holdout", "metrics_source"):
        meta.pop(key)
    meta["split"] = {"test_size": 0.25, "seed": 42, "stratify_target": "sanshi"}
    (old / "metadata.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    (old / ESTIMATE_FILE).unlink()
    payload = evaluate([DEMO_CSV], old, tmp_path / "report", repo_params)
    _, test_idx = split_indices(demo_records, 0.25, 42, "sanshi")
    assert payload["source"] == "held_out_split" and payload["targets"]["sanshi"]["n"] == len(test_idx)


def test_an_old_params_file_with_test_size_gets_a_message_that_says_what_changed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  test_size: 0.25\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="split.test_size is gone.*split.holdout"):
        load_params(path)


def test_the_estimate_needs_the_model_fitted_in_this_process(demo_model_dir, demo_records):
    with pytest.raises(ModelError, match="fitted in this process"):
        estimate(load_model(demo_model_dir).model, demo_records)
