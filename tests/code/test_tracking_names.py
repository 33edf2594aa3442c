"""Tracking details that need no MLflow store: which URI is used, metric names MLflow accepts, flattened params."""

from pathlib import Path

import pytest
from mlflow.utils.validation import _validate_metric_name

from sanshi_ml.config import Params, with_overrides
from sanshi_ml.tracking import TrackingError, flatten_params, metric_key, run_metrics, tracking_uri


def test_uri_precedence_params_then_environment_then_local_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(Params()) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere/runs.db")
    assert tracking_uri(Params()) == f"sqlite:///{tmp_path.resolve() / 'elsewhere' / 'runs.db'}"
    params = with_overrides(Params(), {"tracking.uri": "sqlite:////srv/mlflow/store.db"})
    assert tracking_uri(params) == "sqlite:////srv/mlflow/store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(Params()) == "http://127.0.0.1:5000"


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:///tmp/mlruns"])
def test_the_deprecated_file_store_is_refused(uri):
    with pytest.raises(TrackingError, match="file store"):
        tracking_uri(with_overrides(Params(), {"tracking.uri": uri}))


@pytest.mark.parametrize(
    "parts, expected",
    [
        (("category", "f1", "城乡建设"), "category.f1.城乡建设"),
        (("unit", "f1", "社区居委会/村委会"), "unit.f1.社区居委会/村委会"),
        (("category", "slice", "short_text(<50 chars)", "accuracy"), "category.slice.short_text__50 chars_.accuracy"),
        (("category", "slice", "year=2023", "n"), "category.slice.year_2023.n"),
        (("unit", "f1", "/a//b/"), "unit.f1./a/b"),
    ],
)
def test_metric_names_are_accepted_by_mlflow(parts, expected):
    key = metric_key(*parts)
    assert key == expected
    _validate_metric_name(key)  # raises on a name MLflow would reject


def test_odd_labels_still_give_valid_names():
    for label in ["..", ".", "a/../b", " ", "", "50%", "x:y", "a\tb", "家事/", "/公事"]:
        _validate_metric_name(metric_key("unit", "f1", label))


def test_run_metrics_are_per_target_per_class_and_skip_missing_values():
    metrics = {
        "sanshi": {
            "accuracy": 0.9,
            "macro_f1": 0.8,
            "accuracy_at_threshold": None,
            "ece": float("nan"),
            "n": 10,
            "per_class": {"公事": {"f1": 0.7, "precision": 0.6, "recall": 0.8, "support": 4}},
            "slices": {"year=2024": {"accuracy": 0.5, "macro_f1": 0.4, "n": 2}},
        }
    }
    flat = run_metrics(metrics)
    assert flat["sanshi.accuracy"] == 0.9 and flat["sanshi.f1.公事"] == 0.7 and flat["sanshi.support.公事"] == 4
    assert flat["sanshi.slice.year_2024.macro_f1"] == 0.4
    assert "sanshi.accuracy_at_threshold" not in flat and "sanshi.ece" not in flat


def test_params_are_flattened_with_dotted_keys():
    flat = flatten_params(with_overrides(Params(), {"train.C": 0.3}))
    assert flat["train.C"] == "0.3"
    assert flat["data.columns.targets.sanshi"] == "三事"
    assert flat["data.columns.text_cols"] == '["标题", "诉求内容"]'
    assert flat["tracking.uri"] == "null"
    assert all(isinstance(v, str) for v in flat.values())


def test_importing_tracking_sets_no_tracking_uri(tmp_path):
    """Nothing happens at import: a fresh interpreter importing the module leaves MLflow's URI unset."""
    import subprocess
    import sys

    code = (
        "import mlflow.tracking._tracking_service.utils as u; import sanshi_ml.tracking; print(u._tracking_uri is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.strip() == "True"
    assert not (Path(tmp_path) / "mlflow.db").exists()
