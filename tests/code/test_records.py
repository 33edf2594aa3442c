"""Loaders, column mapping, validation and the duplicate-aware split."""

import numpy as np
import pandas as pd
import pytest

from sanshi_ml.data.records import (
    ColumnMap,
    RecordError,
    fold_indices,
    load_many,
    load_records,
    read_table,
    split_indices,
)

CMAP = ColumnMap(text_cols=("主题", "内容"), targets={"category": "类别", "sanshi": "三事分类"})


def _frame(n: int = 40) -> pd.DataFrame:
    rows = []
    for i in range(n):
        kind = ["公事", "共事", "家事"][i % 3]
        rows.append(
            {
                "工单编号": f"W{i:03d}",
                "主题": f"标题{i}",
                "内容": f"第{i}条{kind}诉求内容，小区电梯",
                "受理时间": f"2024/{i % 12 + 1}/3 9:05:00",
                "类别": ["城乡建设", "环境保护"][i % 2],
                "三事分类": kind,
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".xlsx", ".parquet", ".jsonl"])
def test_every_format_loads_with_any_column_names(tmp_path, suffix):
    frame = _frame()
    path = tmp_path / f"export{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".xlsx":
        frame.to_excel(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    records = load_records(path, CMAP)
    assert len(records) == 40
    assert records.frame["id"].iloc[0] == "W000"  # 工单编号 recognised as the id without being named
    assert records.frame["title"].iloc[1] == "标题1"
    assert records.frame["received_at"].dt.month.iloc[2] == 3
    assert set(records.frame["sanshi"]) == {"公事", "共事", "家事"}


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "export.csv"
    _frame().drop(columns=["三事分类"]).to_csv(path, index=False)
    with pytest.raises(RecordError, match=r"export\.csv: missing column\(s\) '三事分类'"):
        load_records(path, CMAP)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", b"", "file is empty"),
        ("garbage.xlsx", b"this is not a spreadsheet", "cannot be read as xlsx"),
        ("garbage.parquet", b"PAR1 nope", "cannot be read as parquet"),
        ("records.txt.gz", b"x", "unsupported file type"),
        (
            "broken.json",
            b'{"a": [1, 2',
            "cannot be read as json",
        ),  # a broken JSON-lines line is a malformed row instead
    ],
)
def test_unreadable_files_get_an_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordError, match=message) as error:
        read_table(path)
    assert name in str(error.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RecordError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(RecordError, match="is a directory"):
        read_table(tmp_path)


def test_empty_texts_are_reported_and_skipped_never_silently_dropped(tmp_path):
    frame = _frame()
    frame.loc[[3, 7], ["主题", "内容"]] = ["", "   "], ["", None]
    path = tmp_path / "export.csv"
    frame.to_csv(path, index=False)
    records = load_records(path, CMAP)
    assert len(records) == 38
    assert records.report.empty_text_ids == ["W003", "W007"]
    assert any("skipped 2 rows with empty text" in line and "W003" in line for line in records.report.lines())


def test_duplicates_are_reported_and_never_split(tmp_path):
    frame = _frame(60)
    frame.loc[10:19, ["主题", "内容"]] = ["重复标题", "完全相同的诉求内容"]
    path = tmp_path / "export.csv"
    frame.to_csv(path, index=False)
    records = load_records(path, CMAP)
    assert records.report.duplicate_rows == 9 and records.report.duplicate_groups == 1
    for seed in range(5):
        train, test = split_indices(records, 0.3, seed)
        assert not set(records.frame["group"].iloc[train]) & set(records.frame["group"].iloc[test])
        assert len(train) + len(test) == len(records)
    for train, test in fold_indices(records, 3, seed=0):
        assert not set(records.frame["group"].iloc[train]) & set(records.frame["group"].iloc[test])


def test_split_is_stratified(tmp_path):
    path = tmp_path / "export.csv"
    _frame(300).to_csv(path, index=False)
    records = load_records(path, CMAP)
    _, test = split_indices(records, 0.2, 0, "sanshi")
    shares = records.frame["sanshi"].iloc[test].value_counts(normalize=True)
    assert np.allclose(shares.to_numpy(), 1 / 3, atol=0.02)
    assert len(test) == 60


def test_missing_labels_are_counted_per_target(tmp_path):
    frame = _frame()
    frame.loc[[1, 2], "类别"] = ""
    path = tmp_path / "export.csv"
    frame.to_csv(path, index=False)
    records = load_records(path, CMAP)
    assert records.report.missing_labels == {"category": 2, "sanshi": 0}


def test_ids_default_to_row_numbers_and_pre_segmented_column(tmp_path):
    path = tmp_path / "seg.csv"
    pd.DataFrame({"分词文本": ["小区 电梯 坏", "", "噪音 扰民"], "标签": ["a", "b", "a"]}).to_csv(path, index=False)
    records = load_records(path, ColumnMap(segmented_col="分词文本", targets={"label": "标签"}))
    assert records.segmented
    assert records.frame["id"].tolist() == ["row1", "row3"]
    assert records.model_texts == ["小区 电梯 坏", "噪音 扰民"]


def test_several_exports_load_as_one_and_the_hash_tracks_content(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _frame(30).to_csv(a, index=False)
    _frame(30).iloc[:5].to_csv(b, index=False)
    both = load_many([a, b], CMAP)
    assert len(both) == 35 and both.report.duplicate_rows == 5
    assert load_records(a, CMAP).content_hash() == load_records(a, CMAP).content_hash()
    assert load_records(a, CMAP).content_hash() != both.content_hash()


def test_undecodable_bytes_do_not_sink_the_file_but_their_row_is_never_learned(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes("主题,内容,类别,三事分类\n路灯,不亮了,城乡建设,公事\n".encode() + b"\xff\xfe,bad,x,y\n")
    records = load_records(path, CMAP)
    assert records.frame["text"].tolist() == ["不亮了"]
    assert records.report.undecodable_ids == ["row2"] and records.report.rows_kept == 1
    assert any("skipped 1 rows whose text or labels hold undecodable bytes" in line for line in records.report.lines())
