"""Selective prediction, conformal prediction sets, the temperature step and the review rule: hand-computable toy
arrays, crepes as the reference for the sets, and the demo model for the suggestion mechanics."""

import copy
import pickle

import numpy as np
import pytest
from crepes import ConformalClassifier

from sanshi_ml.artifacts import load_model
from sanshi_ml.config import ConfigError, Params, with_overrides
from sanshi_ml.core.calibration import ConformalSets, apply_temperature, fit_temperature
from sanshi_ml.core.model import TargetPredictions
from sanshi_ml.data.records import ColumnMap, load_records
from sanshi_ml.evaluation.metrics import (
    conformal_metrics,
    evaluate_model,
    selective_metrics,
    write_report,
)
from sanshi_ml.suggest import REVIEW_AMBIGUOUS, REVIEW_LOW_CONFIDENCE, Suggester
from tests.conftest import DEMO_CSV

# --------------------------------------------------------------------------------------------- selective prediction


def test_aurc_and_selective_figures_on_a_hand_computed_ranking():
    confidence = np.array([0.5, 0.9, 0.7, 0.8, 0.6])  # most confident first: 0.9 0.8 0.7 0.6 0.5
    correct = np.array([False, True, False, True, True])  # in that order: right right wrong right wrong
    m = selective_metrics(confidence, correct)
    # selective risk at coverage 1/5 … 5/5: 0, 0, 1/3, 1/4, 2/5
    assert m["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    # a perfect ranking of the same 3 right and 2 wrong: 0, 0, 0, 1/4, 2/5
    assert m["aurc_optimal"] == pytest.approx((1 / 4 + 2 / 5) / 5)
    assert m["accuracy_at_coverage"] == {"0.8": pytest.approx(3 / 4), "0.9": pytest.approx(3 / 5)}
    # only the first two reach 95% (or 98%): 2 of 5
    assert m["coverage_at_accuracy"] == {"0.95": pytest.approx(0.4), "0.98": pytest.approx(0.4)}


def test_selective_figures_do_not_depend_on_the_order_of_tied_confidences():
    confidence = np.array([0.9, 0.9, 0.5])
    a = selective_metrics(confidence, np.array([False, True, True]))
    b = selective_metrics(confidence, np.array([True, False, True]))
    assert a == b
    # tied rows count at their mean correctness (1/2 each): risk 1/2, 1/2, 1/3
    assert a["aurc"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    # the tie cannot be split, so no prefix reaches 95%
    assert a["coverage_at_accuracy"]["0.95"] == 0.0


def test_coverage_at_accuracy_is_full_when_everything_is_right():
    m = selective_metrics(np.array([0.6, 0.7, 0.8]), np.array([True, True, True]))
    assert m["aurc"] == 0 and m["coverage_at_accuracy"]["0.98"] == 1.0 and m["accuracy_at_coverage"]["0.9"] == 1.0


# ------------------------------------------------------------------------------------------------- conformal sets


def test_conformal_threshold_by_hand():
    true_proba = np.linspace(0.05, 0.95, 19)  # 19 held-out rows; scores 1 - p: 0.05 … 0.95
    # level 0.8: p-value (#{scores >= s} + 1) / 20 >= 0.2 needs 3 scores at or above s: the 3rd largest, 0.85
    assert ConformalSets.fit(true_proba, 0.8).threshold == pytest.approx(0.85)
    # level 0.9: one score at or above s is enough: the largest
    assert ConformalSets.fit(true_proba, 0.9).threshold == pytest.approx(0.95)
    # 9 rows cannot support 90%: every label is always in the set
    sets = ConformalSets.fit(true_proba[:9], 0.9)
    assert sets.threshold == np.inf and sets.mask(np.array([[1.0, 0.0]])).all()


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_sets_equal_crepes_predict_set(level):
    rng = np.random.default_rng(int(level * 100))
    cal = rng.dirichlet(np.full(6, 0.4), size=400)
    y_cal = np.array([rng.choice(6, p=p) for p in cal])
    sets = ConformalSets.fit(cal[np.arange(400), y_cal], level)
    test = rng.dirichlet(np.full(6, 0.4), size=300)
    crepes = (
        ConformalClassifier()
        .fit(1 - cal[np.arange(400), y_cal])
        .predict_set(1 - test, confidence=level, smoothing=False)
    )
    assert np.array_equal(sets.mask(test), crepes.astype(bool))


def test_conformal_metrics_by_hand():
    pred = TargetPredictions(
        ["a", "b", "c"],
        np.array(
            [
                [0.7, 0.2, 0.1],  # set {a}: holds the true a
                [0.45, 0.45, 0.1],  # set {a, b}: holds the true b
                [0.3, 0.3, 0.4],  # set {}: misses c
                [0.1, 0.85, 0.05],
            ]
        ),  # set {b}: misses the true a
        threshold=0.5,
        conformal=ConformalSets(0.9, 0.55, np.array([]), 0),
    )
    assert pred.plausible_labels(1) == ["a", "b"] and pred.plausible_labels(2) == []
    m = conformal_metrics(np.array(["a", "b", "c", "a"]), pred)
    assert m["coverage"] == 0.5 and m["mean_set_size"] == 1.0 and m["single_label_share"] == 0.5
    assert m["empty_share"] == 0.25 and m["accuracy_when_single"] == 0.5


# ------------------------------------------------------------------------------------------------------ temperature


def test_temperature_keeps_the_label_and_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(5000, 5))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(5, p=p) for p in truth])
    overconfident = apply_temperature(truth, 0.5)  # as if logits were doubled
    assert np.array_equal(overconfident.argmax(axis=1), truth.argmax(axis=1))
    assert np.allclose(overconfident.sum(axis=1), 1)
    assert fit_temperature(overconfident, y) == pytest.approx(2.0, rel=0.1)
    assert apply_temperature(truth, 1.0) is truth


