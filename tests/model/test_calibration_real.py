"""Calibration, selective prediction and conformal sets on the real data (skipped with the reason when
../shared/data is absent, mandatory in CI).

The numbers behind these checks, and the full tables, come from benchmarks/selective.py (docs/analysts.md).
"""

import numpy as np
import pytest

from sanshi_ml.artifacts import load_model
from sanshi_ml.core.model import TriageModel
from sanshi_ml.data.records import ColumnMap, load_records, split_indices, subset
from sanshi_ml.evaluation.metrics import evaluate_model
from sanshi_ml.stages.evaluate import grade
from tests.conftest import PETITION_TARGETS

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

COVERAGE_TOLERANCE = 0.02  # the bar: empirical coverage within ±2 points of the level
ECE_BAR = 0.03


@pytest.fixture(scope="module")
def fj2_metrics(fj2_csv, repo_params):
    """The official 7-class category task: 70/30, seed 0, repeated texts kept together (as benchmarks/quality.py)."""
    records = load_records(fj2_csv, ColumnMap(segmented_col="分词文本", targets={"category": "一级标签"}))
    train_idx, test_idx = split_indices(records, 0.3, 0)
    model = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(
        subset(records, train_idx), progress=lambda _m: None
    )
    return evaluate_model(model, subset(records, test_idx))["category"]


def test_fj2_category_sets_cover_the_level_on_unseen_rows(fj2_metrics, repo_params):
    conformal = fj2_metrics["conformal"]
    assert conformal["level"] == repo_params.train.conformal_level == 0.9
    assert abs(conformal["coverage"] - 0.9) <= COVERAGE_TOLERANCE, conformal
    assert fj2_metrics["n"] > 2000 and conformal["n_calibration"] > 1000


def test_fj2_category_is_calibrated_and_reaches_80_percent_coverage_at_98_percent_accuracy(fj2_metrics):
    assert fj2_metrics["ece"] <= ECE_BAR < fj2_metrics["ece_uncalibrated"]
    assert fj2_metrics["coverage_at_accuracy"]["0.98"] >= 0.80
    assert fj2_metrics["accuracy_at_coverage"]["0.8"] >= 0.98


@pytest.fixture(scope="module")
def petitions_metrics(petitions_model_dir, petitions_csv):
    """The session's petitions model, trained on every row, graded on its training data as `sanshi-ml evaluate`
    grades it: each row by its out-of-fold outcome."""
    loaded = load_model(petitions_model_dir)
    records = load_records(petitions_csv, ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS))
    graded = grade(records, loaded)
    assert graded.source == "out_of_fold"
    return evaluate_model(
        loaded.model, graded.records, predictions=graded.predictions, uncalibrated=graded.uncalibrated
    )


@pytest.mark.parametrize("target", list(PETITION_TARGETS))
def test_petitions_sets_cover_the_level_for_every_target(petitions_metrics, target):
    conformal = petitions_metrics[target]["conformal"]
    assert abs(conformal["coverage"] - conformal["level"]) <= COVERAGE_TOLERANCE, conformal
    # the sets say something: on average fewer labels than the target has, and many hold exactly one
    assert conformal["mean_set_size"] < 3 and conformal["single_label_share"] > 0.2


@pytest.mark.parametrize("target", list(PETITION_TARGETS))
def test_petitions_calibration_cuts_the_error_at_least_fivefold(petitions_metrics, target):
    m = petitions_metrics[target]
    assert m["ece"] * 5 <= m["ece_uncalibrated"]
    # The 0.03 bar holds for 三事 on every split measured; category and appeal sit at 0.02-0.03 and unit at ~0.04
    # (25 handling units, accuracy ~0.70): the gap is documented in docs/analysts.md, not asserted away.
    if target == "sanshi":
        assert m["ece"] <= ECE_BAR


def test_temperature_never_changes_the_predicted_label(petitions_model_dir, petitions_csv):
    loaded = load_model(petitions_model_dir)
    records = load_records(petitions_csv, ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS))
    X = loaded.model.record_features(subset(records, np.arange(0, len(records), 7)))
    for name, pred in loaded.model.predict_features(X).items():
        head = loaded.model.heads[name]
        assert head.temperature != 1.0
        assert np.array_equal(pred.proba.argmax(axis=1), head.classifier.predict_proba(X).argmax(axis=1))
