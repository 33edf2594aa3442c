"""Evaluation: per-target and per-class metrics, calibration (ECE before and after calibration), accuracy and
coverage at the review threshold, selective prediction (risk–coverage area, accuracy at fixed coverages, coverage at
fixed accuracies), conformal prediction sets, per-slice metrics, K-fold cross-validation, and the plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from sanshi_ml.core.calibration import choose_threshold, label_columns
from sanshi_ml.core.model import TargetPredictions, TriageModel
from sanshi_ml.data.records import RecordSet, fold_indices, subset
from sanshi_ml.evaluation.plotting import pyplot

log = logging.getLogger(__name__)

SHORT_TEXT_CHARS = 50
RARE_CLASS_SHARE = 0.05
HEADLINE_KEYS = ("accuracy", "macro_f1", "ece", "coverage_at_threshold", "accuracy_at_threshold", "aurc")
SELECTIVE_COVERAGES = (0.8, 0.9)  # accuracy of the most confident 80% and 90% of predictions
SELECTIVE_ACCURACIES = (0.95, 0.98)  # the largest share of predictions that can be accepted at 95% and 98% accuracy


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins, weighted by size."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> list[dict]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = bins == b
        rows.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "count": int(in_bin.sum()),
                "confidence": float(confidence[in_bin].mean()) if in_bin.any() else None,
                "accuracy": float(correct[in_bin].mean()) if in_bin.any() else None,
            }
        )
    return rows


def coverage_curve(confidence: np.ndarray, correct: np.ndarray, points: int = 21) -> list[dict]:
    """Accuracy of the most confident predictions, at coverages from 5% to 100%."""
    order = np.argsort(-confidence, kind="stable")
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    out = []
    for coverage in np.linspace(0.05, 1.0, points - 1):
        k = max(1, int(round(coverage * len(order))))
        out.append(
            {
                "coverage": float(k / len(order)),
                "accuracy": float(cum_acc[k - 1]),
                "threshold": float(confidence[order][k - 1]),
            }
        )
    return out


def _expected_correct(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Correctness in order of falling confidence, each run of equal confidences replaced by its mean: the expected
    value when ties are broken at random, so the curves below do not depend on the order of tied rows."""
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    hits = correct[order].astype(float)
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    sums = np.add.reduceat(hits, starts)
    sizes = np.diff(np.r_[starts, len(conf)])
    return np.repeat(sums / sizes, sizes)