# ----------------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"policy.review_rule": "sets"}, "policy.review_rule"),
        ({"train.conformal_level": 1.0}, "train.conformal_level"),
        ({"train.calibration": "isotonic"}, "recalibrate 'temperature' cannot follow calibration 'isotonic'"),
    ],
)
def test_bad_set_and_review_parameters_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        with_overrides(Params(), overrides)


def test_settings_written_before_recalibrate_existed_still_load():
    from sanshi_ml.config import TrainConfig

    assert TrainConfig.model_validate({"calibration": "isotonic"}).recalibrate == "none"
    assert TrainConfig.model_validate({"calibration": "sigmoid"}).recalibrate == "temperature"
    # before cross-fitting, a share of the rows was held out for the thresholds
    assert "threshold_holdout" not in TrainConfig.model_validate({"threshold_holdout": 0.2}).model_dump()


# ------------------------------------------------------------------------------------- the demo model and suggestions

TEXTS = [
    "小区电梯坏了物业不修",
    "楼上漏水到我家",
    "举报有人非法集资",
    "咨询社保转移手续",
    "邻居装修噪音大",
    "A3区青青家园小区公共通道被占用",
    "路灯不亮",
    "孩子入学的政策是什么",
]


@pytest.fixture(scope="module")
def loaded(demo_model_dir):
    return load_model(demo_model_dir)


def test_demo_model_has_sets_at_the_configured_level(loaded, repo_params):
    for head in loaded.model.heads.values():
        assert head.conformal is not None and head.conformal.level == repo_params.train.conformal_level
        assert head.conformal.n_calibration > 0
    described = loaded.model.describe()["sanshi"]["conformal"]
    assert described["level"] == repo_params.train.conformal_level


