"""Calibration, selective prediction and conformal prediction sets on the real data, one 70/30 split each.

fj2_segmented (official 7-class category) and petitions (silver labels, 4 targets, title + text); stratified 70/30
split with seed 0 that keeps repeated texts together; the model trained with params.yaml on the 70%, measured on the
30% it never saw. Per target: macro-F1, ECE before calibration (softmax of the LinearSVC's decision values) and
after, AURC, accuracy at 80% / 90% coverage, coverage at 95% / 98% accuracy, and the conformal sets' empirical
coverage, mean size and single-label share. ``--variants`` compares train settings on the same split (each
variant is ``key=value[,key=value]`` of the train section, ``-`` for params.yaml as it is); ``--out DIR`` writes
each run's metrics.json and plots.

Run: nice -n 15 .venv/bin/python benchmarks/selective.py --variants - calibration=isotonic recalibrate=temperature
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sanshi_ml.config import load_params
from sanshi_ml.core.model import TriageModel
from sanshi_ml.data.records import ColumnMap, load_records, split_indices, subset
from sanshi_ml.evaluation.metrics import evaluate_model, write_report

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PETITION_TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


def datasets() -> dict[str, tuple]:
    return {
        "fj2": (
            lambda: load_records(
                SHARED / "tipdm2020_c" / "fj2_segmented.csv",
                ColumnMap(segmented_col="分词文本", targets={"category": "一级标签"}),
            ),
            "category",
        ),
        "petitions": (
            lambda: load_records(
                SHARED / "petitions" / "petitions_silver.csv",
                ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS),
            ),
            "category",
        ),
    }


def row(name: str, target: str, m: dict) -> str:
    conformal = m.get("conformal") or {}
    acc, cov = m["accuracy_at_coverage"], m["coverage_at_accuracy"]
    return (
        f"| {name} | {target} | {m['macro_f1']:.3f} | {m['ece_uncalibrated']:.3f} | {m['ece']:.3f} | "
        f"{m['aurc']:.4f} | {acc['0.8']:.3f} | {acc['0.9']:.3f} | {cov['0.95']:.1%} | {cov['0.98']:.1%} | "
        f"{conformal.get('coverage', float('nan')):.3f} | {conformal.get('mean_set_size', float('nan')):.2f} | "
        f"{conformal.get('single_label_share', float('nan')):.1%} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["fj2", "petitions"], choices=["fj2", "petitions"])
    parser.add_argument("--variants", nargs="+", default=["-"], help="train settings, e.g. calibration=isotonic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"needs the real data at {SHARED}", file=sys.stderr)
        return 2
    params = load_params(REPO / "params.yaml")
    print(
        "| data | target | macro-F1 | ECE before | ECE after | AURC | acc@80% cov | acc@90% cov | cov@95% acc "
        "| cov@98% acc | set coverage | mean set size | single-label |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.data:
        load, stratify = datasets()[name]
        records = load()
        train_idx, test_idx = split_indices(records, 0.3, args.seed, stratify)
        test = subset(records, test_idx)
        for variant in args.variants:
            update = dict(item.split("=", 1) for item in variant.split(",")) if variant != "-" else {}
            train_cfg = params.train.model_validate({**params.train.model_dump(), **update})
            model = TriageModel(params.text, params.features, train_cfg).fit(
                subset(records, train_idx), progress=lambda _m: None
            )
            metrics = evaluate_model(model, test, params.evaluate.reliability_bins)
            label = f"{name} ({variant})" if variant != "-" else name
            for target, m in metrics.items():
                print(row(label, target, m), flush=True)
            if args.out:
                write_report(
                    metrics,
                    test,
                    model.predict_records(test),
                    args.out / f"{name}_{variant.replace('=', '-').replace(',', '_')}",
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
