"""Shared fixtures: paths to the demo and real data, and models trained once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanshi_ml.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SANSHI_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_CSV = REPO / "data" / "demo" / "records.csv"
PETITIONS_CSV = SHARED_DATA / "petitions" / "petitions_silver.csv"
FJ2_CSV = SHARED_DATA / "tipdm2020_c" / "fj2_segmented.csv"
PETITION_TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


def require(path: Path) -> Path:
    """Skip (or, in CI with SANSHI_REQUIRE_REAL_DATA=1, fail) when a real-data file is absent."""
    if path.exists():
        return path
    reason = (
        f"real data not found at {path}: these tests read ../shared/data beside the repository "
        "(set SANSHI_SHARED_DATA to point elsewhere)"
    )
    if os.environ.get("SANSHI_REQUIRE_REAL_DATA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def petitions_csv() -> Path:
    return require(PETITIONS_CSV)


@pytest.fixture(scope="session")
def fj2_csv() -> Path:
    return require(FJ2_CSV)


@pytest.fixture(scope="session")
def repo_params() -> Params:
    """params.yaml of the repository, with MLflow tracking off (tests that track set their own store)."""
    params = load_params(REPO / "params.yaml")
    params.tracking.enabled = False
    return params


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory, repo_params) -> Path:
    """A model trained once per run on the demo data with the repository's params."""
    from sanshi_ml.stages.train import train

    out = tmp_path_factory.mktemp("demo_model")
    train([DEMO_CSV], repo_params, model_dir=out, progress=lambda _m: None, track=False)
    return out


@pytest.fixture(scope="session")
def petitions_model_dir(tmp_path_factory, petitions_csv, repo_params) -> Path:
    """A model trained once per run on the real petitions data (title + text, all four targets)."""
    from sanshi_ml.config import with_overrides
    from sanshi_ml.stages.train import train

    params = with_overrides(
        repo_params,
        {
            "data.columns": {
                "id_col": "留言编号",
                "text_cols": ["留言主题", "留言详情"],
                "time_col": "留言时间",
                "segmented_col": None,
                "targets": PETITION_TARGETS,
            },
            "split.stratify_target": "category",
        },
    )
    out = tmp_path_factory.mktemp("petitions_model")
    train([petitions_csv], params, model_dir=out, progress=lambda _m: None, track=False)
    return out
