"""The train stage: what ``sanshi-ml train``, the DVC stage and the notebooks call.

``train`` fits the model on every labelled row and saves it, measured by its out-of-fold estimate (every row
predicted by models and calibration chains fitted without it; :mod:`sanshi_ml.evaluation.estimate`). With
``split.holdout`` it first sets that share of rows aside, measures a model fitted on the rest on them, and then
refits on all rows. Whichever figures are reported say where they come from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sanshi_ml.artifacts import save_model, sha256_file
from sanshi_ml.config import Params
from sanshi_ml.core.model import TargetPredictions, TriageModel
from sanshi_ml.core.policy import load_policy
from sanshi_ml.data.outputs import check_writable, writing
from sanshi_ml.data.records import ColumnMap, ReadOptions, RecordSet, load_many, split_indices, subset
from sanshi_ml.evaluation.estimate import (
    ESTIMATE_FILE,
    HOLDOUT,
    HOLDOUT_FILE,
    OUT_OF_FOLD,
    Estimate,
    describe_estimate,
    estimate,
    outcome_table,
    read_outcomes,
    write_outcomes,
)
from sanshi_ml.evaluation.metrics import evaluate_model, headline

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


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
