"""The evaluate stage: what ``sanshi-ml evaluate``, the DVC stage and the notebooks call.

``evaluate`` measures a saved model on an export. Rows the model trained on are graded by their recorded
out-of-fold outcomes, never by the saved model, which has seen them; other rows are predicted by the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sanshi_ml.artifacts import ArtifactError, LoadedModel, checked_file, load_model
from sanshi_ml.config import Params, TrainConfig
from sanshi_ml.core.model import TargetPredictions, TriageModel
from sanshi_ml.data.outputs import check_writable, writing
from sanshi_ml.data.records import ColumnMap, ReadOptions, RecordSet, load_many, split_indices, subset
from sanshi_ml.evaluation.estimate import (
    HELD_OUT_SPLIT,
    HOLDOUT,
    MIXED,
    OUT_OF_FOLD,
    UNSEEN,
    combine,
    read_outcomes,
)
from sanshi_ml.evaluation.metrics import cross_validate, evaluate_model, write_report

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class Graded:
    """The rows of an export as ``evaluate`` grades them, and what each figure rests on."""

    records: RecordSet
    predictions: dict[str, TargetPredictions]
    uncalibrated: dict[str, TargetPredictions] | None
    source: str
    scope: str
    rows: dict[str, int]


def evaluate(
    data: Sequence[str | Path],
    model_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    cv: int = 0,
    columns: ColumnMap | None = None,
    progress: Progress | None = None,
) -> dict:
    """Measure a saved model on ``data``; write metrics.json and plots to ``out_dir``; returns the metrics payload."""
    say = progress or log.info
    loaded = load_model(model_dir)
    check_writable(out_dir, "report")  # before grading, not when the report is written
    cmap = columns or ColumnMap.from_config(params.data.columns.model_validate(loaded.metadata["columns"]))
    records = load_many([str(p) for p in data], cmap, ReadOptions.from_config(params.data))
    for line in records.report.lines():
        say(line)
    graded = grade(records, loaded)
    say(f"evaluating {len(graded.records)} rows: {graded.scope}")
    metrics = evaluate_model(
        loaded.model,
        graded.records,
        params.evaluate.reliability_bins,
        graded.predictions,
        uncalibrated=graded.uncalibrated,
    )
    extra: dict = {
        "source": graded.source,
        "scope": graded.scope,
        "rows": graded.rows,
        "model_dir": str(model_dir),
        "model_version": loaded.version,
        "data_sha256": records.content_hash(),
    }
    holdout = _recorded_holdout(records, loaded, params)
    if holdout is not None:
        extra["holdout"] = holdout
        say(
            f"holdout: {holdout['rows']} of these rows were set aside when the model was trained; their figures "
            "come from the model fitted without them"
        )
    if cv:
        say(f"{cv}-fold cross-validation of the model's configuration on all {len(records)} rows")
        saved_train = TrainConfig.model_validate(loaded.metadata["train"])
        extra["cv"] = cross_validate(
            records,
            lambda: TriageModel(loaded.model.text_config, loaded.model.features_config, saved_train),
            cv,
            seed=params.split.seed,
            stratify_target=params.split.stratify_target,
            n_bins=params.evaluate.reliability_bins,
            progress=say,
        )
    with writing(out_dir, "the report"):
        path = write_report(metrics, graded.records, graded.predictions, out_dir, extra)
    say(f"wrote {path} and plots to {out_dir}")
    return {"targets": metrics, **extra}


def grade(records: RecordSet, loaded: LoadedModel) -> Graded:
    """Each row's prediction from a model that did not train on it: the recorded out-of-fold outcome of a row the
    model trained on (matched by its text), the model's own prediction for any other row."""
    meta = loaded.metadata
    recorded = meta.get("estimate")
    if recorded is None:
        if "test_size" in (meta.get("split") or {}):
            return _grade_saved_split(records, loaded)
        raise ArtifactError(
            f"{loaded.path}: the model records no out-of-fold outcomes, so the rows it trained on "
            "cannot be told apart from new ones; retrain it with `sanshi-ml train`"
        )
    outcomes = read_outcomes(checked_file(loaded.path, recorded, "recorded outcomes file"), loaded.model, records)
    n, seen = len(records), int(outcomes.found.sum())
    parts = {name: [(np.flatnonzero(outcomes.found), pred)] for name, pred in outcomes.predictions.items()}
    before = {name: [(np.flatnonzero(outcomes.found), pred)] for name, pred in outcomes.uncalibrated.items()}
    if seen < n:
        unseen = np.flatnonzero(~outcomes.found)
        features = loaded.model.record_features(subset(records, unseen))
        for name, pred in loaded.model.predict_features(features).items():
            parts.setdefault(name, []).append((unseen, pred))
        for name, proba in loaded.model.uncalibrated_proba(features).items():
            head = loaded.model.heads[name]
            before.setdefault(name, []).append((unseen, TargetPredictions(head.classes, proba, head.threshold)))
    heads = loaded.model.heads
    predictions = {
        name: combine(n, pieces, heads[name].classes, heads[name].threshold, heads[name].conformal)
        for name, pieces in parts.items()
    }
    uncalibrated = {
        name: combine(n, pieces, heads[name].classes, heads[name].threshold, None) for name, pieces in before.items()
    }
    if seen == n:
        source, scope = OUT_OF_FOLD, recorded["description"]
    elif seen == 0:
        source, scope = UNSEEN, "all rows are new to the model (none of their texts was among its training rows)"
    else:
        source, scope = (
            MIXED,
            (
                f"{seen} rows the model trained on, graded by their out-of-fold outcomes, and "
                f"{n - seen} new rows predicted by the model"
            ),
        )
    return Graded(records, predictions, uncalibrated, source, scope, {OUT_OF_FOLD: seen, UNSEEN: n - seen})


def _grade_saved_split(records: RecordSet, loaded: LoadedModel) -> Graded:
    """A model saved before the shipped model trained on every row: its training data's held-out rows (which it
    never saw) if ``records`` is that data, else every row."""
    meta = loaded.metadata
    rows = records
    source, scope = UNSEEN, "all rows (data differs from the training data)"
    if records.content_hash() == meta.get("data", {}).get("sha256"):
        split = meta["split"]
        _, test_idx = split_indices(records, split["test_size"], split["seed"], split.get("stratify_target"))
        rows = subset(records, test_idx)
        source, scope = HELD_OUT_SPLIT, "the held-out split of the training data"
    predictions = loaded.model.predict_records(rows)
    return Graded(rows, predictions, None, source, scope, {UNSEEN: len(rows)})


def _recorded_holdout(records: RecordSet, loaded: LoadedModel, params: Params) -> dict | None:
    """Figures of the rows of ``records`` that were the model's untouched holdout, from the recorded predictions of
    the model fitted without them; None when the model had no holdout or none of these rows was in it."""
    recorded = loaded.metadata.get("holdout")
    if not recorded:
        return None
    outcomes = read_outcomes(checked_file(loaded.path, recorded, "recorded outcomes file"), loaded.model, records)
    if not outcomes.found.any():
        return None
    rows = subset(records, np.flatnonzero(outcomes.found))
    metrics = evaluate_model(
        loaded.model, rows, params.evaluate.reliability_bins, outcomes.predictions, uncalibrated=outcomes.uncalibrated
    )
    return {"source": HOLDOUT, "description": recorded["description"], "rows": len(rows), "targets": metrics}
