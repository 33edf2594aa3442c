"""MLflow tracking and the model registry: one run per training, promotion by alias, loading a promoted model.

Every ``sanshi-ml train`` (and so every DVC ``train`` stage and every notebook training) logs a run with the
flattened params, the data hash and git commit as tags, per-target and per-class metrics, the evaluation plots, and
the model as an MLflow pyfunc model. ``promote`` registers a run's model as ``sanshi-triage`` and moves the alias
``champion`` to it; the server loads ``models:/sanshi-triage@champion`` through :func:`load_registered_model_dir`.

The tracking URI is set explicitly, inside each function, never at import time. It comes from ``params.tracking.uri``,
else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the current directory. MLflow's file store
(``./mlruns`` as a tracking URI) is deprecated and refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from sanshi_ml import resource
from sanshi_ml.artifacts import METADATA_FILE, MODEL_FILE, LoadedModel, library_versions
from sanshi_ml.config import Params
from sanshi_ml.pyfunc import SANSHI_ARTIFACT, SanshiTriageModel

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
MODEL_ARTIFACT = "model"  # name of the pyfunc model inside a run: runs:/<run_id>/model
REPORT_ARTIFACT = "evaluation"  # metrics.json and plots of the out-of-fold estimate
HOLDOUT_ARTIFACT = "evaluation_holdout"  # the same for the untouched holdout, when train had one
HOLDOUT_PREFIX = "holdout"  # holdout.category.macro_f1 beside category.macro_f1 (the out-of-fold estimate)
TAG_METRICS_SOURCE = "metrics_source"
TAG_DATA_SHA = "data_sha256"
TAG_GIT_COMMIT = "git_commit"
TAG_MODEL_SHA = "model_sha256"
TAG_MODEL_URI = "sanshi_model_uri"  # models:/<logged model id> of the run's pyfunc model
# Input example of the logged model: two requests of the kind the demo answers (fictional, no personal data).
EXAMPLE_REQUESTS = [
    ("电梯坏了", "A3区青青家园小区的电梯坏了一个多月，物业一直不修"),
    (None, "楼上邻居每天深夜拖动家具，噪音太大，沟通无果"),
]
_PYFUNC_CODE = resource("mlflow_pyfunc_model.py")
_REQUIREMENTS = ("scikit-learn", "numpy", "scipy", "pandas", "joblib", "rjieba", "jieba", "opencc")
# MLflow accepts word characters, '.', '-', '/', ' ' and ':' in metric names (':' not on Windows); the rest of a
# class or slice name (parentheses, '<', '%', '=') becomes '_'.
_METRIC_UNSAFE = re.compile(r"[^\w.\-/ ]")


class TrainingRun(Protocol):
    """What a training run logs (the stage's :class:`~sanshi_ml.stages.train.TrainResult`, which this layer below the
    stages knows only by shape): the saved model, its metadata, and the figures with the rows they rest on."""

    model_dir: Path
    model: Any
    metadata: dict
    metrics: dict  # the out-of-fold estimate's
    records: Any  # the training records
    estimate: Any  # .predictions: the out-of-fold predictions behind ``metrics``
    holdout: Any  # None, or .metrics, .records and .predictions of the untouched holdout


class TrackingError(RuntimeError):
    """A tracking store, run or registered model that cannot be used; the message says which and where."""


# ------------------------------------------------------------------------------------------------------ the store


def tracking_uri(params: Params | None = None) -> str:
    """The tracking URI to use: params, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative SQLite paths are made absolute against the current directory, so a run logged from a notebook in
    ``notebooks/`` and one logged by ``dvc repro`` at the repository root land in the same store.
    """
    uri = (params.tracking.uri if params is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") or ""
    uri = uri.strip() or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not path.startswith("/"):
            uri = "sqlite:///" + str((Path.cwd() / path).resolve())
        return uri
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingError(
            f"tracking URI {uri!r} is MLflow's deprecated file store; use a SQLite store such as "
            "sqlite:///mlflow.db (tracking.uri in params.yaml or MLFLOW_TRACKING_URI)"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri[len("sqlite:///") :])
    return None


def _client(params: Params | None) -> MlflowClient:
    """Point MLflow (tracking and registry) at the configured store and return a client for it."""
    uri = tracking_uri(params)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it if needed. With a SQLite store its artifacts go to ``mlartifacts/`` beside
    the database (MLflow's own default is ``./mlruns`` under whatever directory the first run happened to use)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_path(client.tracking_uri)
        location = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
        return client.create_experiment(name, artifact_location=location)
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} is deleted in {client.tracking_uri}; restore it "
            "(mlflow experiments restore) or set tracking.experiment to another name"
        )
    return experiment.experiment_id


# ------------------------------------------------------------------------------------------------ what gets logged


def flatten_params(params: Params) -> dict[str, str]:
    """Every parameter as ``section.key`` (nested mappings joined with dots), values as text."""

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                yield from walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, str):
            yield prefix, value
        else:
            yield prefix, json.dumps(value, ensure_ascii=False)

    return dict(walk("", params.model_dump()))


def metric_key(*parts: str) -> str:
    """A metric name MLflow accepts, from parts such as ``("category", "f1", "城乡建设")``."""
    key = ".".join(_METRIC_UNSAFE.sub("_", str(part)).strip() or "_" for part in parts)
    # Names must not change under path normalisation ("a//b", "a/./b", leading "/").
    key = re.sub(r"/+", "/", key).strip("/")
    return re.sub(r"(^|/)\.+(?=/|$)", r"\1_", key) or "_"


def run_metrics(metrics: dict) -> dict[str, float]:
    """Flat MLflow metrics from evaluate_model's output: per target, per class and per slice."""
    out: dict[str, float] = {}

    def put(value: Any, *parts: str) -> None:
        if value is not None and isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
            out[metric_key(*parts)] = float(value)

    for target, m in metrics.items():
        for key in (
            "accuracy",
            "macro_f1",
            "weighted_f1",
            "ece",
            "ece_uncalibrated",
            "threshold",
            "coverage_at_threshold",
            "accuracy_at_threshold",
            "n",
            "n_accepted",
            "aurc",
            "aurc_optimal",
        ):
            put(m.get(key), target, key)
        # Selective prediction and prediction sets: category.accuracy_at_coverage.0.9, category.conformal.coverage …
        for group in ("accuracy_at_coverage", "coverage_at_accuracy", "conformal"):
            for key, value in (m.get(group) or {}).items():
                put(value, target, group, key)
        for label, stats in m.get("per_class", {}).items():
            for stat in ("f1", "precision", "recall", "support"):
                put(stats.get(stat), target, stat, label)
        for name, stats in m.get("slices", {}).items():
            for stat in ("accuracy", "macro_f1", "n"):
                put(stats.get(stat), target, "slice", name, stat)
    return out


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (given explicitly: MLflow's inference would load the model in a
    subprocess). sanshi-ml itself is not on PyPI; the loading environment installs it from the repository."""
    versions = library_versions()
    pins = [
        f"{name}=={versions[name]}" for name in _REQUIREMENTS if versions.get(name, "not installed") != "not installed"
    ]
    return [f"mlflow=={mlflow.__version__}", *pins]


def _signature(output: pd.DataFrame):
    from mlflow.models.signature import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "title", required=False), ColSpec("string", "text")])
    return ModelSignature(inputs=inputs, outputs=infer_signature(output).inputs)  # the schema of the output frame


@contextmanager
def _mlflow_errors(params: Params) -> Iterator[None]:
    """An MLflow failure (store unreachable, experiment deleted …) as a one-line TrackingError naming the store."""
    try:
        yield
    except MlflowException as error:
        raise TrackingError(f"MLflow ({tracking_uri(params)}): {error.message}") from error


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Without MLflow's per-file progress bars, which fill logs with one line per artifact."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _log_model(result: TrainingRun, run_id: str, work: Path) -> str:
    """Log the model directory (model.joblib, metadata.json and the recorded out-of-fold and holdout outcomes that
    ``evaluate`` grades training rows by, nothing else) as a pyfunc model; returns its URI."""
    from sanshi_ml.suggest import Suggester

    bundle = work / SANSHI_ARTIFACT
    bundle.mkdir()
    shutil.copy2(result.model_dir / MODEL_FILE, bundle / MODEL_FILE)
    metadata = json.loads((result.model_dir / METADATA_FILE).read_text(encoding="utf-8"))
    for record in (metadata.get("estimate"), metadata.get("holdout")):
        if record:
            shutil.copy2(result.model_dir / record["file"], bundle / record["file"])
    metadata["mlflow_run_id"] = run_id  # sha256 and signature cover model.joblib and the policy: both stay valid
    (bundle / METADATA_FILE).write_text(json.dumps(metadata, ensure_ascii=False, indent=2), encoding="utf-8")
    example = pd.DataFrame({"title": [t for t, _ in EXAMPLE_REQUESTS], "text": [x for _, x in EXAMPLE_REQUESTS]})
    # The output schema comes from the fitted model in memory; the logged model is the wrapper's code, which
    # loads the model from the artifact.
    probe = SanshiTriageModel()
    probe.suggester = Suggester.from_loaded(LoadedModel(result.model, metadata, bundle))
    signature = _signature(probe.predict(None, example))
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(_PYFUNC_CODE),
        artifacts={SANSHI_ARTIFACT: str(bundle)},
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata={
            "sanshi_model_version": metadata["artifact"]["sha256"][:12],
            TAG_DATA_SHA: metadata.get("data", {}).get("sha256"),
        },
    )
    return info.model_uri


def log_training_run(result: TrainingRun, params: Params) -> str:
    """Log one training run (params, tags, metrics, plots, model) and return its run id.

    The metrics are the saved model's out-of-fold estimate (``category.macro_f1`` …), and with a holdout also the
    figures of the model fitted without it (``holdout.category.macro_f1`` …); the tag ``metrics_source`` and the
    artifacts ``evaluation/`` and ``evaluation_holdout/`` (metrics.json and plots) say which is which.
    """
    from sanshi_ml.evaluation.metrics import write_report

    client = _client(params)
    experiment_id = _experiment_id(client, params.tracking.experiment)
    meta = result.metadata
    data = meta.get("data", {})
    tags = {
        TAG_DATA_SHA: data.get("sha256") or "",
        TAG_GIT_COMMIT: meta.get("git_commit") or "unknown",
        TAG_MODEL_SHA: meta["artifact"]["sha256"],
        "model_dir": str(result.model_dir),
        "data_sources": json.dumps(data.get("sources", []), ensure_ascii=False),
        "sanshi_ml_version": meta.get("libraries", {}).get("sanshi-ml", ""),
        TAG_METRICS_SOURCE: meta["estimate"]["source"] + (" + holdout" if result.holdout else ""),
    }
    run_name = f"{Path(result.model_dir).name}-C{params.train.C:g}-{meta['artifact']['sha256'][:8]}"
    with _mlflow_errors(params), mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(flatten_params(params))
        metrics = run_metrics(result.metrics)
        if result.holdout is not None:
            metrics.update(
                {metric_key(HOLDOUT_PREFIX, key): value for key, value in run_metrics(result.holdout.metrics).items()}
            )
        mlflow.log_metrics(metrics)
        mlflow.log_dict(
            {
                "data": data,
                "targets": meta.get("targets", {}),
                "policy": meta.get("policy"),
                "estimate": meta.get("estimate"),
                "holdout": meta.get("holdout"),
            },
            "training_summary.json",
        )
        with tempfile.TemporaryDirectory(prefix="sanshi-mlflow-") as tmp:
            report_dir = Path(tmp) / REPORT_ARTIFACT
            write_report(
                result.metrics,
                result.records,
                result.estimate.predictions,
                report_dir,
                {
                    "source": meta["estimate"]["source"],
                    "scope": meta["estimate"]["description"],
                    "data_sha256": data.get("sha256"),
                },
            )
            mlflow.log_artifacts(str(report_dir), REPORT_ARTIFACT)
            if result.holdout is not None:
                holdout_dir = Path(tmp) / HOLDOUT_ARTIFACT
                write_report(
                    result.holdout.metrics,
                    result.holdout.records,
                    result.holdout.predictions,
                    holdout_dir,
                    {"source": meta["holdout"]["source"], "scope": meta["holdout"]["description"]},
                )
                mlflow.log_artifacts(str(holdout_dir), HOLDOUT_ARTIFACT)
            with _quiet_downloads():
                mlflow.set_tag(TAG_MODEL_URI, _log_model(result, run_id, Path(tmp)))
    log.info("logged MLflow run %s to %s", run_id, tracking_uri(params))
    return run_id


class TuningLog:
    """A ``sanshi-ml tune`` search in MLflow: one parent run, one nested run per setting (params + CV metrics)."""

    def __init__(self, params: Params, *, target: str, cv: int, n_settings: int) -> None:
        self.params = params
        with _mlflow_errors(params):
            self.client = _client(params)
            self.experiment_id = _experiment_id(self.client, params.tracking.experiment)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"tune-{target}-cv{cv}",
                tags={"sanshi.kind": "tune", "tune.target": target},
            )
            self.parent_id = run.info.run_id
            self.client.log_batch(
                self.parent_id,
                params=[
                    Param(k, v)
                    for k, v in {
                        "tune.target": target,
                        "tune.cv": str(cv),
                        "tune.n_settings": str(n_settings),
                        "tune.space": json.dumps(params.tune.space, ensure_ascii=False),
                    }.items()
                ],
            )

    def log_trial(self, trial, trial_params: Params, cv_result: dict) -> str:
        """A nested run with the trial's full params and its per-target CV metrics (mean, sd and per fold)."""
        now = int(time.time() * 1000)
        metrics = []
        for target, values in cv_result["targets"].items():
            for key, stats in values.items():
                for stat in ("mean", "std"):
                    if stats.get(stat) is not None:
                        metrics.append(Metric(metric_key("cv", target, key, stat), float(stats[stat]), now, 0))
                for fold, value in enumerate(stats.get("folds", [])):
                    metrics.append(Metric(metric_key("cv", target, key, "fold"), float(value), now, fold))
        with _mlflow_errors(self.params):
            run = self.client.create_run(
                self.experiment_id,
                tags={
                    MLFLOW_PARENT_RUN_ID: self.parent_id,
                    MLFLOW_RUN_NAME: f"trial-{trial.number}",
                    "sanshi.kind": "tune-trial",
                    "tune.setting": trial.description,
                },
            )
            run_id = run.info.run_id
            self.client.log_batch(
                run_id, metrics=metrics, params=[Param(k, v) for k, v in flatten_params(trial_params).items()]
            )
            self.client.set_terminated(run_id)
        return run_id

    def finish(self, best) -> str:
        """Record the best setting on the parent run and close it; returns the parent run's id."""
        if best is not None:
            tags = [
                RunTag("tune.best_trial", str(best.number)),
                RunTag("tune.best_run_id", best.run_id or ""),
                RunTag("tune.best_setting", json.dumps(best.setting, ensure_ascii=False, default=str)),
            ]
            self.client.log_batch(self.parent_id, tags=tags)
        self.client.set_terminated(self.parent_id, status="FINISHED" if best is not None else "FAILED")
        return self.parent_id