def selective_metrics(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """Selective prediction: accept the most confident predictions first and measure what that buys.

    - ``aurc``: area under the risk–coverage curve, i.e. the selective risk (error rate of the accepted
      predictions) averaged over every coverage 1/n, 2/n, …, 1. Lower is better; ``aurc_optimal`` is the area a
      perfect ranking (every error last) would reach with the same errors, so ``aurc - aurc_optimal`` is what the
      confidence ranking loses.
    - ``accuracy_at_coverage``: accuracy of the most confident 80% / 90% of predictions.
    - ``coverage_at_accuracy``: the largest share of predictions, most confident first and never splitting equal
      confidences, whose accuracy is at least 95% / 98% (the rule that chooses the review threshold, applied to these
      rows); 0 when no prefix reaches it.
    """
    n = len(confidence)
    if n == 0:
        return {"aurc": None, "aurc_optimal": None, "accuracy_at_coverage": {}, "coverage_at_accuracy": {}}
    correct = np.asarray(correct, dtype=bool)
    ranks = np.arange(1, n + 1)
    risk = 1.0 - np.cumsum(_expected_correct(confidence, correct)) / ranks
    optimal = 1.0 - np.minimum(ranks, correct.sum()) / ranks
    accuracy_at = {}
    for coverage in SELECTIVE_COVERAGES:
        k = max(1, int(np.ceil(coverage * n - 1e-9)))
        accuracy_at[str(coverage)] = float(1.0 - risk[k - 1])
    coverage_at = {
        str(level): float(choose_threshold(confidence, correct, level)["holdout_coverage"])
        for level in SELECTIVE_ACCURACIES
    }
    return {
        "aurc": float(risk.mean()),
        "aurc_optimal": float(optimal.mean()),
        "accuracy_at_coverage": accuracy_at,
        "coverage_at_accuracy": coverage_at,
    }


def conformal_metrics(y_true: np.ndarray, pred: TargetPredictions) -> dict | None:
    """How the conformal prediction sets behave on labelled rows; None for a model without sets.

    ``coverage`` is the share of rows whose set holds the true label (the level is the promise); ``mean_set_size``,
    ``single_label_share`` and ``empty_share`` say how informative the sets are, and ``accuracy_when_single`` how often
    the one label of a single-label set is right.
    """
    plausible = pred.plausible
    if plausible is None or len(y_true) == 0:
        return None
    true_column = label_columns(pred.classes, y_true)
    known = true_column >= 0
    covered = np.zeros(len(y_true), dtype=bool)
    covered[known] = plausible[np.flatnonzero(known), true_column[known]]
    size = plausible.sum(axis=1)
    single = size == 1
    return {
        "level": pred.conformal.level,
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "single_label_share": float(single.mean()),
        "empty_share": float((size == 0).mean()),
        "accuracy_when_single": float(covered[single].mean()) if single.any() else None,
        "n_calibration": pred.conformal.n_calibration,
    }


def target_metrics(
    y_true: np.ndarray, pred: TargetPredictions, n_bins: int = 10, uncalibrated: TargetPredictions | None = None
) -> dict:
    """Everything metrics.json holds for one target.

    ``uncalibrated``: the same rows' predictions before calibration (softmax of the LinearSVC's decision values),
    for ``ece_uncalibrated`` and the "before" curve of the reliability diagram.
    """
    y_true = np.asarray(y_true, dtype=object).astype(str)
    y_pred = pred.labels.astype(str)
    correct = y_true == y_pred
    confidence = pred.confidence
    labels = sorted(set(y_true) | set(pred.classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    accepted = ~pred.needs_review
    unseen = sorted(set(y_true) - set(pred.classes))
    before = {}
    if uncalibrated is not None:
        raw_correct = y_true == uncalibrated.labels.astype(str)
        before = {
            "ece_uncalibrated": expected_calibration_error(uncalibrated.confidence, raw_correct, n_bins),
            "reliability_uncalibrated": reliability_table(uncalibrated.confidence, raw_correct, n_bins),
        }
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "threshold": float(pred.threshold),
        "coverage_at_threshold": float(accepted.mean()),
        "accuracy_at_threshold": float(correct[accepted].mean()) if accepted.any() else None,
        "n_accepted": int(accepted.sum()),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "labels_unknown_to_model": unseen,
        "reliability": reliability_table(confidence, correct, n_bins),
        **before,
        **selective_metrics(confidence, correct),
        "conformal": conformal_metrics(y_true, pred),
        "coverage_curve": coverage_curve(confidence, correct),
    }


def slice_metrics(records: RecordSet, target: str, pred: TargetPredictions) -> dict:
    """Accuracy and macro-F1 on slices a single number hides: short texts, rare classes, each year."""
    y_true = records.labels(target).astype(str)
    y_pred = pred.labels.astype(str)
    lengths = (records.frame["title"].str.len() + records.frame["text"].str.len()).to_numpy()
    shares = pd.Series(y_true).value_counts(normalize=True)
    rare = set(shares.index[shares < RARE_CLASS_SHARE])
    slices = {
        f"short_text(<{SHORT_TEXT_CHARS} chars)": lengths < SHORT_TEXT_CHARS,
        f"long_text(>={SHORT_TEXT_CHARS} chars)": lengths >= SHORT_TEXT_CHARS,
        f"rare_classes(<{RARE_CLASS_SHARE:.0%} of rows)": np.isin(y_true, list(rare)),
    }
    years = records.frame["received_at"].dt.year
    for year in sorted(years.dropna().unique()):
        slices[f"year={int(year)}"] = (years == year).to_numpy()
    out = {}
    for name, mask in slices.items():
        if mask.sum() == 0:
            continue
        out[name] = {
            "n": int(mask.sum()),
            "accuracy": float((y_true[mask] == y_pred[mask]).mean()),
            "macro_f1": float(
                f1_score(y_true[mask], y_pred[mask], labels=sorted(set(y_true[mask])), average="macro", zero_division=0)
            ),
        }
    return out


def evaluate_model(
    model: TriageModel,
    records: RecordSet,
    n_bins: int = 10,
    predictions: dict[str, TargetPredictions] | None = None,
    features: sp.csr_matrix | None = None,
    uncalibrated: dict[str, TargetPredictions] | None = None,
) -> dict:
    """Metrics for every target the model and the records share, on the rows that carry that label.

    ``predictions`` and ``uncalibrated`` (the predictions before calibration) may come from elsewhere, such as the
    out-of-fold estimate; whatever is missing, the model computes. ``features`` (the records' feature matrix, if
    the caller has it) saves transforming the texts again.
    """
    if predictions is None or uncalibrated is None:
        if features is None:
            features = model.record_features(records)
        if predictions is None:
            predictions = model.predict_features(features)
        if uncalibrated is None:
            uncalibrated = {
                name: TargetPredictions(model.heads[name].classes, proba, model.heads[name].threshold)
                for name, proba in model.uncalibrated_proba(features).items()
            }
    out = {}
    for target in model.targets:
        if target not in records.frame:
            continue
        labels = records.labels(target)
        has = records.has_label(target)
        if not has.any():
            continue
        sub_pred = predictions[target].rows(has)
        metrics = target_metrics(labels[has], sub_pred, n_bins, uncalibrated[target].rows(has))
        metrics["slices"] = slice_metrics(subset(records, np.flatnonzero(has)), target, sub_pred)
        out[target] = metrics
    return out


def headline(metrics: dict) -> dict:
    """The few numbers per target worth a glance (and worth logging to MLflow)."""
    return {target: {k: m.get(k) for k in HEADLINE_KEYS} for target, m in metrics.items()}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(metrics: dict) -> list[str]:
    lines = []
    for target, m in metrics.items():
        at = m["accuracy_at_threshold"]
        lines.append(
            f"{target:>10}: accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  ECE {m['ece']:.3f}  "
            f"| auto-accepted {m['coverage_at_threshold']:.0%} at {at if at is None else round(at, 3)} "
            f"accuracy (threshold {m['threshold']:.2f})  n={m['n']}"
        )
        if "aurc" not in m:
            continue
        acc_at, cov_at = m.get("accuracy_at_coverage", {}), m.get("coverage_at_accuracy", {})
        line = (
            f"{'':>10}  ECE before calibration {_fmt(m.get('ece_uncalibrated'))}  AURC {_fmt(m['aurc'], '.4f')}"
            "  | accuracy at coverage "
            + " ".join(f"{float(c):.0%}: {_fmt(v)}" for c, v in acc_at.items())
            + "  | coverage at accuracy "
            + " ".join(f"{float(a):.0%}: {_fmt(v, '.1%')}" for a, v in cov_at.items())
        )
        conformal = m.get("conformal")
        if conformal:
            line += (
                f"  | {conformal['level']:.0%} sets: coverage {conformal['coverage']:.3f}, mean size "
                f"{conformal['mean_set_size']:.2f}, single-label {conformal['single_label_share']:.1%}"
            )
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------------- cross-validation


def cross_validate(
    records: RecordSet,
    make_model: Callable[[], TriageModel],
    k: int,
    seed: int = 42,
    stratify_target: str | None = None,
    n_bins: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """K-fold results (duplicates kept together): each headline metric's per-fold values, mean and spread."""
    say = progress or log.info
    folds = fold_indices(records, k, seed, stratify_target)
    per_fold: list[dict] = []
    for number, (train_idx, test_idx) in enumerate(folds, start=1):
        model = make_model().fit(subset(records, train_idx), progress=lambda _msg: None)
        metrics = evaluate_model(model, subset(records, test_idx), n_bins)
        per_fold.append(headline(metrics))
        say(f"fold {number}/{k}: " + ", ".join(f"{t} macro-F1 {m['macro_f1']:.3f}" for t, m in metrics.items()))
    out: dict = {"k": k, "seed": seed, "targets": {}}
    for target in per_fold[0]:
        out["targets"][target] = {}
        for key in HEADLINE_KEYS:
            values = np.array([fold[target][key] for fold in per_fold if fold[target][key] is not None], float)
            out["targets"][target][key] = {
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "folds": values.tolist(),
            }
    return out


# -------------------------------------------------------------------------------------------------------------- plots


def plot_confusion(y_true: np.ndarray, pred: TargetPredictions, title: str, path: Path) -> None:
    plt = pyplot()
    labels = list(pred.classes)
    matrix = confusion_matrix(np.asarray(y_true).astype(str), pred.labels.astype(str), labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    size = max(5.0, 0.45 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(labels) <= 16:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("预测 (predicted)")
    ax.set_ylabel("实际 (true)")
    ax.set_title(f"{title}: 混淆矩阵 (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(metrics: dict, title: str, path: Path) -> None:
    """The reliability diagram: accuracy against confidence per bin, after calibration and (if measured) before it,
    with each bin's row count."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    curves = [("reliability", f"calibrated (ECE {metrics['ece']:.3f})", "tab:blue", "o")]
    if metrics.get("reliability_uncalibrated"):
        curves.insert(
            0,
            (
                "reliability_uncalibrated",
                f"uncalibrated softmax (ECE {metrics['ece_uncalibrated']:.3f})",
                "tab:orange",
                "s",
            ),
        )
    for key, label, colour, marker in curves:
        rows = [r for r in metrics[key] if r["count"]]
        ax.plot(
            [r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker=marker, color=colour, label=label
        )
        for r in rows:
            ax.annotate(
                str(r["count"]),
                (r["confidence"], r["accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, -9),
                color=colour,
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("置信度 (confidence)")
    ax.set_ylabel("准确率 (accuracy)")
    ax.set_title(f"{title}: 可靠性图 校准前后 (before/after calibration)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage(metrics: dict, title: str, path: Path) -> None:
    plt = pyplot()
    curve = metrics["coverage_curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], marker=".", label="most confident first")
    if metrics["accuracy_at_threshold"] is not None:
        ax.scatter(
            [metrics["coverage_at_threshold"]],
            [metrics["accuracy_at_threshold"]],
            color="red",
            zorder=3,
            label=f"review threshold {metrics['threshold']:.2f}",
        )
    ax.set_xlabel("自动接受比例 (coverage)")
    ax.set_ylabel("准确率 (accuracy)")
    ax.set_xlim(0, 1.02)
    aurc = metrics.get("aurc")
    ax.set_title(f"{title}: 覆盖率-准确率曲线" + (f"  AURC={aurc:.4f}" if aurc is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    metrics: dict,
    records: RecordSet,
    predictions: dict[str, TargetPredictions],
    out_dir: str | Path,
    extra: dict | None = None,
) -> Path:
    """Write ``metrics.json`` and, per target, the confusion matrix, reliability diagram and coverage curve."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for target, m in metrics.items():
        labels = records.labels(target)
        has = records.has_label(target)
        plot_confusion(labels[has], predictions[target].rows(has), target, out_dir / f"{target}_confusion.png")
        plot_reliability(m, target, out_dir / f"{target}_reliability.png")
        plot_coverage(m, target, out_dir / f"{target}_coverage.png")
        pd.DataFrame(m["coverage_curve"]).to_csv(out_dir / f"{target}_coverage.csv", index=False)
    payload = {"targets": metrics, **(extra or {})}
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
