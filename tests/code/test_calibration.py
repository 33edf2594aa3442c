"""Cross-fitting and the top-label confidence map: sklearn as the reference where it computes the same thing,
known miscalibrations where it does not."""

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import make_classification
from sklearn.linear_model import SGDClassifier
from sklearn.svm import LinearSVC

from sanshi_ml.config import TrainConfig
from sanshi_ml.core.calibration import ConfidenceMap, cross_fitted_classifier
from sanshi_ml.core.model import _cross_fit_folds, _fold_classifier
from sanshi_ml.evaluation.metrics import expected_calibration_error

# ------------------------------------------------------------------------------------------------- cross-fitting


@pytest.mark.parametrize("n_classes", [2, 4])
def test_cross_fitting_equals_sklearns_calibrated_classifier_with_the_same_folds(n_classes):
    X, y = make_classification(600, 20, n_informative=8, n_classes=n_classes, random_state=0)
    y = np.array(["abcd"[i] for i in y])
    X_new = X[:50] + 0.1
    folds = _cross_fit_folds(np.arange(len(y)), y, 5)
    base = LinearSVC(C=0.5, random_state=0)
    ours, out_of_fold = cross_fitted_classifier(base, base, X, y, folds, method="sigmoid", n_jobs=1)
    reference = CalibratedClassifierCV(base, cv=folds, ensemble=False, method="sigmoid").fit(X, y)
    assert np.allclose(ours.predict_proba(X_new), reference.predict_proba(X_new))
    assert np.array_equal(ours.classes_, reference.classes_)
    # the final model is trained on every row; the out-of-fold probabilities are each row's from a model without it
    full = LinearSVC(C=0.5, random_state=0).fit(X, y)
    assert np.array_equal(ours.calibrated_classifiers_[0].estimator.coef_, full.coef_)
    assert out_of_fold.shape == (len(y), n_classes) and np.allclose(out_of_fold.sum(axis=1), 1)
    train, held = folds[0]
    fold_model = LinearSVC(C=0.5, random_state=0).fit(X[train], y[train])
    reference.calibrated_classifiers_[0].estimator = fold_model  # the same calibrators on the fold model's values
    assert np.allclose(out_of_fold[held], reference.predict_proba(X[held]))


def test_folds_keep_repeated_texts_together_and_every_label_in_every_training_part():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(150), 2)  # each text twice
    y = np.repeat(rng.choice(["公事", "共事", "家事"], 150, p=[0.7, 0.2, 0.1]), 2)
    folds = _cross_fit_folds(groups, y, 5)
    assert len(folds) == 5
    for train, held in folds:
        assert not set(groups[train]) & set(groups[held])
        assert set(y[train]) == set(y)
    assert np.array_equal(np.sort(np.concatenate([held for _, held in folds])), np.arange(len(y)))


def test_folds_fall_back_to_plain_stratified_ones_when_a_label_is_one_repeated_text():
    y = np.array(["a"] * 20 + ["b"] * 20 + ["c"] * 3)
    groups = np.r_[np.arange(40), [99, 99, 99]]  # every "c" is the same text
    folds = _cross_fit_folds(groups, y, 5)
    assert len(folds) == 3  # no more folds than the rarest label has rows
    assert all(set(y[train]) == {"a", "b", "c"} for train, _ in folds)


def test_fold_models_get_the_final_models_regularisation_per_row():
    svc = _fold_classifier(TrainConfig(C=0.7), n_rows=1000, n_fold_rows=800.0)
    assert isinstance(svc, LinearSVC) and svc.C == pytest.approx(0.7 * 1000 / 800)
    sgd_cfg = TrainConfig(C=0.7, classifier="sgd_modified_huber")
    sgd = _fold_classifier(sgd_cfg, n_rows=1000, n_fold_rows=800.0)
    # SGD's alpha is already per row: the fold's equals the final model's
    from sanshi_ml.core.model import _base_classifier

    final = _base_classifier(sgd_cfg, n_rows=1000)
    assert isinstance(sgd, SGDClassifier) and sgd.alpha == pytest.approx(final.alpha)


# ------------------------------------------------------------------------------------------------ confidence map


def _bent(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences whose true chance of being right is bent: over-confident in the middle, under at the top."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.2, 1.0, n)
    chance = np.clip(0.2 + (confidence - 0.2) ** 1.8 / 0.8**0.8, 0, 1)
    return confidence, rng.uniform(size=n) < chance


def test_the_map_straightens_a_curve_no_temperature_can_and_keeps_the_ranking():
    confidence, correct = _bent(6000, seed=0)
    mapping = ConfidenceMap.fit(confidence, correct)
    test_conf, test_correct = _bent(6000, seed=1)
    before = expected_calibration_error(test_conf, test_correct)
    after = expected_calibration_error(mapping(test_conf), test_correct)
    assert before > 0.05 and after < 0.02
    grid = np.linspace(0.0, 1.0, 2001)
    assert np.all(np.diff(mapping(grid)) > 0)  # strictly increasing: the ranking and the thresholds survive
    assert mapping(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]
    assert mapping.describe()["n_calibration"] == 6000


def test_a_step_where_every_row_was_right_does_not_flatten_the_top():
    confidence = np.linspace(0.5, 0.99, 200)
    mapping = ConfidenceMap.fit(confidence, np.ones(200, dtype=bool))
    values = mapping(np.array([0.6, 0.9, 0.99]))
    assert np.all(np.diff(values) > 0) and values.max() < 1.0


def test_no_rows_no_map():
    assert ConfidenceMap.fit(np.array([]), np.array([], dtype=bool)) is None
