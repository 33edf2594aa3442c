"""The sanshi-ml command as a user runs it: train, evaluate, predict, and clear errors instead of tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_CSV, REPO

CLI = [str(Path(sys.executable).with_name("sanshi-ml"))]


def run(*args: str, cwd: Path = REPO, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/never-used.db"}
    return subprocess.run(CLI + list(args), cwd=cwd, capture_output=True, text=True, input=stdin, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cli") / "model"
    result = run(
        "train",
        str(DEMO_CSV),
        "--text-cols",
        "标题,诉求内容",
        "--target",
        "sanshi=三事",
        "--target",
        "appeal=诉求类型",
        "--model-dir",
        str(model_dir),
        "--no-track",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    return model_dir, result


def test_train_reports_skips_duplicates_and_metrics(trained):
    model_dir, result = trained
    assert "skipped 2 rows with empty text" in result.stderr
    assert "repeat an earlier text exactly" in result.stderr
    assert "sanshi: accuracy" in result.stdout and "macro-F1" in result.stdout
    assert "trained on all 418 rows" in result.stdout and "figures: out-of-fold estimate" in result.stdout
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert set(meta["targets"]) == {"sanshi", "appeal"} and meta["split"]["seed"] == 3
    assert meta["data"]["n_train"] == meta["targets"]["sanshi"]["n_train"] == 418
    assert meta["metrics_source"] == meta["estimate"]["source"] == "out_of_fold" and meta["holdout"] is None


def test_evaluate_writes_metrics_and_plots_with_cross_validation(trained, tmp_path):
    model_dir, _ = trained
    result = run("evaluate", str(DEMO_CSV), "--model-dir", str(model_dir), "--out", str(tmp_path), "--cv", "3")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The training data: every row is graded by its out-of-fold outcome, the figures train reported.
    assert metrics["source"] == "out_of_fold" and metrics["rows"] == {"out_of_fold": 418, "unseen_rows": 0}
    assert "figures: out-of-fold estimate" in result.stdout
    train_figures = json.loads((model_dir / "metadata.json").read_text())["metrics"]
    assert metrics["targets"]["sanshi"]["macro_f1"] == train_figures["sanshi"]["macro_f1"]
    sanshi = metrics["targets"]["sanshi"]
    assert {"accuracy", "macro_f1", "ece", "coverage_at_threshold", "accuracy_at_threshold", "per_class"} <= set(sanshi)
    assert set(sanshi["per_class"]["家事"]) == {"precision", "recall", "f1", "support"}
    assert "year=2024" in sanshi["slices"] and any(n.startswith("long_text") for n in sanshi["slices"])
    cv = metrics["cv"]["targets"]["sanshi"]["macro_f1"]
    assert len(cv["folds"]) == 3 and cv["std"] is not None
    for kind in ("confusion", "reliability", "coverage"):
        assert (tmp_path / f"sanshi_{kind}.png").stat().st_size > 5_000
    assert "3-fold macro-F1" in result.stdout


def test_predict_prints_suggestions_and_json(trained):
    model_dir, _ = trained
    result = run("predict", "--model-dir", str(model_dir), "A3区青青家园小区公共通道被占用")
    assert result.returncode == 0, result.stderr
    assert "sanshi" in result.stdout and "appeal" in result.stdout
    result = run("predict", "--model-dir", str(model_dir), "--json", "-", stdin="楼上漏水\n邻居噪音\n")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and "colour" in lines[0]["fields"]["sanshi"]["sanshi"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "no/such/file.csv", "--no-track"], "no/such/file.csv: file not found"),
        (
            ["train", str(DEMO_CSV), "--text-cols", "标题,正文", "--target", "sanshi=三事", "--no-track"],
            "missing column(s) '正文'",
        ),
        (["train", str(DEMO_CSV), "--target", "=三事", "--no-track"], "expected NAME=COLUMN"),
        (["predict", "--model-dir", "no/such/model", "小区电梯坏了"], "model directory not found"),
        (["predict", "--model-dir", "no/such/model", "   "], "text 1: empty text"),
        (["evaluate", str(DEMO_CSV), "--model-dir", "x", "--cv", "1"], "--cv needs K ≥ 2"),
    ],
)
def test_bad_input_gets_one_clear_line_and_no_traceback(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_params_key_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 0.1\n", encoding="utf-8")
    result = run("train", str(DEMO_CSV), "--no-track", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key 'train.learning_rate'" in result.stderr
