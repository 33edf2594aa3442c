"""Does a small ensemble of linear models beat the LinearSVC on fj2? (the accuracy issue's search space)

fj2_segmented, official 7-class category, random stratified 70/30 split (the published protocol), seeds 0-2.
Features: TF-IDF word 1-2-grams of the given segmentation plus character 1-3-grams of the raw text (the best plain
features of the earlier exploration). Models: LinearSVC, logistic regression, SGD with modified Huber loss and
NB-SVM (log-count-ratio features, one LinearSVC per class). An ensemble averages its members' decision values after
standardising each row, so that models on different scales weigh the same. Prints each model's and each
ensemble's macro-F1 per seed and the mean. Uncalibrated heads: this measures the ranking, not the pipeline.

Run: .venv/bin/python benchmarks/linear_ensembles.py   (needs ../shared/data; a few minutes)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC

FJ2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tipdm2020_c" / "fj2_segmented.csv"
ENSEMBLES = {
    "svc+lr": ["svc", "lr"],
    "svc+nbsvm": ["svc", "nbsvm"],
    "svc+lr+nbsvm": ["svc", "lr", "nbsvm"],
    "all four": ["svc", "lr", "sgd", "nbsvm"],
}


def features(docs: list[str], raw: list[str], train: np.ndarray, test: np.ndarray):
    words = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True)
    chars = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    X = sp.hstack([words.fit_transform([docs[i] for i in train]), chars.fit_transform([raw[i] for i in train])])
    T = sp.hstack([words.transform([docs[i] for i in test]), chars.transform([raw[i] for i in test])])
    return X.tocsr(), T.tocsr()


def nbsvm_decisions(X, y, T, classes) -> np.ndarray:
    """One-vs-rest LinearSVC on features scaled by each class's log-count ratio (Wang & Manning 2012)."""
    out = np.zeros((T.shape[0], len(classes)))
    for k, label in enumerate(classes):
        positive = y == label
        p = np.asarray(X[positive].sum(0)).ravel() + 1
        q = np.asarray(X[~positive].sum(0)).ravel() + 1
        ratio = np.log((p / p.sum()) / (q / q.sum()))
        model = LinearSVC(C=0.3).fit(X.multiply(ratio).tocsr(), positive.astype(int))
        out[:, k] = model.decision_function(T.multiply(ratio).tocsr())
    return out


def standardised(decisions: np.ndarray) -> np.ndarray:
    return (decisions - decisions.mean(1, keepdims=True)) / (decisions.std(1, keepdims=True) + 1e-9)


def main() -> int:
    if not FJ2.exists():
        print(f"needs the real data at {FJ2}", file=sys.stderr)
        return 2
    frame = pd.read_csv(FJ2)
    docs = frame["分词文本"].fillna("").tolist()
    raw = [doc.replace(" ", "") for doc in docs]
    y = frame["一级标签"].astype(str).to_numpy()
    scores: dict[str, list[float]] = {}
    for seed in (0, 1, 2):
        train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
        X, T = features(docs, raw, train, test)
        classes = np.unique(y[train])
        decisions = {
            "svc": LinearSVC(C=0.7, class_weight="balanced").fit(X, y[train]).decision_function(T),
            "lr": LogisticRegression(C=20, max_iter=2000, class_weight="balanced")
            .fit(X, y[train])
            .decision_function(T),
            "sgd": SGDClassifier(
                loss="modified_huber", alpha=2e-5, class_weight="balanced", random_state=0, max_iter=50
            )
            .fit(X, y[train])
            .decision_function(T),
            "nbsvm": nbsvm_decisions(X, y[train], T, classes),
        }
        members = {name: [name] for name in decisions} | ENSEMBLES
        for name, parts in members.items():
            predicted = classes[np.argmax(sum(standardised(decisions[p]) for p in parts), axis=1)]
            scores.setdefault(name, []).append(f1_score(y[test], predicted, average="macro"))
        print(f"seed {seed}: " + ", ".join(f"{name} {values[-1]:.4f}" for name, values in scores.items()), flush=True)
    print("mean of 3: " + ", ".join(f"{name} {np.mean(values):.4f}" for name, values in scores.items()))
    best = max(scores, key=lambda name: np.mean(scores[name]))
    print(f"best: {best} ({np.mean(scores[best]):.4f}); goal of the accuracy issue on fj2: 0.94")
    return 0


if __name__ == "__main__":
    sys.exit(main())
