"""Model mechanics: calibrated probabilities, review thresholds, reason terms, suggestions with the policy."""

import numpy as np
import pytest

from sanshi_ml.artifacts import load_model
from sanshi_ml.core.calibration import NEVER_ACCEPT, choose_threshold
from sanshi_ml.evaluation.metrics import expected_calibration_error
from sanshi_ml.suggest import Suggester, text_status


def test_threshold_is_the_lowest_that_keeps_accepted_accuracy():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    info = choose_threshold(confidence, correct, 0.75)
    assert info["threshold"] == 0.7 and info["holdout_accuracy"] == 0.8 and info["holdout_coverage"] == 5 / 6
    assert choose_threshold(confidence, correct, 1.0)["threshold"] == 0.9


def test_threshold_never_splits_equal_confidences():
    info = choose_threshold(np.array([0.9, 0.8, 0.8]), np.array([True, True, False]), 0.9)
    assert info["threshold"] == 0.9


def test_unreachable_accuracy_means_everything_is_reviewed():
    info = choose_threshold(np.array([0.9, 0.8]), np.array([False, False]), 0.95)
    assert info["threshold"] == NEVER_ACCEPT and not info["reachable"]


def test_ece_of_perfect_and_overconfident_predictions():
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0
    assert expected_calibration_error(np.array([0.9] * 10), np.array([True] * 5 + [False] * 5)) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def loaded(demo_model_dir):
    return load_model(demo_model_dir)


def test_probabilities_are_a_distribution_and_review_follows_the_threshold(loaded):
    predictions, _ = loaded.model.predict(["小区电梯坏了物业不修", "邻居装修噪音大", "咨询社保转移手续"])
    for pred in predictions.values():
        assert np.allclose(pred.proba.sum(axis=1), 1.0)
        assert (pred.needs_review == (pred.confidence < pred.threshold)).all()


def test_reason_terms_come_from_the_text(loaded):
    text = "青青家园小区电梯坏了一个月，物业公司一直不修"
    predictions, X = loaded.model.predict([text])
    reasons = loaded.model.reason_terms(X, "sanshi", predictions["sanshi"].index)[0]
    assert reasons and all(term in text for term in reasons)


def test_suggestion_carries_policy_fields_and_flags_conflicts(loaded):
    suggester = Suggester.from_loaded(loaded)
    [suggestion] = suggester.suggest([("电梯", "小区电梯坏了物业不修")], top_k=2)
    sanshi = suggestion["fields"]["sanshi"]
    assert sanshi["sanshi"]["colour"] in {"red", "orange", "yellow"} and sanshi["sanshi"]["time_limit_days"] > 0
    assert len(sanshi["top_k"]) == 2 and sanshi["top_k"][0]["label"] == sanshi["label"]
    assert suggestion["model_version"] == loaded.version
    batch, _ = suggester.predict(["小区电梯坏了物业不修"])
    expected = suggester.policy.contradicts(batch.predictions["sanshi"].labels[0], batch.predictions["unit"].labels[0])
    assert suggestion["policy_conflict"] == expected
    if expected:
        assert "policy_conflict" in sanshi["review_reasons"]


def test_score_frame_agrees_with_suggest(loaded):
    suggester = Suggester.from_loaded(loaded)
    texts = ["小区电梯坏了物业不修", "楼上漏水到我家", "举报有人非法集资"]
    frame = suggester.score_frame(texts)
    for row, suggestion in zip(frame.itertuples(), suggester.suggest([(None, t) for t in texts])):
        for target, field in suggestion["fields"].items():
            assert getattr(row, target) == field["label"]
            assert getattr(row, f"{target}_confidence") == pytest.approx(field["confidence"], abs=1e-6)
            assert getattr(row, f"{target}_needs_review") == field["needs_review"]


@pytest.mark.parametrize(
    "value, status",
    [
        ("正常文本", "ok"),
        ("", "empty_text"),
        ("  \n", "empty_text"),
        (None, "empty_text"),
        (float("nan"), "empty_text"),
        (12345, "not_text"),
        ("字" * 101, "too_long"),
        ("坏\ufffd码", "undecodable"),
    ],
)
def test_text_status(value, status):
    assert text_status(value, max_chars=100) == status


def test_title_block_only_where_it_is_on_and_the_records_have_titles(repo_params):
    import pandas as pd

    from sanshi_ml.core.model import TriageModel
    from sanshi_ml.data.records import ColumnMap, to_records
    from tests.conftest import DEMO_CSV

    frame = pd.read_csv(DEMO_CSV, dtype=str)
    titled = to_records(frame, ColumnMap(text_cols=("标题", "诉求内容"), targets={"sanshi": "三事"}), "demo")
    frame["分词"] = frame["诉求内容"].str.replace("，", " ")
    segmented = to_records(frame, ColumnMap(segmented_col="分词", targets={"sanshi": "三事"}), "demo")
    quiet = {"progress": lambda _m: None}

    def fit(records, weight):
        features = repo_params.features.model_copy(update={"title_weight": weight})
        return TriageModel(repo_params.text, features, repo_params.train).fit(records, **quiet)

    with_titles = fit(titled, 0.5)
    n_text = len(with_titles.vectorizer.get_feature_names_out())
    n_title = len(with_titles.title_vectorizer.get_feature_names_out())
    assert with_titles.record_features(titled).shape[1] == n_text + n_title
    # pre-segmented records have no titles: their features carry an empty title block
    X = with_titles.record_features(segmented)
    assert X.shape[1] == n_text + n_title and X[:, n_text:].nnz == 0
    assert fit(titled, 0.0).title_vectorizer is None
    assert fit(segmented, 0.5).title_vectorizer is None
