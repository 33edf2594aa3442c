"""The archive report: counts that add up, months from received_at, review shares, and charts that are written."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sanshi_ml.data.records import RecordError
from sanshi_ml.scoring import score
from sanshi_ml.stages.report import report
from tests.conftest import DEMO_CSV


@pytest.fixture(scope="module")
def scored(tmp_path_factory, demo_model_dir):
    path = tmp_path_factory.mktemp("scored") / "demo.parquet"
    score([DEMO_CSV], demo_model_dir, path, chunk_size=100, jobs=1, progress=False)
    return path


@pytest.fixture(scope="module")
def written(scored, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report(scored, out, top_units=5), out


def read(out, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, encoding="utf-8-sig", dtype={"month": str})


def test_counts_add_up_to_the_scored_records(written, scored):
    result, out = written
    frame = pd.read_parquet(scored)
    ok = frame[frame["status"] == "ok"]
    assert result.rows == len(frame) == 420 and result.scored == len(ok)
    for target in ("category", "sanshi", "unit", "appeal"):
        counts = read(out, f"counts_{target}.csv")
        assert counts["records"].sum() == len(ok)
        assert dict(zip(counts["label"], counts["records"])) == ok[target].value_counts().to_dict()
        flagged = ok.loc[ok[f"{target}_needs_review"].astype(bool), target].value_counts()
        assert dict(zip(counts["label"], counts["needs_review"])) == {
            label: int(flagged.get(label, 0)) for label in counts["label"]
        }
        assert counts["share"].sum() == pytest.approx(1.0)
    status = read(out, "status.csv")
    assert dict(zip(status["status"], status["records"])) == frame["status"].value_counts().to_dict()


def test_months_come_from_received_at_and_split_by_sanshi(written, scored):
    _, out = written
    frame = pd.read_parquet(scored)
    months = read(out, "counts_month.csv")
    expected = frame["received_at"].dt.strftime("%Y-%m").value_counts()
    assert dict(zip(months["month"], months["records"])) == expected.to_dict()
    ok = frame[frame["status"] == "ok"]
    classes = [c for c in ("公事", "共事", "家事") if c in months.columns]
    assert classes and (months[classes].sum(axis=1) <= months["records"]).all()
    assert months[classes].to_numpy().sum() == len(ok)
    january = ok[ok["received_at"].dt.strftime("%Y-%m") == months["month"].iloc[0]]
    assert months.iloc[0]["公事"] == (january["sanshi"] == "公事").sum()


def test_review_share_per_target_and_for_any(written, scored):
    _, out = written
    ok = pd.read_parquet(scored).query("status == 'ok'")
    review = read(out, "review.csv").set_index("target")
    flags = ok[[f"{t}_needs_review" for t in ("category", "sanshi", "unit", "appeal")]].astype(bool)
    assert review.loc["unit", "needs_review"] == flags["unit_needs_review"].sum()
    assert review.loc["any", "needs_review"] == flags.any(axis=1).sum()
    assert review.loc["any", "share"] == pytest.approx(flags.any(axis=1).mean())


def test_top_units_and_charts_are_written(written):
    result, out = written
    units = read(out, "top_units.csv")
    assert len(units) == 5 and units["records"].is_monotonic_decreasing
    assert (units[["公事", "共事", "家事"]].sum(axis=1) == units["records"]).all()
    assert {p.name for p in result.png} == {"monthly_sanshi.png", "top_units.png", "review_share.png"}
    for png in result.png:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_dask_style_directory_and_a_csv_give_the_same_counts(scored, tmp_path):
    table = pq.read_table(scored)
    parts = tmp_path / "dask.parquet"
    parts.mkdir()
    pq.write_table(table.slice(0, 200), parts / "part.0.parquet")
    pq.write_table(table.slice(200), parts / "part.1.parquet")
    table.to_pandas().to_csv(tmp_path / "scored.csv", index=False, encoding="utf-8-sig")
    report(parts, tmp_path / "a")
    report(tmp_path / "scored.csv", tmp_path / "b")
    for name in ("counts_sanshi.csv", "counts_month.csv", "review.csv"):
        pd.testing.assert_frame_equal(read(tmp_path / "a", name), read(tmp_path / "b", name))


def test_not_a_scored_archive_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(RecordError, match="not a scored archive"):
        report(tmp_path / "plain.parquet", tmp_path / "out")
    with pytest.raises(RecordError, match="not found"):
        report(tmp_path / "missing.parquet", tmp_path / "out")
