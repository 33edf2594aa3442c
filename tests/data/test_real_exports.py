"""Real texts from ../shared/data written the ways a city's system writes them, read back as the same records.

Each form (GB18030, UTF-8 with and without a BOM, Excel's UTF-16 "Unicode text", Big5, semicolons, a title row,
a workbook with the data on its second sheet under a title) goes through the public loader and the CLI, and must
give the records of the UTF-8 original of the same rows. Batch scoring of a GB18030 archive must give the output of
the UTF-8 one, also when resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import opencc
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sanshi_ml.cli import app
from sanshi_ml.readers import ReadOptions, inspect
from sanshi_ml.records import ColumnMap, load_records
from sanshi_ml.scoring import part_paths, score
from tests.conftest import PETITION_TARGETS

pytestmark = pytest.mark.real_data

ROWS = 300
TITLE = "2024年1月12345工单明细"
CMAP = ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS, id_col="留言编号", time_col="留言时间")
COLUMN_ARGS = ["--text-cols", "留言主题,留言详情", "--id-col", "留言编号", "--time-col", "留言时间",
               *[arg for name, column in PETITION_TARGETS.items() for arg in ("--target", f"{name}={column}")]]
runner = CliRunner()


@pytest.fixture(scope="module")
def rows(petitions_csv) -> pd.DataFrame:
    """The first rows of the real petitions, every cell a string."""
    return pd.read_csv(petitions_csv, dtype=str, keep_default_na=False, nrows=ROWS)


@pytest.fixture(scope="module")
def traditional(petitions_csv) -> pd.DataFrame:
    """Real rows in traditional characters, the record's columns only, rows that Big5 cannot encode left out (it
    lacks many characters, and the project reads 繁 as 简 anyway, so what is compared is the records)."""
    converter = opencc.OpenCC("s2t")
    rows = pd.read_csv(petitions_csv, dtype=str, keep_default_na=False, nrows=1_000)
    rows = rows[[*CMAP.text_cols, CMAP.id_col, CMAP.time_col, *CMAP.targets.values()]]
    frame = rows.map(converter.convert)
    frame.columns = [converter.convert(c) for c in rows.columns]

    def encodable(row: pd.Series) -> bool:
        try:
            "".join(row).encode("big5")
        except UnicodeEncodeError:
            return False
        return True

    kept = frame[frame.apply(encodable, axis=1)].reset_index(drop=True)
    assert len(kept) > 200
    return kept


def _write(frame: pd.DataFrame, path: Path, form: str) -> Path:
    if form == "excel":
        with pd.ExcelWriter(path) as writer:
            pd.DataFrame({"说明": ["本表由12345热线系统导出"]}).to_excel(writer, sheet_name="说明", index=False)
            frame.to_excel(writer, sheet_name="工单明细", index=False, startrow=1)
            writer.sheets["工单明细"]["A1"] = TITLE
        return path
    encoding, sep = {"gb18030": ("gb18030", ","), "utf-8-sig": ("utf-8-sig", ","), "utf-8": ("utf-8", ","),
                     "utf-16": ("utf-16", "\t"), "big5": ("big5", ","), "semicolon": ("utf-8", ";"),
                     "gb18030-title": ("gb18030", ",")}[form]
    with open(path, "w", encoding=encoding, errors="strict", newline="") as handle:
        if form == "gb18030-title":
            handle.write(TITLE + "," * (len(frame.columns) - 1) + "\r\n")
        frame.to_csv(handle, index=False, sep=sep, lineterminator="\r\n")
    return path


FORMS = {  # form: (file name, options to read it, what must be decided)
    "gb18030": ("gb.csv", [], {"encoding": "gb18030"}),
    "utf-8-sig": ("bom.csv", [], {"encoding": "utf-8"}),
    "utf-8": ("plain.csv", [], {"encoding": "utf-8"}),
    "utf-16": ("unicode.txt", [], {"encoding": "utf-16", "delimiter": "\t"}),  # Excel's "Unicode text"
    "big5": ("big5.csv", [], {"encoding": "big5"}),
    "semicolon": ("semi.csv", [], {"delimiter": ";"}),
    "gb18030-title": ("title.csv", [], {"encoding": "gb18030", "header_skip": 1}),
    "excel": ("report.xlsx", ["--sheet", "工单明细"], {"sheet": "工单明细", "header_skip": 1}),
}


def _same(records, reference) -> None:
    assert len(records) == len(reference) and records.report.rows_read == reference.report.rows_read
    assert records.content_hash() == reference.content_hash()
    pd.testing.assert_frame_equal(records.frame, reference.frame)
    assert not records.report.undecodable_ids


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_loads_as_the_utf8_original_through_the_loader_and_the_cli(form, rows, traditional, tmp_path):
    name, options, decided = FORMS[form]
    frame = traditional if form == "big5" else rows
    original = tmp_path / "original.csv"
    frame.to_csv(original, index=False, encoding="utf-8")
    cmap = CMAP
    if form == "big5":  # the same rows in the same characters, so the records must be identical
        convert = opencc.OpenCC("s2t").convert
        cmap = ColumnMap(text_cols=tuple(map(convert, CMAP.text_cols)), id_col=convert(CMAP.id_col),
                         time_col=convert(CMAP.time_col),
                         targets={k: convert(v) for k, v in CMAP.targets.items()})
    reference = load_records(original, cmap)
    path = _write(frame, tmp_path / name, form)
    read = ReadOptions(sheet="工单明细") if form == "excel" else None
    layout = inspect(path, read, needed=cmap.text_cols)
    for key, value in decided.items():
        assert getattr(layout, key) == value, (key, layout)
    _same(load_records(path, cmap, read), reference)

    if form == "big5":
        args = [arg for pair in zip(["--text-cols", "--id-col", "--time-col"],
                                    [",".join(cmap.text_cols), cmap.id_col, cmap.time_col]) for arg in pair]
        args += [arg for t, c in cmap.targets.items() for arg in ("--target", f"{t}={c}")]
    else:
        args = COLUMN_ARGS
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\n", encoding="utf-8")
    result = runner.invoke(app, ["prepare", str(path), "--out", str(tmp_path / "prepared"), "--params", str(params),
                                 *args, *options])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "prepared" / "prepare.json").read_text(encoding="utf-8"))
    assert report["data_sha256"] == reference.content_hash()
    _same(load_records(tmp_path / "prepared" / "records.parquet", cmap), reference)


def test_gb18030_with_ascii_column_names_is_decoded_not_garbled(rows, tmp_path):
    names = {column: f"col{i}" for i, column in enumerate(rows.columns)}
    ascii_rows = rows.rename(columns=names)
    cmap = ColumnMap(text_cols=(names["留言主题"], names["留言详情"]), id_col=names["留言编号"],
                     time_col=names["留言时间"], targets={t: names[c] for t, c in PETITION_TARGETS.items()})
    ascii_rows.to_csv(tmp_path / "original.csv", index=False)
    ascii_rows.to_csv(tmp_path / "gb.csv", index=False, encoding="gb18030")
    records = load_records(tmp_path / "gb.csv", cmap)
    _same(records, load_records(tmp_path / "original.csv", cmap))
    assert set(records.frame["sanshi"]) == {"公事", "共事", "家事"}
    assert not any("\ufffd" in text for text in records.frame["text"])


@pytest.fixture(scope="module")
def archives(petitions_csv, tmp_path_factory):
    """The real messages under the demo model's column names: UTF-8, and GB18030 with a title row."""
    messages = pd.read_csv(petitions_csv, dtype=str, keep_default_na=False, nrows=1_000)
    frame = pd.DataFrame({"工单编号": messages["留言编号"], "标题": messages["留言主题"],
                          "诉求内容": messages["留言详情"], "受理时间": messages["留言时间"]})
    root = tmp_path_factory.mktemp("archives")
    utf8, gb = root / "archive-utf8.csv", root / "archive-gb18030.csv"
    frame.to_csv(utf8, index=False)
    with open(gb, "w", encoding="gb18030", newline="") as handle:
        handle.write(f"{TITLE},,,\n")
        frame.to_csv(handle, index=False)
    return utf8, gb


