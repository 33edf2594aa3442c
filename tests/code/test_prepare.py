"""The prepare stage: the prepared Parquet reads back as the same records, so train gets the same data and split."""

import json

import numpy as np
import pandas as pd
import pytest

from sanshi_ml.config import Params, with_overrides
from sanshi_ml.data.records import ColumnMap, RecordError, load_many, load_records, split_indices
from sanshi_ml.stages.prepare import PREPARED_FILE, REPORT_FILE, prepare
from tests.conftest import DEMO_CSV


def _same_records(a, b):
    assert a.content_hash() == b.content_hash()
    pd.testing.assert_frame_equal(
        a.frame.drop(columns="received_at"), b.frame.drop(columns="received_at"), check_dtype=False
    )
    assert (a.frame["received_at"].isna() == b.frame["received_at"].isna()).all()


def test_demo_round_trip_keeps_records_hash_and_split(tmp_path, repo_params):
    report = prepare([DEMO_CSV], repo_params, tmp_path, progress=lambda _m: None)
    cmap = ColumnMap.from_config(repo_params.data.columns)
    direct, prepared = load_records(DEMO_CSV, cmap), load_records(tmp_path / PREPARED_FILE, cmap)
    _same_records(direct, prepared)
    for a, b in zip(split_indices(direct, 0.25, 42, "sanshi"), split_indices(prepared, 0.25, 42, "sanshi")):
        np.testing.assert_array_equal(a, b)
    saved = json.loads((tmp_path / REPORT_FILE).read_text(encoding="utf-8"))
    assert saved["data_sha256"] == report["data_sha256"] == direct.content_hash()
    assert saved["rows"] == len(direct) == 418  # the demo's two rows with no title and no text are left out
    assert saved["load_report"]["empty_text"] == 2
    assert sum(saved["labels"]["sanshi"].values()) == 418


def test_several_exports_without_ids_or_times_and_three_text_columns(tmp_path):
    """A feedback export joined to the original: generated row ids survive, extra text columns stay joined."""
    columns = {"text_cols": ["主题", "内容", "补充"], "targets": {"sanshi": "三事"}, "id_col": None, "time_col": None}
    params = with_overrides(Params(), {"data.columns": columns})
    first = tmp_path / "a.csv"
    first.write_text(
        "主题,内容,补充,三事\n电梯坏了,一个月没修,,共事\n,,,家事\n噪音,楼上 吵,请处理,家事\n", encoding="utf-8"
    )
    second = tmp_path / "b.jsonl"
    second.write_text(
        '{"主题": "路灯", "内容": "不亮", "补充": "", "三事": "公事"}\n'
        '{"主题": "漏水", "内容": "", "补充": "楼上", "三事": null}\n',
        encoding="utf-8",
    )
    out = tmp_path / "prepared"
    prepare([first, second], params, out, progress=lambda _m: None)
    cmap = ColumnMap.from_config(params.data.columns)
    direct = load_many([first, second], cmap)
    prepared = load_records(out / PREPARED_FILE, cmap)
    _same_records(direct, prepared)
    assert prepared.frame["id"].tolist() == ["row1", "row3", "row1", "row2"]
    assert prepared.frame["text"].tolist() == ["一个月没修", "楼上 吵\n请处理", "不亮", "楼上"]
    assert pd.isna(prepared.frame["sanshi"].iloc[-1]) and prepared.report.missing_labels == {"sanshi": 1}


def test_a_broken_export_fails_in_prepare_naming_file_and_column(tmp_path, repo_params):
    bad = tmp_path / "bad.csv"
    bad.write_text("工单编号,标题\nD1,电梯\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.csv: missing column\(s\) '受理时间', '诉求内容'"):
        prepare([bad], repo_params, tmp_path / "out", progress=lambda _m: None)
    assert not (tmp_path / "out" / PREPARED_FILE).exists()
