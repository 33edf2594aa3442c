"""The train and evaluate stages: what ``sanshi-ml train`` / ``evaluate``, the DVC stages and the notebooks call.

``train`` fits the model on every labelled row and saves it, measured by its out-of-fold estimate (every row
predicted by models and calibration chains fitted without it; :mod:`sanshi_ml.estimate`). With ``split.holdout``
it first sets that share of rows aside, measures a model fitted on the rest on them, and then refits on all rows.
Whichever figures are reported say where they come from.

``evaluate`` measures a saved model on an export. Rows the model trained on are graded by their recorded
out-of-fold outcomes, never by the saved model, which has seen them; other rows are predicted by the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sanshi_ml.artifacts import ArtifactError, LoadedModel, checked_file, load_model, save_model, sha256_file
from sanshi_ml.config import Params, TrainConfig
from sanshi_ml.estimate import (
    ESTIMATE_FILE,
    HOLDOUT_FILE,
    Estimate,
    combine,
    estimate,
    outcome_table,
    read_outcomes,
    write_outcomes,
)
from sanshi_ml.evaluate import cross_validate, evaluate_model, headline, write_report
from sanshi_ml.model import TargetPredictions, TriageModel
from sanshi_ml.outputs import check_writable, writing
from sanshi_ml.policy import load_policy
from sanshi_ml.records import ColumnMap, ReadOptions, RecordSet, load_many, split_indices, subset

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Where figures come from: the "source" of metrics.json, the metadata and the MLflow run.
OUT_OF_FOLD = "out_of_fold"
HOLDOUT = "holdout"
UNSEEN = "unseen_rows"
MIXED = "out_of_fold_and_unseen_rows"
HELD_OUT_SPLIT = "held_out_split"  # models saved before the shipped model trained on every row


@dataclass
class Holdout:
    """Rows set aside before training, and how a model fitted without them did on them."""

    share: float
    seed: int
    records: RecordSet
    predictions: dict[str, TargetPredictions]
    uncalibrated: dict[str, TargetPredictions]
    metrics: dict | None = None  # measured once the saved model exists (see :func:`train`)

    def describe(self, n_rows: int) -> str:
        return (
            f"untouched holdout: {len(self.records)} of {n_rows} rows ({self.share:.0%}, seed {self.seed}) set "
            "aside before training and predicted by a model fitted on the other rows; the saved model was then "
            "refitted on all rows"
        )


@dataclass
class TrainResult:
    model_dir: Path
    model: TriageModel
    metadata: dict
    metrics: dict  # the out-of-fold estimate of the saved model
    records: RecordSet
    estimate: Estimate
    holdout: Holdout | None = None
    run_id: str | None = None


def column_map(params: Params) -> ColumnMap:
    return ColumnMap.from_config(params.data.columns)


def describe_estimate(folds: int, n_rows: int) -> str:
    return (
        f"out-of-fold estimate: each of the {n_rows} training rows predicted by models and a calibration chain "
        f"fitted without it ({folds} folds, repeated texts kept together); it measures the saved model, "
        "trained on all of them"
    )


def _policy_record(params: Params) -> dict:
    policy = load_policy(params.policy.path, params.policy.sanshi_target, params.policy.unit_target)
    return {
        "path": params.policy.path,
        "name": policy.name,
        "version": policy.version,
        "sha256": policy.sha256,
        "sanshi_target": policy.sanshi_target,
        "unit_target": policy.unit_target,
        "review_rule": params.policy.review_rule,
    }


def _new_model(params: Params) -> TriageModel:
    return TriageModel(params.text, params.features, params.train)


def measure_holdout(records: RecordSet, params: Params, say: Progress) -> Holdout:
    """Set ``params.split.holdout`` of the rows aside, fit a model on the rest and measure it on them."""
    split = params.split
    fit_idx, held_idx = split_indices(records, split.holdout, split.seed, split.stratify_target)
    say(
        f"holdout: {len(held_idx)} rows set aside (seed {split.seed}, repeated texts kept together); fitting a model "
        f"on the other {len(fit_idx)} to measure on them"
    )
    probe = _new_model(params).fit(subset(records, fit_idx), progress=lambda _message: None)
    held = subset(records, held_idx)
    features = probe.record_features(held)
    predictions = probe.predict_features(features)
    uncalibrated = {
        name: TargetPredictions(probe.heads[name].classes, proba, probe.heads[name].threshold)
        for name, proba in probe.uncalibrated_proba(features).items()
    }
    return Holdout(split.holdout, split.seed, held, predictions, uncalibrated)


def train(
    data: Sequence[str | Path],
    params: Params,
    model_dir: str | Path | None = None,
    progress: Progress | None = None,
    track: bool | None = None,
) -> TrainResult:
    """Fit a model on every row of ``data``, measure it, and save it to ``model_dir`` (default
    ``params.train.model_dir``)."""
    say = progress or log.info
    model_dir = Path(model_dir or params.train.model_dir)
    check_writable(model_dir, "model")  # a read-only location fails now, not at the save after all the fitting
    policy = _policy_record(params)  # fail on a broken 责任清单 before spending time on training
    records = load_many([str(p) for p in data], column_map(params), ReadOptions.from_config(params.data))
    for line in records.report.lines():
        say(line)
    holdout = measure_holdout(records, params, say) if params.split.holdout else None
    say(f"fitting the model on all {len(records)} rows")
    model = _new_model(params).fit(records, progress=say)
    found = estimate(model, records)
    metrics = evaluate_model(
        model, records, params.evaluate.reliability_bins, found.predictions, uncalibrated=found.uncalibrated
    )
    with writing(model_dir, "the model"):
        model_dir.mkdir(parents=True, exist_ok=True)
    estimate_record = {
        "source": OUT_OF_FOLD,
        "description": describe_estimate(found.folds, len(records)),
        "folds": found.folds,
        "rows": len(records),
        **_write_outcomes(model_dir / ESTIMATE_FILE, records, found.predictions, found.uncalibrated),
    }
    holdout_record = None
    if holdout is None:
        (model_dir / HOLDOUT_FILE).unlink(missing_ok=True)  # a previous model's
    else:
        written = _write_outcomes(model_dir / HOLDOUT_FILE, holdout.records, holdout.predictions, holdout.uncalibrated)
        # Measured from the outcomes as written, so that `evaluate` reproduces these figures exactly.
        outcomes = read_outcomes(model_dir / HOLDOUT_FILE, model, holdout.records)
        holdout.metrics = evaluate_model(
            model,
            holdout.records,
            params.evaluate.reliability_bins,
            outcomes.predictions,
            uncalibrated=outcomes.uncalibrated,
        )
        holdout_record = {
            "source": HOLDOUT,
            "description": holdout.describe(len(records)),
            "share": holdout.share,
            "seed": holdout.seed,
            "rows": len(holdout.records),
            "metrics": headline(holdout.metrics),
            **written,
        }
    with writing(model_dir, "the model"):  # a full disk: one line naming the directory
        metadata = save_model(
            model,
            model_dir,
            extra={
                "data": {
                    "sources": [str(p) for p in data],
                    "sha256": records.content_hash(),
                    "load_report": records.report.as_dict(),
                    "n_train": len(records),
                    "n_holdout": len(holdout.records) if holdout else 0,
                },
                "columns": params.data.columns.model_dump(),
                "split": params.split.model_dump(),
                "policy": policy,
                "params": params.model_dump(),
                "metrics": headline(metrics),
                "metrics_source": OUT_OF_FOLD,
                "estimate": estimate_record,
                "holdout": holdout_record,
            },
        )
    say(f"saved model to {model_dir} (sha256 {metadata['artifact']['sha256'][:12]})")
    result = TrainResult(model_dir, model, metadata, metrics, records, found, holdout)
    if params.tracking.enabled if track is None else track:
        from sanshi_ml import tracking
        from sanshi_ml.artifacts import update_metadata

        result.run_id = tracking.log_training_run(result, params)
        update_metadata(model_dir, mlflow_run_id=result.run_id)
        say(f"MLflow run {result.run_id} ({tracking.tracking_uri(params)})")
    return result


def _write_outcomes(
    path: Path,
    records: RecordSet,
    predictions: dict[str, TargetPredictions],
    uncalibrated: dict[str, TargetPredictions],
) -> dict:
    with writing(path, "the model's out-of-fold outcomes"):
        write_outcomes(path, outcome_table(records, predictions, uncalibrated))
    return {"file": path.name, "sha256": sha256_file(path)}


# ------------------------------------------------------------------------------------------------------- evaluate


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
    outcomes = read_outcomes(_checked_file(loaded, recorded), loaded.model, records)
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


def _checked_file(loaded: LoadedModel, record: dict) -> Path:
    """A file the metadata lists beside the model, inside its directory and the one written with it."""
    return checked_file(loaded.path, record, "recorded outcomes file")


def _recorded_holdout(records: RecordSet, loaded: LoadedModel, params: Params) -> dict | None:
    """Figures of the rows of ``records`` that were the model's untouched holdout, from the recorded predictions of
    the model fitted without them; None when the model had no holdout or none of these rows was in it."""
    recorded = loaded.metadata.get("holdout")
    if not recorded:
        return None
    outcomes = read_outcomes(_checked_file(loaded, recorded), loaded.model, records)
    if not outcomes.found.any():
        return None
    rows = subset(records, np.flatnonzero(outcomes.found))
    metrics = evaluate_model(
        loaded.model, rows, params.evaluate.reliability_bins, outcomes.predictions, uncalibrated=outcomes.uncalibrated
    )
    return {"source": HOLDOUT, "description": recorded["description"], "rows": len(rows), "targets": metrics}
