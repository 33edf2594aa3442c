"""The out-of-fold estimate: how the model ``train`` saves, fitted on every labelled row, does on records it has not
seen, measured without setting any row aside.

Cross-fitting already predicts every training row with a linear model that did not train on it (5 folds that keep
repeated texts together). The steps after the linear models (per-label calibrators, temperature, prior correction,
joint decoding, confidence map, review threshold, prediction sets) are fitted on those same predictions, though, so
metrics read straight off them would grade each step on the rows it was fitted to: the review threshold would meet
its accuracy goal and the prediction sets their level by construction. The estimate therefore cross-fits the chain
too. The records are split into folds (repeated texts together); for each fold the whole chain is fitted on the
other folds' out-of-fold decision values, exactly as ``fit`` fits it on all of them, and applied to this fold. Every
row's suggestion, confidence, review flag and prediction set then comes from a model and a chain that never saw it.

The estimate describes a model trained on four fifths of the rows; the saved model trained on all of them, so the
figures are, if anything, slightly pessimistic. ``benchmarks/quality.py`` measures how far they sit from a true
untouched split.

``train`` writes the estimate's per-row outcomes to the model directory (:func:`write_outcomes`), keyed by each row's
content, so that ``evaluate`` on the training data (or on any export that shares rows with it) grades the training
rows by their out-of-fold outcomes instead of by the saved model, which has seen them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.special import softmax

from sanshi_ml.core.calibration import NEVER_ACCEPT, ConformalSets, label_columns
from sanshi_ml.core.model import (
    CrossFitRows,
    ModelError,
    TargetHead,
    TargetPredictions,
    TriageModel,
    calibrated_head,
    decode,
    fit_review,
    link_targets,
)
from sanshi_ml.data.outputs import atomic_write_bytes
from sanshi_ml.data.records import RecordSet, grouped_folds

log = logging.getLogger(__name__)

ESTIMATE_FILE = "out_of_fold.parquet"
HOLDOUT_FILE = "holdout.parquet"
KEY_COLUMN = "row_key"
_SEP = "\x1f"  # joins a prediction set's labels in the outcomes file; never inside a label read from a CSV cell


# Where figures come from: the "source" of metrics.json, the metadata and the MLflow run.
OUT_OF_FOLD = "out_of_fold"
HOLDOUT = "holdout"
UNSEEN = "unseen_rows"
MIXED = "out_of_fold_and_unseen_rows"
HELD_OUT_SPLIT = "held_out_split"  # models saved before the shipped model trained on every row


def describe_estimate(folds: int, n_rows: int) -> str:
    return (
        f"out-of-fold estimate: each of the {n_rows} training rows predicted by models and a calibration chain "
        f"fitted without it ({folds} folds, repeated texts kept together); it measures the saved model, "
        "trained on all of them"
    )


@dataclass
class Estimate:
    """Every record's predictions from models and calibration chains that did not see it."""

    predictions: dict[str, TargetPredictions]
    uncalibrated: dict[str, TargetPredictions]  # the same rows before any calibration (softmax of decision values)
    folds: int


def estimate(model: TriageModel, records: RecordSet) -> Estimate:
    """The out-of-fold estimate of ``model`` on the records it was just fitted on (see the module's docstring)."""
    cross_fit = model.cross_fit_
    if cross_fit is None:
        raise ModelError(
            "the out-of-fold estimate needs the model fitted in this process (a loaded model has no "
            "cross-fitting evidence); measure a saved model with `sanshi-ml evaluate`"
        )
    n = len(records)
    if any(rows.decision.shape[0] != n for rows in cross_fit.values()):
        raise ModelError("the out-of-fold estimate needs the records the model was fitted on")
    cfg = model.train_config
    folds = evaluation_folds(records, cfg.calibration_cv)
    gathered = {name: _Gathered.empty(n, len(head.classes)) for name, head in model.heads.items()}
    labels = {name: records.labels(name) for name in model.heads}
    for fit_rows, test_rows in folds:
        in_fit = np.zeros(n, dtype=bool)
        in_fit[fit_rows] = True
        heads, probas, rows = {}, {}, {}
        for name, shipped in model.heads.items():
            trained = cross_fit[name].trained & in_fit
            heads[name], probas[name] = _fold_chain(name, shipped, cross_fit[name], trained, labels[name], cfg)
            rows[name] = CrossFitRows(
                trained=trained, labels=labels[name][trained].astype(str), decision=cross_fit[name].decision
            )
        links = link_targets(heads, records.frame.iloc[fit_rows], cfg.linked_targets)
        fit_review(heads, links, probas, rows, cfg)
        predictions = decode(heads, links, {name: proba[test_rows] for name, proba in probas.items()})
        for name, pred in predictions.items():
            gathered[name].put(test_rows, pred, probas[name][test_rows], heads[name].threshold)
    out = {name: gathered[name].predictions(model.heads[name]) for name in model.heads}
    before = {
        name: TargetPredictions(head.classes, _softmax_decisions(cross_fit[name].decision), head.threshold)
        for name, head in model.heads.items()
    }
    return Estimate(out, before, len(folds))