@pytest.mark.parametrize("rule", ["set", "both"])
def test_review_follows_the_prediction_set_when_configured(loaded, rule):
    suggester = Suggester(loaded.model, Suggester.from_loaded(loaded).policy, review_rule=rule)
    batch, _ = suggester.predict(TEXTS)
    suggestions = suggester.suggest([(None, t) for t in TEXTS])
    frame = suggester.score_frame(TEXTS)
    seen_ambiguous = False
    for target in suggester.targets:
        pred = batch.predictions[target]
        ambiguous = (pred.set_size != 1) | ~pred.plausible[np.arange(len(TEXTS)), pred.index]
        seen_ambiguous |= bool(ambiguous.any())
        expected = ambiguous | (pred.needs_review if rule == "both" else False)
        if target in batch.policy_targets:
            expected = expected | batch.policy_conflict
        assert np.array_equal(batch.needs_review(target), expected)
        assert np.array_equal(frame[f"{target}_needs_review"].to_numpy(), expected)
        for row, suggestion in enumerate(suggestions):
            field = suggestion["fields"][target]
            assert field["plausible"] == pred.plausible_labels(row)
            assert len(field["plausible"]) == pred.set_size[row]
            assert (REVIEW_AMBIGUOUS in field["review_reasons"]) == bool(ambiguous[row])
            assert (REVIEW_LOW_CONFIDENCE in field["review_reasons"]) == (rule == "both" and pred.needs_review[row])
            assert field["needs_review"] == bool(expected[row])
    assert seen_ambiguous  # the texts include some where several labels (or none) are plausible


def test_the_rule_recorded_with_the_model_is_used(loaded):
    metadata = {**loaded.metadata, "policy": {**loaded.metadata.get("policy", {}), "review_rule": "set"}}
    assert Suggester(loaded.model, Suggester.from_loaded(loaded).policy, metadata=metadata).review_rule == "set"
    assert Suggester.from_loaded(loaded).review_rule == "threshold"  # params.yaml's default


def test_a_model_pickled_before_sets_and_temperature_still_predicts(loaded):
    old = copy.deepcopy(loaded.model)
    for head in old.heads.values():  # what an older pickle lacks
        del head.__dict__["conformal"], head.__dict__["temperature"]
    old.__dict__.pop("_stacked", None)
    old = pickle.loads(pickle.dumps(old))
    predictions, _ = old.predict(TEXTS)
    for pred in predictions.values():
        assert pred.conformal is None and pred.plausible is None and np.allclose(pred.proba.sum(axis=1), 1)
    suggester = Suggester(old, Suggester.from_loaded(loaded).policy, review_rule="set")  # falls back to threshold
    batch, _ = suggester.predict(TEXTS)
    for target, pred in batch.predictions.items():
        expected = pred.needs_review | batch.policy_conflict if target in batch.policy_targets else pred.needs_review
        assert np.array_equal(batch.needs_review(target), expected)
    for suggestion in suggester.suggest([(None, t) for t in TEXTS]):
        for field in suggestion["fields"].values():
            assert field["plausible"] is None
            low = field["confidence"] < field["threshold"]
            assert (REVIEW_LOW_CONFIDENCE in field["review_reasons"]) == low
    records = load_records(DEMO_CSV, ColumnMap.from_config(Params().data.columns))
    metrics = evaluate_model(old, records)
    assert metrics["sanshi"]["conformal"] is None and metrics["sanshi"]["aurc"] is not None


def test_report_has_selective_and_set_figures_and_a_before_after_reliability_plot(loaded, tmp_path):
    records = load_records(DEMO_CSV, ColumnMap.from_config(Params().data.columns))
    predictions = loaded.model.predict_records(records)
    metrics = evaluate_model(loaded.model, records, predictions=predictions)
    for m in metrics.values():
        assert 0 <= m["aurc_optimal"] <= m["aurc"] <= 1
        assert set(m["accuracy_at_coverage"]) == {"0.8", "0.9"} and set(m["coverage_at_accuracy"]) == {"0.95", "0.98"}
        assert m["conformal"]["level"] == 0.9 and m["conformal"]["mean_set_size"] >= 0
        # softmax of raw LinearSVC scores is far from calibrated; the calibrated probabilities are much closer
        assert m["ece"] < m["ece_uncalibrated"]
        assert sum(r["count"] for r in m["reliability_uncalibrated"]) == m["n"]
    write_report(metrics, records, predictions, tmp_path)
    assert (tmp_path / "unit_reliability.png").stat().st_size > 10_000
