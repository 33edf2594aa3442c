"""Calibration: from a linear model's decision values to confidences a dispatcher can stake a decision on.

Every step is fitted on out-of-fold predictions of the training rows (cross-fitting): the rows are split into
folds that keep repeated texts together, and each fold is predicted by a model trained on the others. Those
out-of-fold predictions fit, in turn,
- the per-label Platt sigmoids (``CalibratedClassifierCV``'s calibrators) of the final model, trained on all rows;
- one temperature per target (:func:`fit_temperature`);
- the top-label map from the chosen label's probability to the chance it is right (:class:`ConfidenceMap`);
- the review threshold (:func:`choose_threshold`) and the conformal prediction sets (:class:`ConformalSets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import cross_val_predict

# A threshold above every possible probability: nothing is accepted without review.
NEVER_ACCEPT = 1.01


@dataclass
class ConformalSets:
    """Split-conformal prediction sets for one target, calibrated on rows the classifier did not see.

    The nonconformity score of a label is ``1 - p(label)`` (the LAC / "inverse probability" score). ``scores`` are
    the held-out rows' scores of their true labels (sorted); ``threshold`` is the largest of them whose crepes
    p-value (non-smoothed, ``(#{scores >= s} + 1) / (n + 1)``) is still at least ``1 - level``. A label is in a
    record's set exactly when crepes' ``ConformalClassifier.predict_set`` would put it there, that is when
    ``1 - p(label) <= threshold``: one comparison over the probability matrix, with no Python loop per record.
    The sets are marginal (one threshold for all labels); they hold the true label for ``level`` of records on
    average, not for every class separately. A set may be empty (no label is plausible enough) or hold several.
    """

    level: float
    threshold: float
    scores: np.ndarray
    n_calibration: int

    @classmethod
    def fit(cls, true_label_proba: np.ndarray, level: float) -> ConformalSets:
        """Calibrate on held-out (out-of-fold) rows' probabilities of their true labels."""
        from crepes import ConformalClassifier

        scores = np.sort(1.0 - np.asarray(true_label_proba, dtype=np.float64))
        n = len(scores)
        if n == 0 or 1.0 / (n + 1) >= 1.0 - level:
            # Too few held-out rows for this level: even the most unusual label would get a large enough p-value.
            return cls(level=float(level), threshold=float("inf"), scores=scores, n_calibration=n)
        p_values = ConformalClassifier().fit(scores).predict_p(scores, smoothing=False)
        return cls(
            level=float(level), threshold=float(scores[p_values >= 1.0 - level].max()), scores=scores, n_calibration=n
        )

    def mask(self, proba: np.ndarray) -> np.ndarray:
        """Which labels are in each record's set (rows × labels, boolean)."""
        return (1.0 - proba) <= self.threshold

    def describe(self) -> dict:
        threshold = self.threshold if np.isfinite(self.threshold) else None  # None: every label is always in the set
        return {
            "level": self.level,
            "threshold": threshold,
            "n_calibration": self.n_calibration,
            "score": "1 - p(label)",
            "sets": "marginal split conformal (crepes)",
        }


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` per row: T < 1 sharpens, T > 1 flattens, and no row's most probable label changes
    (so accuracy and macro-F1 are untouched). ``T == 1`` returns ``proba`` itself."""
    if temperature == 1.0:
        return proba
    return softmax(np.log(np.maximum(proba, np.finfo(np.float64).tiny)) / temperature, axis=1)


def label_columns(classes: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Each label's column among ``classes``, -1 for a label that is not one of them."""
    column = {label: i for i, label in enumerate(classes)}
    return np.array([column.get(label, -1) for label in labels], dtype=np.int64)


def fit_temperature(proba: np.ndarray, true_column: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of held-out rows' true labels under
    :func:`apply_temperature` (rows whose label has no column, ``-1``, are left out)."""
    from scipy.optimize import minimize_scalar

    rows = np.flatnonzero(true_column >= 0)
    if len(rows) == 0:
        return 1.0
    log_p = np.log(np.maximum(proba[rows], np.finfo(np.float64).tiny))
    picked = true_column[rows]

    def nll(log_t: float) -> float:
        return float(-log_softmax(log_p / np.exp(log_t), axis=1)[np.arange(len(rows)), picked].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> dict:
    """The lowest confidence threshold whose accepted predictions reach ``target_accuracy`` on held-out data.

    Predictions are taken in order of falling confidence; the accepted set is the longest prefix whose accuracy is
    at least the target, cut so that equal confidences are never split.
    """
    if len(confidence) == 0:
        return {
            "threshold": NEVER_ACCEPT,
            "holdout_accuracy": None,
            "holdout_coverage": 0.0,
            "n_holdout": 0,
            "reachable": False,
        }
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # Only positions where the next confidence is strictly lower are valid cut points.
    valid_cut = np.r_[conf_sorted[1:] < conf_sorted[:-1], True]
    ok = np.flatnonzero(valid_cut & (cum_acc >= target_accuracy))
    if len(ok) == 0:
        return {
            "threshold": NEVER_ACCEPT,
            "holdout_accuracy": None,
            "holdout_coverage": 0.0,
            "n_holdout": int(len(order)),
            "reachable": False,
        }
    last = ok[-1]
    return {
        "threshold": float(conf_sorted[last]),
        "holdout_accuracy": float(cum_acc[last]),
        "holdout_coverage": float((last + 1) / len(order)),
        "n_holdout": int(len(order)),
        "reachable": True,
    }


@dataclass
class ConfidenceMap:
    """Top-label calibration: the chosen label's probability mapped to the chance that the label is right.

    The per-label sigmoids and the temperature calibrate each label's probability, but the confidence a review
    rule reads is the probability of the label the model *chose*, and for many-label targets (25 handling units)
    its reliability curve bends in a way no single temperature straightens: over-confident in the middle,
    under-confident at the top. An isotonic regression of "was the chosen label right" on that probability, fitted
    on out-of-fold rows, straightens it. Its steps would tie many records at one value, so records could no longer
    be ranked by confidence and a review threshold could only fall between steps; the map is therefore the
    piecewise-linear interpolation between the steps' centres, from (0, 0) to (1, 1): strictly increasing, so it
    keeps the ranking of the probabilities. Measured on petitions (``benchmarks/selective.py``, seeds 0–2): 承办单位
    ECE 0.045 / 0.024 / 0.048 with a temperature alone, 0.022 / 0.016 / 0.027 with cross-fitting and this map.
    """

    knots: np.ndarray  # probabilities of the chosen label (increasing)
    values: np.ndarray  # the share of right answers there (increasing)
    n_calibration: int

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray) -> ConfidenceMap | None:
        """Fit on out-of-fold rows' chosen-label probabilities and whether the label was right; None without rows."""
        from sklearn.isotonic import IsotonicRegression

        if len(confidence) == 0:
            return None
        order = np.argsort(confidence, kind="stable")
        x = np.asarray(confidence, dtype=np.float64)[order]
        n = len(x)
        # n rows never make a step certain: its share of right answers is kept within [1/(n+1), n/(n+1)], so a
        # step where every row was right does not flatten the top of the map at 1.
        fitted = IsotonicRegression(y_min=1.0 / (n + 1), y_max=n / (n + 1), out_of_bounds="clip").fit_transform(
            x, np.asarray(correct, dtype=np.float64)[order]
        )
        starts = np.r_[0, np.flatnonzero(np.diff(fitted) > 0) + 1]
        centres = np.add.reduceat(x, starts) / np.diff(np.r_[starts, n])
        knots, values = np.r_[0.0, centres, 1.0], np.r_[0.0, fitted[starts], 1.0]
        knots, first = np.unique(knots, return_index=True)  # a centre at exactly 0 or 1 would repeat an end knot
        return cls(knots=knots, values=values[first], n_calibration=n)

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return np.interp(confidence, self.knots, self.values)

    def describe(self) -> dict:
        return {
            "method": "isotonic, interpolated between step centres",
            "steps": int(len(self.knots)),
            "n_calibration": self.n_calibration,
        }


class _DecisionValues(ClassifierMixin, BaseEstimator):
    """A stand-in classifier whose decision values are its input, so that ``CalibratedClassifierCV`` fits its
    calibrators on out-of-fold decision values computed elsewhere."""

    def __init__(self, classes: np.ndarray) -> None:
        self.classes = classes

    def fit(self, decision: np.ndarray, y: np.ndarray | None = None) -> _DecisionValues:
        self.classes_ = np.asarray(self.classes)
        return self

    def decision_function(self, decision: np.ndarray) -> np.ndarray:
        return decision[:, 0] if decision.shape[1] == 1 else decision  # binary: one column, as LinearSVC's

    def predict(self, decision: np.ndarray) -> np.ndarray:
        if decision.shape[1] == 1:
            return self.classes_[(decision[:, 0] > 0).astype(int)]
        return self.classes_[decision.argmax(axis=1)]


def out_of_fold_decisions(
    fold_base, X, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], n_jobs: int | None
) -> np.ndarray:
    """Each row's decision values from a clone of ``fold_base`` trained on the other folds (rows x labels; one
    column for two labels, as LinearSVC's)."""
    decision = cross_val_predict(fold_base, X, y, cv=folds, method="decision_function", n_jobs=n_jobs)
    return decision[:, None] if decision.ndim == 1 else decision


def fit_calibrators(decision: np.ndarray, y: np.ndarray, method: str) -> CalibratedClassifierCV:
    """Per-label calibrators (``method``: sigmoid, isotonic or temperature) fitted on out-of-fold decision values.

    The result's ``predict_proba`` reads decision values, until :func:`attach_final` gives it the final model.
    """
    classes = np.unique(y)
    # A frozen estimator is never refitted, so CalibratedClassifierCV's own folds only cut the rows it reads the
    # (already out-of-fold) decision values from; two folds need just two rows per label.
    calibrated = CalibratedClassifierCV(FrozenEstimator(_DecisionValues(classes).fit(decision)), method=method, cv=2)
    return calibrated.fit(decision, y)


def attach_final(calibrated: CalibratedClassifierCV, final) -> CalibratedClassifierCV:
    """From here on the calibrators read ``final``'s decision values: the model trained on every row."""
    calibrated.calibrated_classifiers_[0].estimator = final
    calibrated.estimator = final
    return calibrated


def cross_fitted_classifier(
    base, fold_base, X, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], method: str, n_jobs: int | None
) -> tuple[CalibratedClassifierCV, np.ndarray]:
    """``base`` trained on every row and calibrated (``method``) on out-of-fold decision values of ``fold_base``,
    and the rows' out-of-fold calibrated probabilities (columns in the order of the result's ``classes_``).

    This is ``CalibratedClassifierCV(base, cv=folds, ensemble=False)`` with two differences: the fold models may
    differ from the final one, and the out-of-fold probabilities come back, for the steps calibrated after the
    sigmoids. ``fold_base`` should be ``base`` regularised for its smaller training set (see
    ``model._fold_classifier``), so that the fold models' decision values, which the calibrators are fitted on,
    have the scale of the final model's. The folds should keep repeated texts together, so that no row is
    predicted by a model that saw its twin. Every label needs at least two rows.
    """
    decision = out_of_fold_decisions(fold_base, X, y, folds, n_jobs)
    calibrated = fit_calibrators(decision, y, method)
    out_of_fold = calibrated.predict_proba(decision)
    return attach_final(calibrated, clone(base).fit(X, y)), out_of_fold