# ------------------------------------------------------------------------------------------------------ the registry


def best_run(params: Params, metric: str, lowest: bool = False) -> str:
    """The id of the finished run in the experiment with the highest (or lowest) value of ``metric``."""
    client = _client(params)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        raise TrackingError(f"no experiment {params.tracking.experiment!r} in {client.tracking_uri}: train first")
    key = metric_key(*metric.split("."))
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{key}` {'ASC' if lowest else 'DESC'}"],
        max_results=50,
    )
    runs = [r for r in runs if key in r.data.metrics]
    if not runs:
        raise TrackingError(
            f"no finished run in experiment {params.tracking.experiment!r} has the metric {key!r} "
            f"(metrics look like category.macro_f1 or sanshi.f1.公事)"
        )
    return runs[0].info.run_id


def promote(run_id: str | None, params: Params, best_metric: str | None = None, lowest: bool = False) -> ModelVersion:
    """Register a run's model as ``params.tracking.registered_model`` and move the alias to the new version.

    Give ``run_id``, or ``best_metric`` (e.g. ``category.macro_f1``) to pick the best finished run.
    """
    if (run_id is None) == (best_metric is None):
        raise TrackingError("give either a run id or a metric to pick the best run by, not both")
    client = _client(params)
    if best_metric is not None:
        run_id = best_run(params, best_metric, lowest)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id!r} not found in {client.tracking_uri}") from None
    name, alias = params.tracking.registered_model, params.tracking.alias
    tags = {k: run.data.tags.get(k, "") for k in (TAG_DATA_SHA, TAG_GIT_COMMIT, TAG_MODEL_SHA)}
    try:
        model_uri = run.data.tags.get(TAG_MODEL_URI) or f"runs:/{run_id}/{MODEL_ARTIFACT}"
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as error:
        raise TrackingError(f"cannot register run {run_id}'s model as {name!r}: {error.message}") from error
    log.info("registered %s version %s from run %s; alias %s now points to it", name, version.version, run_id, alias)
    return version


def champion_uri(params: Params) -> str:
    """``models:/<registered model>@<alias>`` as configured in params."""
    return f"models:/{params.tracking.registered_model}@{params.tracking.alias}"


def load_registered_model_dir(uri: str, dst: str | Path | None = None, params: Params | None = None) -> Path:
    """Download a logged model (``models:/sanshi-triage@champion``, ``models:/name/3``, ``runs:/<id>/model``) and
    return the sanshi-ml model directory inside it, ready for :func:`sanshi_ml.artifacts.load_model`.

    ``dst`` is where the download goes (default: a new temporary directory, left for the caller to remove).
    """
    _client(params)
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="sanshi-model-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except MlflowException as error:
        raise TrackingError(f"cannot load {uri} from {tracking_uri(params)}: {error.message}") from error
    model_dir = local / "artifacts" / SANSHI_ARTIFACT
    if not (model_dir / METADATA_FILE).is_file():
        raise TrackingError(f"{uri}: not a sanshi-ml model (no artifacts/{SANSHI_ARTIFACT}/{METADATA_FILE} in it)")
    return model_dir