def evaluation_folds(records: RecordSet, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``k`` folds over every record, stratified on the first target, repeated texts in one fold."""
    from sklearn.model_selection import GroupKFold

    groups = records.frame["group"].to_numpy()
    k = int(min(k, len(np.unique(groups))))
    if k < 2:
        raise ModelError("the out-of-fold estimate needs at least two distinct texts")
    labels = records.frame[records.targets[0]].fillna("<missing>").astype(str).to_numpy(dtype=object)
    try:
        return grouped_folds(groups, labels, k, seed=0)
    except ValueError:  # a label too rare to stratify on: the folds still keep repeated texts together
        return list(GroupKFold(n_splits=k).split(np.zeros(len(groups)), groups=groups))


def _fold_chain(
    name: str, shipped: TargetHead, cross_fit: CrossFitRows, trained: np.ndarray, labels: np.ndarray, cfg
) -> tuple[TargetHead, np.ndarray]:
    """One target's calibration chain fitted on the out-of-fold decision values of ``trained`` rows, and every
    record's probabilities through it, over the shipped head's labels (a label the fold's rows cannot calibrate,
    having fewer than two of them, gets probability 0, as a label unknown to a model trained without those rows)."""
    classes = shipped.classes
    y = labels[trained].astype(str)
    values, counts = np.unique(y, return_counts=True)
    known = values[counts >= 2]
    if len(known) < 2:
        raise ModelError(
            f"target '{name}': a fold of the out-of-fold estimate holds fewer than two labels with two "
            "rows each; the data is too small for the estimate"
        )
    rows = trained & np.isin(labels.astype(str), known)
    columns = label_columns(classes, known)
    decision = _decision_columns(cross_fit.decision, columns)
    head, _ = calibrated_head(name, decision[rows], labels[rows].astype(str), cfg)
    proba = np.zeros((len(labels), len(classes)))
    proba[:, columns] = head.recalibrated(head.classifier.predict_proba(decision))
    weights = None
    if head.decision_weights is not None:
        weights = np.ones(len(classes))
        weights[columns] = head.decision_weights
    fold_head = TargetHead(
        name=name,
        classes=classes,
        classifier=None,
        threshold=NEVER_ACCEPT,
        threshold_info=dict(head.threshold_info),
        n_train=head.n_train,
        conformal=head.conformal,
        decision_weights=weights,
    )
    return fold_head, proba


def _decision_columns(decision: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The decision values of some labels, shaped as a linear model trained on only those labels would give them."""
    if decision.shape[1] == 1:  # two labels in all: one column already
        return decision
    picked = decision[:, columns]
    if len(columns) == 2:  # two labels: one column, the second label's value against the first's
        return (picked[:, 1] - picked[:, 0])[:, None]
    return picked


def _softmax_decisions(decision: np.ndarray) -> np.ndarray:
    """Decision values as probabilities with no calibration: a softmax (a sigmoid for two labels)."""
    if decision.shape[1] == 1:
        decision = np.column_stack([np.zeros(len(decision)), decision[:, 0]])
    return softmax(decision, axis=1)


@dataclass
class _Gathered:
    """Per-row outcomes collected fold by fold."""

    proba: np.ndarray
    index: np.ndarray
    confidence: np.ndarray
    thresholds: np.ndarray
    plausible: np.ndarray | None

    @classmethod
    def empty(cls, n: int, n_classes: int) -> _Gathered:
        return cls(
            np.zeros((n, n_classes)),
            np.zeros(n, dtype=np.int64),
            np.zeros(n),
            np.zeros(n),
            np.zeros((n, n_classes), dtype=bool),
        )

    def put(self, rows: np.ndarray, pred: TargetPredictions, proba: np.ndarray, threshold: float) -> None:
        self.proba[rows] = proba
        self.index[rows] = pred.index
        self.confidence[rows] = pred.confidence
        self.thresholds[rows] = threshold
        plausible = pred.plausible
        if plausible is None:
            self.plausible = None
        elif self.plausible is not None:
            self.plausible[rows] = plausible

    def predictions(self, shipped: TargetHead) -> TargetPredictions:
        return TargetPredictions.gathered(
            shipped.classes,
            self.proba,
            self.index,
            self.confidence,
            self.thresholds,
            self.plausible,
            shipped.threshold,
            shipped.conformal,
        )


# ---------------------------------------------------------------------------------------------- per-row outcomes


def row_keys(records: RecordSet) -> np.ndarray:
    """One key per record from what the model reads of it (its text, or its segmented text): the same text gets
    the same key, in whichever export it comes."""
    contents = records.contents()
    return np.asarray(
        [hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest() for text in contents], dtype=object
    )


def outcome_table(
    records: RecordSet, predictions: dict[str, TargetPredictions], uncalibrated: dict[str, TargetPredictions]
) -> pa.Table:
    """Each record's outcome per target: label, confidence, review threshold, prediction set, and the label and
    confidence before calibration. No text and no ids: a row is known by its key."""
    columns: dict[str, pa.Array] = {KEY_COLUMN: pa.array(row_keys(records), pa.string())}
    for name, pred in predictions.items():
        threshold = pred.row_thresholds if pred.row_thresholds is not None else np.full(len(records), pred.threshold)
        columns[name] = pa.array(pred.labels.astype(str), pa.string())
        columns[f"{name}__confidence"] = pa.array(pred.confidence, pa.float64())
        columns[f"{name}__threshold"] = pa.array(threshold, pa.float64())
        plausible = pred.plausible
        if plausible is not None:
            classes = np.asarray(pred.classes, dtype=object)
            columns[f"{name}__plausible"] = pa.array([_SEP.join(classes[row]) for row in plausible], pa.string())
        raw = uncalibrated[name]
        columns[f"{name}__before"] = pa.array(raw.labels.astype(str), pa.string())
        columns[f"{name}__before_confidence"] = pa.array(raw.confidence, pa.float64())
    return pa.table(columns)


def write_outcomes(path: Path, table: pa.Table) -> None:
    """Write an outcome table atomically (a crash leaves the old file or the new one)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


@dataclass
class Outcomes:
    """Recorded outcomes matched to the rows of an export: ``found`` marks the rows that have one."""

    found: np.ndarray
    predictions: dict[str, TargetPredictions]  # the found rows only
    uncalibrated: dict[str, TargetPredictions]


def read_outcomes(path: Path, model: TriageModel, records: RecordSet) -> Outcomes:
    """The recorded outcomes of the rows of ``records`` whose text the file holds."""
    table = pq.read_table(path).to_pandas()
    table = table.drop_duplicates(KEY_COLUMN).set_index(KEY_COLUMN)
    keys = row_keys(records)
    found = pd.Index(table.index).get_indexer(keys) >= 0
    matched = table.loc[keys[found]]
    predictions, uncalibrated = {}, {}
    for name, head in model.heads.items():
        if name not in matched:
            continue
        classes = head.classes
        index = label_columns(classes, matched[name].tolist())
        plausible = None
        if f"{name}__plausible" in matched:
            plausible = np.zeros((len(matched), len(classes)), dtype=bool)
            for row, members in enumerate(matched[f"{name}__plausible"].tolist()):
                columns = label_columns(classes, members.split(_SEP) if members else [])
                plausible[row, columns[columns >= 0]] = True
        empty = np.zeros((len(matched), 0))
        thresholds = matched[f"{name}__threshold"].to_numpy()
        # A report names one threshold: the one every row shared (a holdout's model), else the shipped model's.
        shared = thresholds[0] if len(thresholds) and (thresholds == thresholds[0]).all() else head.threshold
        predictions[name] = TargetPredictions.gathered(
            classes,
            empty,
            np.maximum(index, 0),
            matched[f"{name}__confidence"].to_numpy(),
            thresholds,
            plausible,
            float(shared),
            head.conformal,
        )
        before = label_columns(classes, matched[f"{name}__before"].tolist())
        uncalibrated[name] = TargetPredictions.gathered(
            classes,
            empty,
            np.maximum(before, 0),
            matched[f"{name}__before_confidence"].to_numpy(),
            np.full(len(matched), head.threshold),
            None,
            head.threshold,
            None,
        )
    return Outcomes(found, predictions, uncalibrated)


def combine(
    n: int,
    parts: list[tuple[np.ndarray, TargetPredictions]],
    classes: list[str],
    threshold: float,
    conformal: ConformalSets | None,
) -> TargetPredictions:
    """One target's predictions for ``n`` rows from parts that cover disjoint rows (``(positions, predictions)``);
    ``threshold`` and ``conformal`` are the shipped head's (None: no prediction sets)."""
    index, confidence, thresholds = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
    plausible = None if conformal is None else np.zeros((n, len(classes)), dtype=bool)
    for positions, pred in parts:
        index[positions] = pred.index
        confidence[positions] = pred.confidence
        thresholds[positions] = pred.threshold if pred.row_thresholds is None else pred.row_thresholds
        part_plausible = pred.plausible
        if plausible is not None and part_plausible is not None:
            plausible[positions] = part_plausible
    return TargetPredictions.gathered(
        classes, np.zeros((n, 0)), index, confidence, thresholds, plausible, threshold, conformal
    )
