"""The multi-target triage model: shared features, one calibrated linear classifier per target, review thresholds
chosen on out-of-fold predictions, and reason terms.

Texts are normalised and segmented once; one TF-IDF matrix feeds every target's classifier. Where records have
titles, the title's words get a second, down-weighted block of their own besides their place in the whole text.
Each classifier is a LinearSVC wrapped in ``CalibratedClassifierCV`` (one final estimator trained on all rows,
calibrated on out-of-fold decision values; see :mod:`sanshi_ml.core.calibration`), so every prediction carries a
probability for each label.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import softmax
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

from sanshi_ml.config import FeaturesConfig, TextConfig, TrainConfig
from sanshi_ml.core.calibration import (
    NEVER_ACCEPT,
    ConfidenceMap,
    ConformalSets,
    apply_temperature,
    attach_final,
    choose_threshold,
    fit_calibrators,
    fit_temperature,
    label_columns,
    out_of_fold_decisions,
)
from sanshi_ml.core.decoding import LinkedTargets
from sanshi_ml.core.features import FastTfidf, TokenCodes, build_vectorizer, feature_names, joined_text_of
from sanshi_ml.core.text import TITLE_MARK, Segmenter, mark_titles, normalize, normalize_many
from sanshi_ml.data.records import RecordSet, grouped_folds, split_title

log = logging.getLogger(__name__)

_VECTORIZER_FIELDS = ("vectorizer", "title_vectorizer")


class ModelError(ValueError):
    """Training data that cannot produce a model (too few rows or labels)."""


@dataclass
class TargetPredictions:
    """One target's predictions for a batch of texts."""

    classes: list[str]
    proba: np.ndarray
    threshold: float
    conformal: ConformalSets | None = None
    chosen: np.ndarray | None = None  # label index per row from joint decoding; None: each row's best score
    weights: np.ndarray | None = None  # the head's prior correction per label (None: the plain argmax)
    confidence_map: ConfidenceMap | None = None  # the head's top-label calibration (None: the probability itself)
    # Set when the rows were predicted by different fitted chains (the out-of-fold estimate): each row's confidence,
    # prediction set and review threshold as its own chain gave them.
    row_confidence: np.ndarray | None = None
    row_plausible: np.ndarray | None = None
    row_thresholds: np.ndarray | None = None

    @classmethod
    def gathered(
        cls,
        classes: list[str],
        proba: np.ndarray,
        index: np.ndarray,
        confidence: np.ndarray,
        thresholds: np.ndarray,
        plausible: np.ndarray | None,
        threshold: float,
        conformal: ConformalSets | None,
    ) -> TargetPredictions:
        """Predictions whose rows were made by different fitted chains, each row's outcome given as it was made;
        ``threshold`` and ``conformal`` describe the shipped head (what a report names)."""
        return cls(
            classes,
            proba,
            threshold,
            conformal,
            chosen=np.asarray(index),
            row_confidence=confidence,
            row_plausible=plausible,
            row_thresholds=thresholds,
        )

    @property
    def scores(self) -> np.ndarray:
        """What the label is chosen by: the probabilities, times the prior correction if the head has one."""
        return self.proba if self.weights is None else self.proba * self.weights

    @property
    def index(self) -> np.ndarray:
        return self.scores.argmax(axis=1) if self.chosen is None else self.chosen

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.index]

    @property
    def chosen_proba(self) -> np.ndarray:
        """The probability of the chosen label (the largest one unless a prior correction or joint decoding chose
        another)."""
        if self.chosen is None and self.weights is None:
            return self.proba.max(axis=1)
        return self.proba[np.arange(len(self.proba)), self.index]

    @property
    def confidence(self) -> np.ndarray:
        """The chance that the chosen label is right: its probability through the head's top-label calibration."""
        if self.row_confidence is not None:
            return self.row_confidence
        chosen = self.chosen_proba
        return chosen if self.confidence_map is None else self.confidence_map(chosen)

    @property
    def needs_review(self) -> np.ndarray:
        return self.confidence < (self.threshold if self.row_thresholds is None else self.row_thresholds)

    def top_k(self, row: int, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-self.proba[row])[:k]
        return [(self.classes[i], float(self.proba[row, i])) for i in order]

    @property
    def plausible(self) -> np.ndarray | None:
        """The conformal prediction sets as a rows × labels boolean matrix; None for a model without them."""
        if self.row_plausible is not None:
            return self.row_plausible
        return None if self.conformal is None else self.conformal.mask(self.proba)

    @property
    def set_size(self) -> np.ndarray | None:
        """How many labels each record's prediction set holds; None for a model without sets."""
        plausible = self.plausible
        return None if plausible is None else plausible.sum(axis=1)

    def plausible_labels(self, row: int, plausible: np.ndarray | None = None) -> list[str] | None:
        """One record's set, most probable label first (``plausible``: the matrix, if already computed)."""
        plausible = self.plausible if plausible is None else plausible
        if plausible is None:
            return None
        members = np.flatnonzero(plausible[row])
        return [self.classes[i] for i in members[np.argsort(-self.proba[row, members], kind="stable")]]

    def rows(self, index: np.ndarray) -> TargetPredictions:
        """The predictions of some rows (a boolean mask or positions)."""

        def part(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        return TargetPredictions(
            self.classes,
            self.proba[index],
            self.threshold,
            self.conformal,
            part(self.chosen),
            self.weights,
            self.confidence_map,
            part(self.row_confidence),
            part(self.row_plausible),
            part(self.row_thresholds),
        )


@dataclass
class TargetHead:
    """A fitted classifier for one target and what is known about it."""

    name: str
    classes: list[str]
    classifier: CalibratedClassifierCV
    threshold: float
    threshold_info: dict = field(default_factory=dict)
    excluded_labels: dict[str, int] = field(default_factory=dict)
    n_train: int = 0
    conformal: ConformalSets | None = None  # absent in models trained before prediction sets existed
    temperature: float = 1.0  # train.recalibrate: applied to the calibrated probabilities (1: unchanged)
    decision_weights: np.ndarray | None = None  # train.prior_correction: prior(label)^-tau; None: plain argmax
    confidence_map: ConfidenceMap | None = None  # train.confidence_calibration; None: the chosen label's probability

    def recalibrated(self, proba: np.ndarray) -> np.ndarray:
        """The classifier's calibrated probabilities after this head's temperature (see :func:`apply_temperature`)."""
        return apply_temperature(proba, self.temperature)

    def linear_weights(self) -> np.ndarray:
        """Class-by-feature weights of the final linear model (for reason terms)."""
        estimator = self.classifier.calibrated_classifiers_[0].estimator
        coef = estimator.coef_
        if coef.shape[0] == 1:  # binary: one row of weights for the positive class
            coef = np.vstack([-coef[0], coef[0]])
        return np.asarray(coef, dtype=np.float32)

    def uncalibrated_proba(self, X: sp.csr_matrix) -> np.ndarray:
        """The final LinearSVC's decision values turned into probabilities by a plain softmax (a sigmoid for two
        labels), with no calibration: the baseline the calibrated probabilities are compared with."""
        calibrated = self.classifier.calibrated_classifiers_[0]
        estimator = calibrated.estimator
        decision = estimator.decision_function(X)
        if decision.ndim == 1:  # binary: the decision value of classes_[1] against classes_[0]
            decision = np.column_stack([np.zeros_like(decision), decision])
        proba = softmax(decision, axis=1)
        out = np.zeros((X.shape[0], len(self.classes)))
        fitted = np.asarray(estimator.classes_)
        # sklearn fits the LinearSVC on the labels themselves, or (temperature scaling) on their codes.
        columns = fitted if np.issubdtype(fitted.dtype, np.integer) else np.searchsorted(calibrated.classes, fitted)
        out[:, columns] = proba
        return out


_CONFIG_FIELDS = {"text_config": TextConfig, "features_config": FeaturesConfig, "train_config": TrainConfig}


class StackedHeads:
    """Every target's decision values from one sparse-dense product, then each head's own sigmoid calibration.

    Each head's ``CalibratedClassifierCV.predict_proba`` multiplies the feature matrix by its LinearSVC's weights
    separately; the weights are hundreds of MB and the product is memory-bound, so one pass over the matrix with
    all targets' weights side by side (one row of 48 numbers per feature instead of four scattered rows) is faster.
    The weights are held in float32, the features' own dtype: scipy would otherwise copy every batch's matrix to
    float64, and the product reads half as many bytes (a 10,000-record batch: 18 → 10 µs per record). Decision
    values move by at most ~1e-5 against float64 weights. The heads' ``coef_`` become views into the stacked
    array, so the weights are held once and sklearn's own ``predict_proba`` on a head gives these probabilities
    bit for bit: each column is summed in sklearn's order, and the calibration below is sklearn's
    ``_CalibratedClassifier.predict_proba`` for the sigmoid method step for step (tests/code/test_fast_paths.py).
    Anything else (isotonic or temperature calibration, ensembles) keeps sklearn's path.
    """

    WEIGHT_DTYPE = np.float32

    def __init__(self, weights: np.ndarray, blocks: dict[str, tuple[int, int, object]]) -> None:
        self.weights = weights
        self.blocks = blocks

    @classmethod
    def build(cls, heads: dict[str, TargetHead]) -> StackedHeads | None:
        parts = {}
        for name, head in heads.items():
            classifier = head.classifier
            calibrated = getattr(classifier, "calibrated_classifiers_", None)
            if not isinstance(classifier, CalibratedClassifierCV) or not calibrated or len(calibrated) != 1:
                return None
            estimator = calibrated[0].estimator
            if calibrated[0].method != "sigmoid" or not isinstance(estimator, LinearClassifierMixin):
                return None
            parts[name] = (calibrated[0], estimator)
        shapes = {estimator.coef_.shape[1] for _, estimator in parts.values()}
        if len(shapes) != 1:
            return None
        total = sum(estimator.coef_.shape[0] for _, estimator in parts.values())
        weights = np.empty((shapes.pop(), total), dtype=cls.WEIGHT_DTYPE)
        blocks, start = {}, 0
        for name, (calibrated, estimator) in parts.items():
            end = start + estimator.coef_.shape[0]
            weights[:, start:end] = estimator.coef_.T
            estimator.coef_ = weights[:, start:end].T  # a view: the weights are held once
            blocks[name] = (start, end, calibrated)
            start = end
        return cls(weights, blocks)

    def predict_proba(self, X: sp.csr_matrix) -> dict[str, np.ndarray]:
        decisions = X @ self.weights
        out = {}
        for name, (start, end, calibrated) in self.blocks.items():
            scores = decisions[:, start:end] + calibrated.estimator.intercept_
            out[name] = _sigmoid_proba(calibrated, scores, self._platt[name])
        return out

    @property
    def _platt(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per head, read once: each decision column's output column and its Platt a_ and b_."""
        if "_platt_cache" not in self.__dict__:
            self._platt_cache = {
                name: _platt_parameters(calibrated) for name, (_start, _end, calibrated) in self.blocks.items()
            }
        return self._platt_cache


def _platt_parameters(calibrated) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.preprocessing import LabelEncoder

    if calibrated.classes.shape[0] == 2:
        positive = np.array([1])  # binary: one column of decision values, for classes_[1]
    else:
        positive = LabelEncoder().fit(calibrated.classes).transform(calibrated.estimator.classes_)
    a = np.array([c.a_ for c in calibrated.calibrators], dtype=np.float64)
    b = np.array([c.b_ for c in calibrated.calibrators], dtype=np.float64)
    return positive, a, b


def _sigmoid_proba(calibrated, predictions: np.ndarray, platt: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """sklearn's _CalibratedClassifier.predict_proba (sigmoid method) from given decision values.

    ``_SigmoidCalibration.predict`` is ``expit(-(a_ * T + b_))`` per class; applying it to every column at once
    performs the same float operations without sklearn's per-class input validation, which dominated small batches.
    """
    from scipy.special import expit

    n_classes = calibrated.classes.shape[0]
    positive, a, b = platt
    proba = np.zeros((predictions.shape[0], n_classes))
    proba[:, positive] = expit(-(a * predictions[:, : len(a)] + b))
    if n_classes == 2:
        proba[:, 0] = 1.0 - proba[:, 1]
    else:
        denominator = np.sum(proba, axis=1)[:, np.newaxis]
        uniform = np.full_like(proba, 1 / n_classes)
        proba = np.divide(proba, denominator, out=uniform, where=denominator != 0)
    proba[(1.0 < proba) & (proba <= 1.0 + 1e-5)] = 1.0
    # CalibratedClassifierCV averages its calibrated classifiers: with one, a sum from zero divided by one.
    mean = np.zeros_like(proba)
    mean += proba
    mean /= 1
    return mean


class _PackedStrings:
    """Strings (or a str → int mapping) stored as one joined string plus an int array, for fast unpickling."""

    SEPARATOR = "\x00"  # never inside a token: the segmenters split it off and the filter drops it

    def __init__(self, joined: str, count: int, values: np.ndarray | None) -> None:
        self.joined, self.count, self.values = joined, count, values

    @classmethod
    def pack(cls, strings: list[str] | dict[str, int]):
        """Packed ``strings``, or the input itself when a string holds the separator or a key is not a str."""
        if not all(isinstance(text, str) for text in strings):
            return strings
        joined = cls.SEPARATOR.join(strings)
        if joined.count(cls.SEPARATOR) != max(len(strings) - 1, 0):
            return strings
        values = (
            np.fromiter(strings.values(), dtype=np.int64, count=len(strings)) if isinstance(strings, dict) else None
        )
        return cls(joined, len(strings), values)

    @staticmethod
    def unpack(packed):
        """The list or dict that :meth:`pack` was given (anything not packed is returned as it is)."""
        if not isinstance(packed, _PackedStrings):
            return packed
        strings = packed.joined.split(packed.SEPARATOR) if packed.count else []
        return strings if packed.values is None else dict(zip(strings, packed.values.tolist()))


def _title_positions(marks: np.ndarray, separators: np.ndarray, text_of: np.ndarray) -> np.ndarray:
    """Positions of the title tokens among the tokens of marked texts cut in one call: in each text, the tokens
    before its :data:`~sanshi_ml.core.text.TITLE_MARK` (at ``marks``; a text without one has no title)."""
    text_starts = np.concatenate([[0], np.asarray(separators, dtype=np.int64) + 1])
    starts = text_starts[text_of[marks]]
    lengths = marks - starts
    offsets = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)


def _with_vocabularies(union, convert: Callable):
    """A shallow copy of a fitted feature union whose vectorisers' ``vocabulary_`` went through ``convert``."""
    if not isinstance(union, FeatureUnion):
        return union
    copied = copy.copy(union)
    copied.transformer_list = []
    for name, vectorizer in union.transformer_list:
        if hasattr(vectorizer, "vocabulary_"):
            vectorizer = copy.copy(vectorizer)
            vectorizer.vocabulary_ = convert(vectorizer.vocabulary_)
        copied.transformer_list.append((name, vectorizer))
    return copied


def prior_weights(classes: Sequence[str], y: np.ndarray, tau: float) -> np.ndarray:
    """``prior(label) ** -tau`` per class, the prior being the label's share of ``y`` (logit adjustment)."""
    labels, counts = np.unique(np.asarray(y, dtype=str), return_counts=True)
    share = dict(zip(labels.tolist(), (counts / counts.sum()).tolist()))
    prior = np.array([share.get(str(c), 1.0 / max(len(y), 1)) for c in classes])
    return prior**-tau


def choose_prior_correction(
    proba: np.ndarray, classes: Sequence[str], y_fit: np.ndarray, y_hold: np.ndarray, strengths: Sequence[float]
) -> tuple[float, float]:
    """The strength tau whose prior correction gives the best macro-F1 on held-out rows (ties: the weakest).

    Balanced class weights still leave rare classes under-predicted when their rows look like the common class
    (家事 and 共事 against 公事). Dividing each probability by the label's prior to the power tau before the argmax
    ("logit adjustment") moves the decision toward rare labels; on petitions 三事 tau 0.5 raised held-out 家事 recall
    from 0.37 to 0.56 at precision 0.64. The probabilities themselves are not changed.
    """
    from sklearn.metrics import f1_score

    classes = np.asarray(classes, dtype=object)
    best = (-1.0, 0.0)
    for tau in sorted(set(strengths)):
        predicted = classes[(proba * prior_weights(classes, y_fit, tau)).argmax(axis=1)].astype(str)
        score = f1_score(np.asarray(y_hold, dtype=str), predicted, average="macro", zero_division=0)
        if score > best[0] + 1e-9:
            best = (score, float(tau))
    return best[1], float(best[0])


def _base_classifier(cfg: TrainConfig, n_rows: int) -> LinearClassifierMixin:
    """The linear model that train.classifier names, unfitted; every one is seeded, so training is reproducible."""
    if cfg.classifier == "logistic_regression":
        return LogisticRegression(C=cfg.C, class_weight=cfg.class_weight, max_iter=2000, random_state=0)
    if cfg.classifier == "sgd_modified_huber":
        # alpha plays the part of 1 / (C * n) in the SVM objective, so one C means about the same regularisation.
        return SGDClassifier(
            loss="modified_huber",
            alpha=1.0 / (cfg.C * max(n_rows, 1)),
            class_weight=cfg.class_weight,
            max_iter=50,
            tol=1e-4,
            random_state=0,
        )
    # A fixed random_state makes training reproducible bit for bit (liblinear shuffles its coordinates).
    return LinearSVC(C=cfg.C, class_weight=cfg.class_weight, random_state=0)


def _fold_classifier(cfg: TrainConfig, n_rows: int, n_fold_rows: float) -> LinearClassifierMixin:
    """The linear model of a cross-fitting fold, trained on ``n_fold_rows`` of the ``n_rows``.

    The SVM objective weighs the sum of the rows' losses by C, so a model trained on fewer rows is regularised more
    and its decision values are smaller. The calibrators are fitted on the folds' decision values and applied to the
    final model's, so the folds get C scaled by ``n_rows / n_fold_rows``: the final model's regularisation per row.
    Measured on petitions (3 seeds): without the scaling the final model was over-confident against its calibrators
    (诉求类型 ECE up to 0.034 after every calibration step; with it, 0.021–0.029).
    """
    scaled = cfg.model_copy(update={"C": cfg.C * n_rows / max(n_fold_rows, 1.0)})
    return _base_classifier(scaled, n_rows=int(round(n_fold_rows)))


def _cross_fit_folds(groups: np.ndarray, y: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``k`` stratified folds that keep repeated texts together and leave every label in every fold's
    training rows; fewer folds when a label has fewer rows. Where the groups cannot give that (a label whose rows
    are all one repeated text), the folds are plain stratified ones."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.unique(y)
    k = int(min(k, np.unique(y, return_counts=True)[1].min()))
    try:
        folds = grouped_folds(groups, y, k, seed=0)
        if all(len(np.unique(y[train])) == len(labels) for train, _ in folds):
            return folds
    except ValueError:  # fewer groups than folds
        pass
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(np.zeros(len(y)), y))


@dataclass
class CrossFitRows:
    """What cross-fitting saw of one target, kept after ``fit`` (never pickled) for the out-of-fold estimate."""

    trained: np.ndarray  # which records the head trained on (a label it could learn)
    labels: np.ndarray  # those rows' labels, as strings
    decision: np.ndarray  # every record's decision values from a model that did not train on it


def calibrated_head(name: str, decision: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> tuple[TargetHead, np.ndarray]:
    """A head's calibration chain fitted on out-of-fold decision values of its training rows (per-label
    calibrators, temperature, prior correction, prediction sets), and those rows' probabilities after it.

    The head's classifier reads decision values until the final model is attached; its review threshold and
    confidence map come later, from :func:`fit_review`.
    """
    calibrators = fit_calibrators(decision, y, cfg.calibration)
    classes = calibrators.classes_
    proba = calibrators.predict_proba(decision)
    true_column = label_columns(classes, y)
    temperature = fit_temperature(proba, true_column) if cfg.recalibrate == "temperature" else 1.0
    proba = apply_temperature(proba, temperature)
    tau, oof_f1 = choose_prior_correction(
        proba, classes, y, y, cfg.prior_correction_by_target.get(name, cfg.prior_correction)
    )
    conformal = ConformalSets.fit(proba[np.arange(len(y)), true_column], cfg.conformal_level)
    head = TargetHead(
        name=name,
        classes=[str(c) for c in classes],
        classifier=calibrators,
        threshold=NEVER_ACCEPT,
        threshold_info={"prior_correction_tau": tau, "holdout_macro_f1": oof_f1},
        n_train=int(len(y)),
        conformal=conformal,
        temperature=temperature,
        decision_weights=prior_weights(classes, y, tau) if tau else None,
    )
    return head, proba


def link_targets(heads: dict[str, TargetHead], frame, pairs: Sequence[tuple[str, str]]) -> list[LinkedTargets]:
    """The configured target pairs that both have heads, with the label pairs seen together in ``frame``'s rows."""
    links = []
    for first, second in pairs:
        if first not in heads or second not in heads:
            continue
        both = frame[first].notna().to_numpy() & frame[second].notna().to_numpy()
        seen = set(zip(frame[first].to_numpy()[both].astype(str), frame[second].to_numpy()[both].astype(str)))
        links.append(LinkedTargets.from_pairs(first, second, heads[first].classes, heads[second].classes, seen))
    return links


def decode(
    heads: dict[str, TargetHead], links: Sequence[LinkedTargets], probas: dict[str, np.ndarray]
) -> dict[str, TargetPredictions]:
    """Each head's predictions from its (recalibrated) probabilities, linked targets decoded jointly."""
    predictions = {
        name: TargetPredictions(
            head.classes,
            probas[name],
            head.threshold,
            head.conformal,
            weights=head.decision_weights,
            confidence_map=head.confidence_map,
        )
        for name, head in heads.items()
    }
    for link in links:
        first, second = predictions[link.first], predictions[link.second]
        first.chosen, second.chosen = link.decode(first.scores, second.scores)
    return predictions


def fit_review(
    heads: dict[str, TargetHead],
    links: Sequence[LinkedTargets],
    probas: dict[str, np.ndarray],
    rows: dict[str, CrossFitRows],
    cfg: TrainConfig,
) -> None:
    """Each head's top-label calibration and review threshold, fitted on the rows it trained on (``rows[name]``),
    from their out-of-fold probabilities (``probas``, one row per record) decoded the way prediction decodes them
    (prior correction, joint decoding of linked targets)."""
    predictions = decode(heads, links, probas)
    for link in links:  # rows without both targets' labels keep their own choices
        both = rows[link.first].trained & rows[link.second].trained
        for name in (link.first, link.second):
            pred = predictions[name]
            pred.chosen = np.where(both, pred.chosen, pred.scores.argmax(axis=1))
    for name, head in heads.items():
        trained = rows[name].trained
        pred = predictions[name].rows(trained)
        correct = pred.labels == rows[name].labels
        if cfg.confidence_calibration == "isotonic":
            head.confidence_map = ConfidenceMap.fit(pred.chosen_proba, correct)
            pred.confidence_map = head.confidence_map
        goal = cfg.target_accuracy_by_target.get(name, cfg.target_accuracy)
        info = choose_threshold(pred.confidence, correct, goal)
        head.threshold = info["threshold"]
        head.threshold_info.update(info, target_accuracy=goal)


def _spread(proba: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Probabilities of some records spread over all of them; the others get the uniform distribution."""
    full = np.full((len(rows), proba.shape[1]), 1.0 / proba.shape[1])
    full[rows] = proba
    return full


class TriageModel:
    """Normalise → segment → TF-IDF → one calibrated linear classifier per target."""

    def __init__(
        self, text: TextConfig | None = None, features: FeaturesConfig | None = None, train: TrainConfig | None = None
    ) -> None:
        self.text_config = text or TextConfig()
        self.features_config = features or FeaturesConfig()
        self.train_config = train or TrainConfig()
        self.segmenter = Segmenter(self.text_config.backend, self.text_config.user_dict, self.text_config.stopwords)
        self.vectorizer = None
        self.title_vectorizer = None  # the title block's union (None: no title block)
        self.heads: dict[str, TargetHead] = {}
        self.segmented_training = False
        self.n_word_features = 0
        self.word_names: np.ndarray | None = None
        self.links: list[LinkedTargets] = []
        self._weights: dict[str, np.ndarray] = {}
        self.cross_fit_: dict[str, CrossFitRows] | None = None  # set by fit, for the out-of-fold estimate

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_weights"] = {}  # rebuilt on demand; no need to store two copies of the coefficients
        state.pop("_fast", None)  # the fast transforms are rebuilt from the vectorisers on first use
        state.pop("_fast_title", None)
        state.pop("_stacked", None)  # so are the stacked coefficients (the heads' own coef_ are views into them)
        state.pop("cross_fit_", None)  # the training rows' out-of-fold evidence belongs to the run that fitted it
        # Configs are stored as plain dicts: a pydantic model pickles its set of assigned fields, whose order varies
        # with string hashing, so the same model would get a different artifact sha256 on every run.
        for name in _CONFIG_FIELDS:
            state[name] = state[name].model_dump()
        # joblib unpickles in pure Python: the vocabularies' million short strings took two seconds of every load
        # (a scoring run's start-up). One long string per vocabulary loads in milliseconds.
        for name in _VECTORIZER_FIELDS:
            state[name] = _with_vocabularies(state.get(name), _PackedStrings.pack)
        if isinstance(state.get("word_names"), np.ndarray):
            state["word_names"] = _PackedStrings.pack(state["word_names"].tolist())
        return state

    def __setstate__(self, state: dict) -> None:
        for name, cls in _CONFIG_FIELDS.items():
            state[name] = cls.model_validate(state[name])
        state.setdefault("title_vectorizer", None)  # models trained before the title block
        for name in _VECTORIZER_FIELDS:
            state[name] = _with_vocabularies(state.get(name), _PackedStrings.unpack)
        state.setdefault("links", [])  # models trained before joint decoding
        state["cross_fit_"] = None
        if isinstance(state.get("word_names"), _PackedStrings):
            state["word_names"] = np.asarray(_PackedStrings.unpack(state["word_names"]), dtype=object)
        self.__dict__.update(state)

    # ---------------------------------------------------------------------------------------------- text and features

    @property
    def targets(self) -> list[str]:
        return list(self.heads)

    def normalize(self, text: str) -> str:
        cfg = self.text_config
        return normalize(text, to_simplified=cfg.to_simplified, pii=cfg.mask_pii, lowercase=cfg.lowercase)

    def normalize_many(self, texts: Sequence[str]) -> list[str]:
        """:meth:`normalize` for a batch (same result per text, faster)."""
        cfg = self.text_config
        return normalize_many(texts, to_simplified=cfg.to_simplified, pii=cfg.mask_pii, lowercase=cfg.lowercase)

    def tokens(self, texts: Sequence[str]) -> list[list[str]]:
        """Content words of model input strings (:func:`sanshi_ml.data.records.model_input`: title and text
        together)."""
        return self.segmenter.cut_many(self.normalize_many(texts))

    def title_tokens(self, texts: Sequence[str]) -> list[list[str]]:
        """Content words of the titles of model input strings (none for a string without a title)."""
        return self.segmenter.cut_many(self.normalize_many([split_title(text)[0] for text in texts]))

    def _segmented_tokens(self, texts: Sequence[str]) -> list[list[str]]:
        return [self.segmenter.filter(text.split()) for text in self.normalize_many(texts)]

    def record_tokens(self, records: RecordSet) -> list[list[str]]:
        """Tokens of loaded records: a pre-segmented column is split on spaces, never segmented again."""
        if records.segmented:
            return self._segmented_tokens(records.frame["segmented"].tolist())
        return self.tokens(records.model_texts)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """TF-IDF features of model input strings: the whole text's block, then the title block if the model has one."""
        self._require_fitted()
        if self.title_vectorizer is not None:
            return self._transform_with_titles(texts)
        fast = self._fast_tfidf()
        if not fast:
            return self.vectorizer.transform(self.tokens(texts))
        # The segmenter's raw tokens go straight to the fast path, which applies the filter's verdicts itself.
        normalized = self.normalize_many(texts)
        joined = self._joined_cut(normalized)
        if joined is None:
            raw = self.segmenter.raw_cut_many(normalized)
            X = fast.transform(raw, raw=True)
        else:
            tokens, codes, separators = joined
            X = fast.transform_codes(codes, joined_text_of(len(tokens), separators), len(normalized), raw=True)
            raw = Segmenter.split_joined(tokens, separators) if X is None else None
        # None: a kept token holds a space, which the fast path cannot key; sklearn's transform of the same tokens.
        return self.vectorizer.transform([self.segmenter.filter(t) for t in raw]) if X is None else X

    def _joined_cut(self, normalized: list[str]) -> tuple[list[str], TokenCodes, np.ndarray] | None:
        """All texts cut in one call (:meth:`Segmenter.raw_cut_joined`): the tokens, encoded once, and the positions
        of the separators; None when the texts cannot be told apart that way."""
        tokens = self.segmenter.raw_cut_joined(normalized)
        if tokens is None:
            return None
        codes = TokenCodes.of(tokens)
        separators = codes.positions(Segmenter.JOIN)
        return (tokens, codes, separators) if len(separators) == len(normalized) - 1 else None

    def _transform_with_titles(self, texts: Sequence[str]) -> sp.csr_matrix:
        """:meth:`transform` for a model with a title block. Each string is normalised and cut whole, with the
        title's end as a token of its own (:func:`sanshi_ml.core.text.mark_titles`), which the filter drops: the whole
        text's block is what cutting the joined title and text gives, and the tokens before the mark feed the
        title block as well."""
        normalized = self.normalize_many(mark_titles(texts))
        fast, fast_title = self._fast_tfidf(), self._fast_tfidf("title_vectorizer")
        joined = self._joined_cut(normalized) if fast and fast_title else None
        if joined is not None:
            tokens, codes, separators = joined
            doc_of = joined_text_of(len(tokens), separators)
            in_title = _title_positions(codes.positions(TITLE_MARK), separators, doc_of)
            X = fast.transform_codes(codes, doc_of, len(texts), raw=True)
            X_title = fast_title.transform_codes(codes.subset(in_title), doc_of[in_title], len(texts), raw=True)
            if X is not None and X_title is not None:
                return self._stack_title_block(X, X_title)
        if joined is None:
            raw = self.segmenter.raw_cut_many(normalized)
        else:
            raw = Segmenter.split_joined(joined[0], joined[2])
        keep = self.segmenter.filter
        titles = [keep(tokens[: tokens.index(TITLE_MARK)]) if TITLE_MARK in tokens else [] for tokens in raw]
        return self._stack_title_block(
            self.vectorizer.transform([keep(tokens) for tokens in raw]), self.title_vectorizer.transform(titles)
        )

    def _stack_title_block(self, X: sp.csr_matrix, X_title: sp.csr_matrix) -> sp.csr_matrix:
        X_title = X_title.tocsr()
        X_title.data *= X_title.dtype.type(self.features_config.title_weight)
        return sp.hstack([X, X_title], format="csr")

    def transform_tokens(self, tokens: list[list[str]]) -> sp.csr_matrix:
        """TF-IDF features of token lists: FastTfidf's array path (the same matrix), else sklearn's transform.
        The whole-text block only: a model with a title block needs :meth:`transform`."""
        fast = self._fast_tfidf()
        X = fast.transform(tokens) if fast else None
        return self.vectorizer.transform(tokens) if X is None else X

    def _fast_tfidf(self, name: str = "vectorizer") -> FastTfidf | bool:
        """The fast transform of vectoriser ``name`` with this segmenter (built once; False: union not supported)."""
        key = "_fast" if name == "vectorizer" else "_fast_title"
        fast = self.__dict__.get(key)
        if fast is None or (fast and fast.keep_owner is not self.segmenter):
            fast = FastTfidf.from_union(getattr(self, name), keep=self.segmenter.keeps) or False
            if fast:
                fast.keep_owner = self.segmenter
            self.__dict__[key] = fast
        return fast

    # ---------------------------------------------------------------------------------------------------- training

    def fit(self, records: RecordSet, progress: Callable[[str], None] | None = None) -> TriageModel:
        """Fit features on every row, then each target on the rows that carry its label."""
        say = progress or log.info
        if len(records) == 0:
            raise ModelError("no records with text to train on")
        started = time.perf_counter()
        self.segmented_training = records.segmented
        tokens = self.record_tokens(records)
        say(f"segmented {len(tokens)} texts in {time.perf_counter() - started:.1f}s")
        self.vectorizer = build_vectorizer(self.features_config)
        self.__dict__.pop("_fast", None)  # a fast transform belongs to the vectoriser it was built from
        self.__dict__.pop("_fast_title", None)
        X = self.vectorizer.fit_transform(tokens).tocsr()
        names = np.asarray(feature_names(self.vectorizer), dtype=object)
        is_word = np.char.startswith(names.astype(str), "word__")
        self.n_word_features = int(is_word.sum())  # FeatureUnion puts the word block first
        self.word_names = np.asarray([n[len("word__") :] for n in names[: self.n_word_features]], dtype=object)
        X = self._fit_title_block(records, X)
        say(
            f"{X.shape[1]} features ({self.n_word_features} word n-grams"
            f"{', a title block' if self.title_vectorizer is not None else ''})"
        )
        if records.segmented:
            # At prediction time raw text is cut by jieba; words the pre-segmented data never had (its stop words
            # among them) are dropped so word n-grams form across the same neighbours as in training.
            vocabulary = {token for row in tokens for token in row}
            self.segmenter = Segmenter(
                self.text_config.backend, self.text_config.user_dict, self.text_config.stopwords, keep_only=vocabulary
            )
        groups = records.frame["group"].to_numpy()
        cross_fit, probas = {}, {}
        for target in records.targets:
            t0 = time.perf_counter()
            self.heads[target], cross_fit[target], proba = self._fit_target(
                target, X, records.labels(target), records.has_label(target), groups
            )
            probas[target] = _spread(proba, cross_fit[target].trained)
            say(f"target {target}: {len(self.heads[target].classes)} labels, {time.perf_counter() - t0:.1f}s")
        self.links = link_targets(self.heads, records.frame, self.train_config.linked_targets)
        fit_review(self.heads, self.links, probas, cross_fit, self.train_config)
        self.cross_fit_ = cross_fit
        for name, head in self.heads.items():
            say(
                f"target {name}: review threshold {head.threshold:.3f} (out-of-fold coverage "
                f"{head.threshold_info.get('holdout_coverage', 0):.0%})"
            )
        self._weights = {}
        self.__dict__.pop("_stacked", None)
        return self

    def _fit_title_block(self, records: RecordSet, X: sp.csr_matrix) -> sp.csr_matrix:
        """Fit the title block when it is on and the records have titles; ``X`` with the block appended."""
        self.title_vectorizer = None
        if self.features_config.title_weight <= 0 or records.segmented:
            return X
        title_tokens = self.title_tokens(records.model_texts)
        if not any(title_tokens):
            return X
        self.title_vectorizer = build_vectorizer(self.features_config)
        return self._stack_title_block(X, self.title_vectorizer.fit_transform(title_tokens))

    def _fit_target(
        self, target: str, X: sp.csr_matrix, labels: np.ndarray, has_label: np.ndarray, groups: np.ndarray
    ) -> tuple[TargetHead, CrossFitRows, np.ndarray]:
        """One target's head, what cross-fitting saw of it, and its training rows' out-of-fold probabilities; the
        review threshold is chosen later, by :func:`fit_review`, once the targets can be decoded jointly."""
        cfg = self.train_config
        y = labels[has_label].astype(str)
        values, counts = np.unique(y, return_counts=True)
        too_rare = {str(v): int(c) for v, c in zip(values, counts) if c < cfg.min_label_rows}
        if too_rare:
            log.warning(
                "target %s: labels with fewer than %d rows cannot be learned and calibrated and are left out: %s",
                target,
                cfg.min_label_rows,
                too_rare,
            )
        keep = has_label.copy()
        keep[has_label] = ~np.isin(y, list(too_rare))
        y = labels[keep].astype(str)
        if len(np.unique(y)) < 2:
            raise ModelError(
                f"target '{target}' needs at least two labels with {cfg.min_label_rows}+ rows each; "
                f"got {dict(zip(values.tolist(), counts.tolist()))}"
            )
        X_t = X[keep]
        folds = _cross_fit_folds(groups[keep], y, cfg.calibration_cv)
        n_fold_rows = float(np.mean([len(train) for train, _ in folds]))
        decision = out_of_fold_decisions(_fold_classifier(cfg, len(y), n_fold_rows), X_t, y, folds, cfg.n_jobs)
        head, proba = calibrated_head(target, decision, y, cfg)
        final = attach_final(head.classifier, clone(_base_classifier(cfg, n_rows=len(y))).fit(X_t, y)).estimator
        head.excluded_labels = too_rare
        head.threshold_info["cross_fit_folds"] = len(folds)
        # Every record's decision values from a model that did not train on it: out of fold for the training rows,
        # the final model's for rows it never trained on (no label, or one too rare to learn).
        every = np.empty((X.shape[0], decision.shape[1]))
        every[keep] = decision
        if (~keep).any():
            rest = final.decision_function(X[~keep])
            every[~keep] = rest[:, None] if rest.ndim == 1 else rest
        return head, CrossFitRows(trained=keep, labels=y, decision=every), proba

    # ---------------------------------------------------------------------------------------------------- prediction

    def _require_fitted(self) -> None:
        if self.vectorizer is None or not self.heads:
            raise ModelError("the model is not fitted")

    def predict_features(self, X: sp.csr_matrix) -> dict[str, TargetPredictions]:
        """Per-target probabilities for an already vectorised batch."""
        stacked = self.__dict__.get("_stacked")
        if stacked is None:
            stacked = self._stacked = StackedHeads.build(self.heads) or False
        if stacked:
            probas = stacked.predict_proba(X)
        else:
            probas = {name: head.classifier.predict_proba(X) for name, head in self.heads.items()}
        return decode(
            self.heads, self.links, {name: head.recalibrated(probas[name]) for name, head in self.heads.items()}
        )

    def uncalibrated_proba(self, X: sp.csr_matrix) -> dict[str, np.ndarray]:
        """Per target, the probabilities before calibration (see :meth:`TargetHead.uncalibrated_proba`)."""
        self._require_fitted()
        return {name: head.uncalibrated_proba(X) for name, head in self.heads.items()}

    def record_features(self, records: RecordSet) -> sp.csr_matrix:
        """The feature matrix of loaded records, tokenised the way their format requires."""
        self._require_fitted()
        if self.title_vectorizer is not None and not records.segmented:
            return self.transform(records.model_texts)
        X = self.transform_tokens(self.record_tokens(records))
        if self.title_vectorizer is not None:  # pre-segmented records have no titles: an empty title block
            X = self._stack_title_block(X, self.title_vectorizer.transform([[]] * X.shape[0]))
        return X

    def predict_records(self, records: RecordSet) -> dict[str, TargetPredictions]:
        """Predictions for loaded records, tokenised the way their format requires."""
        return self.predict_features(self.record_features(records))

    def predict(self, texts: Sequence[str]) -> tuple[dict[str, TargetPredictions], sp.csr_matrix]:
        """Predictions for raw texts, and the feature matrix (reused for reason terms)."""
        X = self.transform(texts)
        return self.predict_features(X), X

    def reason_terms(
        self, X: sp.csr_matrix, target: str, class_index: np.ndarray, k: int | None = None
    ) -> list[list[str]]:
        """For each row, the ``k`` words or word pairs that pushed most towards the chosen label."""
        k = self.train_config.reason_terms if k is None else k
        if k == 0:
            return [[] for _ in range(X.shape[0])]
        if target not in self._weights:
            self._weights[target] = self.heads[target].linear_weights()[:, : self.n_word_features]
        weights = self._weights[target]
        X = X.tocsr()
        out = []
        for row in range(X.shape[0]):
            start, end = X.indptr[row], X.indptr[row + 1]
            cols = X.indices[start:end]
            in_words = cols < self.n_word_features
            cols = cols[in_words]
            if len(cols) == 0:
                out.append([])
                continue
            contribution = X.data[start:end][in_words] * weights[class_index[row], cols]
            best = np.argsort(-contribution)[:k]
            out.append([str(self.word_names[cols[i]]).replace(" ", "") for i in best if contribution[i] > 0])
        return out

    def describe(self) -> dict:
        """Targets, labels and thresholds, for metadata and the model-info endpoint."""
        return {
            name: {
                "labels": head.classes,
                "threshold": head.threshold,
                "threshold_info": head.threshold_info,
                "excluded_labels": head.excluded_labels,
                "n_train": head.n_train,
                "conformal": head.conformal.describe() if head.conformal is not None else None,
                "temperature": head.temperature,
                "confidence_map": head.confidence_map.describe() if head.confidence_map is not None else None,
            }
            for name, head in self.heads.items()
        }
