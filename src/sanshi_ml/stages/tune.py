"""Hyper-parameter search: each candidate setting is cross-validated on the training data and logged to MLflow.

The winner is chosen on cross-validation folds (duplicates kept together), never on a test split, and written as
a params file that ``train`` and ``dvc exp run`` take as they are. The space is ``tune.space`` in params.yaml:
dotted parameter names with the values to try. Small spaces are searched exhaustively (sklearn's ParameterGrid);
larger ones are sampled (ParameterSampler) for ``tune.n_trials`` settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sklearn.model_selection import ParameterGrid, ParameterSampler

from sanshi_ml.config import ConfigError, Params, parse_params
from sanshi_ml.core.model import TriageModel
from sanshi_ml.data.records import RecordSet
from sanshi_ml.evaluation.metrics import cross_validate

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """One candidate setting and its cross-validated scores (per target: mean and sd of macro-F1 and accuracy)."""

    number: int
    setting: dict[str, Any]
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None

    def score(self, target: str) -> float:
        return self.scores[target]["macro_f1_mean"]

    @property
    def description(self) -> str:
        return _describe(self.setting)


@dataclass
class TuneResult:
    """All trials, best first, and the target they were ranked on."""

    target: str
    trials: list[Trial]
    parent_run_id: str | None = None

    @property
    def best(self) -> Trial:
        return self.trials[0]

    def lines(self) -> list[str]:
        out = [f"{len(self.trials)} settings, ranked by {self.target} cross-validated macro-F1:"]
        for rank, trial in enumerate(self.trials, start=1):
            s = trial.scores[self.target]
            sd = f" ± {s['macro_f1_std']:.4f}" if s["macro_f1_std"] is not None else ""
            out.append(
                f"{rank:>3}. macro-F1 {s['macro_f1_mean']:.4f}{sd}  accuracy {s['accuracy_mean']:.4f}  "
                f"{trial.seconds:.0f}s  {trial.description}"
            )
        return out


def _describe(setting: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(setting.items())) or "(the params as they are)"


def apply_setting(params: Params, setting: dict[str, Any]) -> Params:
    """``params`` with dotted keys replaced (None allowed, e.g. ``train.class_weight: null``); unknown keys fail."""
    raw = params.model_dump()
    for dotted, value in setting.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"tune.space: unknown parameter {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"tune.space: unknown parameter {dotted!r}")
        node[leaf] = value
    return parse_params(raw, "tune.space")


def candidate_settings(space: dict[str, list], n_trials: int, seed: int) -> list[dict[str, Any]]:
    """Every setting of a space no larger than ``n_trials``, else ``n_trials`` distinct settings sampled from it."""
    if not space:
        return [{}]
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tune.space.{key}: give a non-empty list of values to try")
    grid = ParameterGrid(space)
    if len(grid) <= n_trials:
        return list(grid)
    return list(ParameterSampler(space, n_iter=n_trials, random_state=seed))


def tune(
    records: RecordSet,
    params: Params,
    *,
    target: str | None = None,
    cv: int | None = None,
    n_trials: int | None = None,
    track: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Cross-validate every candidate setting of ``params.tune.space`` and rank them by ``target``'s macro-F1."""
    say = progress or log.info
    cfg = params.tune
    target = target or cfg.target or records.targets[0]
    if target not in records.targets:
        raise ConfigError(f"tune target {target!r} is not one of the data's targets {records.targets}")
    cv = cv or cfg.cv
    if cv < 2:
        raise ConfigError(f"tune needs at least 2 cross-validation folds, got {cv}")
    settings = candidate_settings(cfg.space, n_trials or cfg.n_trials, cfg.seed)
    # Validate every setting before the first (long) fit, so a typo fails at once.
    candidates = [(setting, apply_setting(params, setting)) for setting in settings]
    stratify = params.split.stratify_target if params.split.stratify_target in records.targets else None
    track = params.tracking.enabled if track is None else track
    logger = None
    if track:
        from sanshi_ml.tracking import TuningLog

        logger = TuningLog(params, target=target, cv=cv, n_settings=len(candidates))
    trials: list[Trial] = []
    try:
        for number, (setting, trial_params) in enumerate(candidates, start=1):
            say(f"setting {number}/{len(candidates)}: {_describe(setting)}")
            started = time.perf_counter()
            result = cross_validate(
                records,
                lambda p=trial_params: TriageModel(p.text, p.features, p.train),
                cv,
                seed=trial_params.split.seed,
                stratify_target=stratify,
                progress=lambda message: say("  " + message),
            )
            trial = Trial(number, setting, _cv_scores(result), time.perf_counter() - started)
            trials.append(trial)
            s = trial.scores[target]
            say(
                f"  {target} macro-F1 {s['macro_f1_mean']:.4f}, accuracy {s['accuracy_mean']:.4f} "
                f"({trial.seconds:.0f}s)"
            )
            if logger is not None:
                trial.run_id = logger.log_trial(trial, trial_params, result)
    except BaseException:
        if logger is not None:
            logger.finish(None)  # the parent run is marked FAILED; finished trials keep their nested runs
        raise
    ranked = sorted(trials, key=lambda t: t.score(target), reverse=True)
    parent = logger.finish(ranked[0]) if logger is not None else None
    return TuneResult(target, ranked, parent)


def _cv_scores(result: dict) -> dict[str, dict[str, float | None]]:
    out = {}
    for target, metrics in result["targets"].items():
        out[target] = {
            f"{key}_{stat}": metrics[key][stat] for key in ("macro_f1", "accuracy") for stat in ("mean", "std")
        }
    return out


def write_best(result: TuneResult, params: Params, path: str | Path) -> Path:
    """The params with the best setting applied, as a complete params file (``train --params PATH``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = apply_setting(params, result.best.setting)
    s = result.best.scores[result.target]
    header = (
        f"# Written by sanshi-ml tune: the best of {len(result.trials)} settings by {result.target} "
        f"cross-validated macro-F1 {s['macro_f1_mean']:.4f}\n# setting: {result.best.description}\n"
    )
    path.write_text(header + yaml.safe_dump(best.model_dump(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