def test_scoring_a_gb18030_archive_gives_the_utf8_output_also_when_resumed(archives, demo_model_dir, tmp_path):
    utf8, gb = archives
    expected = pq.read_table(score([utf8], demo_model_dir, tmp_path / "utf8.parquet", chunk_size=300, jobs=1,
                                   progress=False).out)
    assert expected.num_rows == 1_000 and set(expected.column("status").to_pylist()) == {"ok"}
    out = tmp_path / "gb.parquet"
    result = score([gb], demo_model_dir, out, chunk_size=300, jobs=1, progress=False, keep_parts=True)
    assert result.rows == 1_000 and pq.read_table(out).equals(expected)
    parts = tmp_path / "gb.parquet.parts"
    fingerprint = json.loads((parts / "run.json").read_text(encoding="utf-8"))["fingerprint"]
    assert fingerprint["reading"] == [{"kind": "csv", "encoding": "gb18030", "delimiter": ",", "header_skip": 1}]

    # A crash: chunk 1 written but never checkpointed, chunk 3 never written. The CLI resumes it.
    part_paths(parts, 1)[1].unlink()
    part_paths(parts, 3)[0].unlink()
    out.unlink()
    result = runner.invoke(app, ["score", str(gb), "--model-dir", str(demo_model_dir), "--out", str(out),
                                 "--chunk-size", "300", "--jobs", "1", "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1000 records" in result.output and "gb18030 (detected), header on row 2" in result.output
    assert pq.read_table(out).equals(expected)

    # The same options on the command line read it the same way, and still resume nothing of another run.
    out.unlink()
    result = runner.invoke(app, ["score", str(gb), "--model-dir", str(demo_model_dir), "--out", str(out),
                                 "--chunk-size", "300", "--jobs", "2", "--encoding", "gbk", "--header-row", "2",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).equals(expected)


@pytest.mark.slow
def test_dask_reads_a_gb18030_archive_like_the_local_run(archives, demo_model_dir, tmp_path):
    utf8, gb = archives
    local = pq.read_table(score([utf8], demo_model_dir, tmp_path / "local.parquet", jobs=1, progress=False).out)
    on_dask = score([gb], demo_model_dir, tmp_path / "dask.parquet", dask="local:2", progress=False)
    table = pq.read_table(on_dask.out).replace_schema_metadata(None)
    pd.testing.assert_frame_equal(table.to_pandas(), local.replace_schema_metadata(None).to_pandas())
