"""The train and evaluate stages: what ``sanshi-ml train`` / ``evaluate``, the DVC stages and the notebooks call.

``train`` loads an export, splits it (stratified, duplicates kept together), fits the model on the training side,
measures it on the held-out side, and saves the model with its metadata. ``evaluate`` measures a saved model on an
export: on the same held-out rows if it is the training data, on every row otherwise, or by K-fold
cross-validation of the model's configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sanshi_ml.artifacts import LoadedModel, load_model, save_model, update_metadata
from sanshi_ml.config import Params, TrainConfig
from sanshi_ml.evaluate import cross_validate, evaluate_model, headline, write_report
from sanshi_ml.model import TriageModel
from sanshi_ml.policy import load_policy
from sanshi_ml.records import ColumnMap, RecordSet, load_many, split_indices, subset

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class TrainResult:
    model_dir: Path
    model: TriageModel
    metadata: dict
    metrics: dict
    records: RecordSet
    run_id: str | None = None


def column_map(params: Params) -> ColumnMap:
    return ColumnMap.from_config(params.data.columns)


def _policy_record(params: Params) -> dict:
    policy = load_policy(params.policy.path, params.policy.sanshi_target, params.policy.unit_target)
    return {"path": params.policy.path, "name": policy.name, "version": policy.version, "sha256": policy.sha256,
            "sanshi_target": policy.sanshi_target, "unit_target": policy.unit_target,
            "review_rule": params.policy.review_rule}


def train(data: Sequence[str | Path], params: Params, model_dir: str | Path | None = None,
          progress: Progress | None = None, track: bool | None = None) -> TrainResult:
    """Fit a model on ``data`` and save it to ``model_dir`` (default ``params.train.model_dir``)."""
    say = progress or log.info
    model_dir = Path(model_dir or params.train.model_dir)
    policy = _policy_record(params)  # fail on a broken 责任清单 before spending time on training
    records = load_many([str(p) for p in data], column_map(params))
    for line in records.report.lines():
        say(line)
    train_idx, test_idx = split_indices(records, params.split.test_size, params.split.seed,
                                        params.split.stratify_target)
    say(f"split: {len(train_idx)} training rows, {len(test_idx)} held out "
        f"(seed {params.split.seed}, duplicates kept together)")
    model = TriageModel(params.text, params.features, params.train).fit(subset(records, train_idx), progress=say)
    test = subset(records, test_idx)
    features = model.record_features(test)
    predictions = model.predict_features(features)
    metrics = evaluate_model(model, test, params.evaluate.reliability_bins, predictions, features)
    metadata = save_model(model, model_dir, extra={
        "data": {"sources": [str(p) for p in data], "sha256": records.content_hash(),
                 "load_report": records.report.as_dict(), "n_train": len(train_idx), "n_test": len(test_idx)},
        "columns": params.data.columns.model_dump(),
        "split": params.split.model_dump(),
        "policy": policy,
        "params": params.model_dump(),
        "metrics": headline(metrics),
    })
    say(f"saved model to {model_dir} (sha256 {metadata['artifact']['sha256'][:12]})")
    result = TrainResult(model_dir, model, metadata, metrics, records)
    if params.tracking.enabled if track is None else track:
        from sanshi_ml import tracking

        result.run_id = tracking.log_training_run(result, params, predictions=predictions, test=test)
        update_metadata(model_dir, mlflow_run_id=result.run_id)
        say(f"MLflow run {result.run_id} ({tracking.tracking_uri(params)})")
    return result


def evaluate(data: Sequence[str | Path], model_dir: str | Path, out_dir: str | Path, params: Params,
             cv: int = 0, columns: ColumnMap | None = None, progress: Progress | None = None) -> dict:
    """Measure a saved model on ``data``; write metrics.json and plots to ``out_dir``; returns the metrics payload."""
    say = progress or log.info
    loaded = load_model(model_dir)
    cmap = columns or ColumnMap.from_config(params.data.columns.model_validate(loaded.metadata["columns"]))
    records = load_many([str(p) for p in data], cmap)
    for line in records.report.lines():
        say(line)
    scope, rows = _evaluation_rows(records, loaded)
    say(f"evaluating on {scope}: {len(rows)} rows")
    features = loaded.model.record_features(rows)
    predictions = loaded.model.predict_features(features)
    metrics = evaluate_model(loaded.model, rows, params.evaluate.reliability_bins, predictions, features)
    extra: dict = {"model_dir": str(model_dir), "model_version": loaded.version, "scope": scope,
                   "data_sha256": records.content_hash()}
    if cv:
        say(f"{cv}-fold cross-validation of the model's configuration on all {len(records)} rows")
        saved_train = TrainConfig.model_validate(loaded.metadata["train"])
        extra["cv"] = cross_validate(
            records, lambda: TriageModel(loaded.model.text_config, loaded.model.features_config, saved_train),
            cv, seed=params.split.seed, stratify_target=params.split.stratify_target,
            n_bins=params.evaluate.reliability_bins, progress=say)
    path = write_report(metrics, rows, predictions, out_dir, extra)
    say(f"wrote {path} and plots to {out_dir}")
    return {"targets": metrics, **extra}


def _evaluation_rows(records: RecordSet, loaded: LoadedModel) -> tuple[str, RecordSet]:
    """The training data's held-out rows if ``records`` is the training data, else every row."""
    meta = loaded.metadata
    if records.content_hash() == meta.get("data", {}).get("sha256"):
        split = meta["split"]
        _, test_idx = split_indices(records, split["test_size"], split["seed"], split.get("stratify_target"))
        return "the held-out split of the training data", subset(records, test_idx)
    return "all rows (data differs from the training data)", records
