"""Quality benchmark: the project's model against a plain TF-IDF + LinearSVC reference, measured in the same run.

1. fj2_segmented (official 7-class category, 7,796 messages): 3 seeds of a stratified 70/30 split that keeps
   repeated texts together; macro-F1 and accuracy of both models on identical splits.
2. The full training time of the project's model on all fj2 rows (≈8,000 records), against the same budget.
3. petitions (silver labels, 4 targets): per-target macro-F1 of both models, title + text, mean of 3 seeds.

Run: .venv/bin/python benchmarks/quality.py   (needs ../shared/data)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from sanshi_ml.config import load_params
from sanshi_ml.model import TriageModel
from sanshi_ml.records import ColumnMap, load_records, split_indices, subset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PETITION_TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


def reference_model(class_weight=None):
    """Plain TF-IDF word (1,2) + LinearSVC, the published baseline for this data."""
    return make_pipeline(TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2)), LinearSVC(class_weight=class_weight))


def _scores(y_true, y_pred) -> tuple[float, float]:
    y_true, y_pred = np.asarray(y_true, str), np.asarray(y_pred, str)
    return f1_score(y_true, y_pred, average="macro"), accuracy_score(y_true, y_pred)


def fj2_benchmark(params, seeds) -> None:
    records = load_records(SHARED / "tipdm2020_c" / "fj2_segmented.csv",
                           ColumnMap(segmented_col="分词文本", targets={"category": "一级标签"}))
    texts = np.asarray(records.frame["segmented"].tolist(), dtype=object)
    y = records.labels("category")
    ours, ref = [], []
    print(f"fj2_segmented: {len(records)} messages, 7 official classes, stratified 70/30, duplicates kept together")
    for seed in seeds:
        train_idx, test_idx = split_indices(records, 0.3, seed)
        model = TriageModel(params.text, params.features, params.train).fit(subset(records, train_idx),
                                                                           progress=lambda _m: None)
        pred = model.predict_records(subset(records, test_idx))["category"].labels
        ours.append(_scores(y[test_idx], pred))
        reference = reference_model().fit(texts[train_idx], y[train_idx].astype(str))
        ref.append(_scores(y[test_idx], reference.predict(texts[test_idx])))
        print(f"  seed {seed}: sanshi-ml macro-F1 {ours[-1][0]:.4f} acc {ours[-1][1]:.4f} | "
              f"reference macro-F1 {ref[-1][0]:.4f} acc {ref[-1][1]:.4f}")
    o_f1, o_acc = (statistics.mean(v) for v in zip(*ours))
    r_f1, r_acc = (statistics.mean(v) for v in zip(*ref))
    print(f"  mean : sanshi-ml macro-F1 {o_f1:.4f} acc {o_acc:.4f} | reference macro-F1 {r_f1:.4f} acc {r_acc:.4f}"
          f" | ratio {o_f1 / r_f1:.3f}x")
    print(f"  bar  : macro-F1 >= 0.92 and >= reference: {'PASS' if o_f1 >= 0.92 and o_f1 >= r_f1 else 'FAIL'}")

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        TriageModel(params.text, params.features, params.train).fit(records, progress=lambda _m: None)
        timings.append(time.perf_counter() - started)
    ref_times = []
    for _ in range(3):
        started = time.perf_counter()
        reference_model().fit(texts, y.astype(str))
        ref_times.append(time.perf_counter() - started)
    full, ref_full = statistics.median(timings), statistics.median(ref_times)
    print(f"  full training on all {len(records)} rows (median of 3): sanshi-ml {full:.1f}s "
          f"(calibration + threshold probe included), reference {ref_full:.1f}s, ratio {full / ref_full:.1f}x; "
          f"budget 60s: {'PASS' if full < 60 else 'FAIL'}")


def petitions_benchmark(params, seeds) -> None:
    records = load_records(SHARED / "petitions" / "petitions_silver.csv",
                           ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS))
    print(f"\npetitions: {len(records)} messages (silver labels), title + text, stratified on category, 70/30")
    ours = {t: [] for t in PETITION_TARGETS}
    ref = {t: [] for t in PETITION_TARGETS}
    for seed in seeds:
        train_idx, test_idx = split_indices(records, 0.3, seed, "category")
        model = TriageModel(params.text, params.features, params.train).fit(subset(records, train_idx),
                                                                           progress=lambda _m: None)
        test = subset(records, test_idx)
        predictions = model.predict_records(test)
        # The reference sees the same rjieba tokens, joined by spaces, as in the data's README.
        tokens = np.asarray([" ".join(t) for t in model.record_tokens(records)], dtype=object)
        for target in PETITION_TARGETS:
            y = records.labels(target)
            ours[target].append(_scores(y[test_idx], predictions[target].labels))
            reference = reference_model("balanced").fit(tokens[train_idx], y[train_idx].astype(str))
            ref[target].append(_scores(y[test_idx], reference.predict(tokens[test_idx])))
    print(f"  {'target':>9} | sanshi-ml macro-F1  acc | reference macro-F1  acc | ratio")
    for target in PETITION_TARGETS:
        o_f1, o_acc = (statistics.mean(v) for v in zip(*ours[target]))
        r_f1, r_acc = (statistics.mean(v) for v in zip(*ref[target]))
        print(f"  {target:>9} |           {o_f1:.3f} {o_acc:.3f} |           {r_f1:.3f} {r_acc:.3f} | {o_f1 / r_f1:.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-petitions", action="store_true")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"needs the real data at {SHARED}", file=sys.stderr)
        return 2
    params = load_params(REPO / "params.yaml")
    fj2_benchmark(params, args.seeds)
    if not args.skip_petitions:
        petitions_benchmark(params, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
