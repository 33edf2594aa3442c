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
from sanshi_ml.data.readers import ReadOptions, inspect
from sanshi_ml.data.records import ColumnMap, load_records
from sanshi_ml.scoring import part_paths, score
from tests.conftest import PETITION_TARGETS

pytestmark = pytest.mark.real_data

ROWS = 300
TITLE = "2024年1月12345工单明细"
CMAP = ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS, id_col="留言编号", time_col="留言时间")
COLUMN_ARGS = [
    "--text-cols",
    "留言主题,留言详情",
    "--id-col",
    "留言编号",
    "--time-col",
    "留言时间",
    *[arg for name, column in PETITION_TARGETS.items() for arg in ("--target", f"{name}={column}")],
]
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
    encoding, sep = {
        "gb18030": ("gb18030", ","),
        "utf-8-sig": ("utf-8-sig", ","),
        "utf-8": ("utf-8", ","),
        "utf-16": ("utf-16", "\t"),
        "big5": ("big5", ","),
        "semicolon": ("utf-8", ";"),
        "gb18030-title": ("gb18030", ","),
    }[form]
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
        cmap = ColumnMap(
            text_cols=tuple(map(convert, CMAP.text_cols)),
            id_col=convert(CMAP.id_col),
            time_col=convert(CMAP.time_col),
            targets={k: convert(v) for k, v in CMAP.targets.items()},
        )
    reference = load_records(original, cmap)
    path = _write(frame, tmp_path / name, form)
    read = ReadOptions(sheet="工单明细") if form == "excel" else None
    layout = inspect(path, read, needed=cmap.text_cols)
    for key, value in decided.items():
        assert getattr(layout, key) == value, (key, layout)
    _same(load_records(path, cmap, read), reference)

    if form == "big5":
        args = [
            arg
            for pair in zip(
                ["--text-cols", "--id-col", "--time-col"], [",".join(cmap.text_cols), cmap.id_col, cmap.time_col]
            )
            for arg in pair
        ]
        args += [arg for t, c in cmap.targets.items() for arg in ("--target", f"{t}={c}")]
    else:
        args = COLUMN_ARGS
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\n", encoding="utf-8")
    result = runner.invoke(
        app, ["prepare", str(path), "--out", str(tmp_path / "prepared"), "--params", str(params), *args, *options]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "prepared" / "prepare.json").read_text(encoding="utf-8"))
    assert report["data_sha256"] == reference.content_hash()
    _same(load_records(tmp_path / "prepared" / "records.parquet", cmap), reference)


def test_gb18030_with_ascii_column_names_is_decoded_not_garbled(rows, tmp_path):
    names = {column: f"col{i}" for i, column in enumerate(rows.columns)}
    ascii_rows = rows.rename(columns=names)
    cmap = ColumnMap(
        text_cols=(names["留言主题"], names["留言详情"]),
        id_col=names["留言编号"],
        time_col=names["留言时间"],
        targets={t: names[c] for t, c in PETITION_TARGETS.items()},
    )
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
    frame = pd.DataFrame(
        {
            "工单编号": messages["留言编号"],
            "标题": messages["留言主题"],
            "诉求内容": messages["留言详情"],
            "受理时间": messages["留言时间"],
        }
    )
    root = tmp_path_factory.mktemp("archives")
    utf8, gb = root / "archive-utf8.csv", root / "archive-gb18030.csv"
    frame.to_csv(utf8, index=False)
    with open(gb, "w", encoding="gb18030", newline="") as handle:
        handle.write(f"{TITLE},,,\n")
        frame.to_csv(handle, index=False)
    return utf8, gb


def test_scoring_a_gb18030_archive_gives_the_utf8_output_also_when_resumed(archives, demo_model_dir, tmp_path):
    utf8, gb = archives
    expected = pq.read_table(
        score([utf8], demo_model_dir, tmp_path / "utf8.parquet", chunk_size=300, jobs=1, progress=False).out
    )
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
    result = runner.invoke(
        app,
        [
            "score",
            str(gb),
            "--model-dir",
            str(demo_model_dir),
            "--out",
            str(out),
            "--chunk-size",
            "300",
            "--jobs",
            "1",
            "--resume",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1000 records" in result.output and "gb18030 (detected), header on row 2" in result.output
    assert pq.read_table(out).equals(expected)

    # The same options on the command line read it the same way, and still resume nothing of another run.
    out.unlink()
    result = runner.invoke(
        app,
        [
            "score",
            str(gb),
            "--model-dir",
            str(demo_model_dir),
            "--out",
            str(out),
            "--chunk-size",
            "300",
            "--jobs",
            "2",
            "--encoding",
            "gbk",
            "--header-row",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).equals(expected)


@pytest.mark.slow
def test_dask_reads_a_gb18030_archive_like_the_local_run(archives, demo_model_dir, tmp_path):
    utf8, gb = archives
    local = pq.read_table(score([utf8], demo_model_dir, tmp_path / "local.parquet", jobs=1, progress=False).out)
    on_dask = score([gb], demo_model_dir, tmp_path / "dask.parquet", dask="local:2", progress=False)
    table = pq.read_table(on_dask.out).replace_schema_metadata(None)
    pd.testing.assert_frame_equal(table.to_pandas(), local.replace_schema_metadata(None).to_pandas())


# ---------------------------------------------------------------------------------- damaged rows, legitimate cells


def _real_csvs() -> list[Path]:
    from tests.conftest import SHARED_DATA

    return sorted(SHARED_DATA.glob("*/*.csv"))


@pytest.mark.parametrize(
    "name", ["petitions_silver.csv", "fj2_segmented.csv", "fj3_unlabeled.csv", "fj4_replies_with_derived_unit.csv"]
)
def test_real_exports_with_multiline_cells_are_read_by_the_fast_path_and_the_careful_reader_alike(petitions_csv, name):
    """The real texts hold line breaks (up to 39 in a cell): none of them is taken for swallowed records, and the
    careful reader, which a damaged file is read with, gives the fast path's frame cell for cell."""
    from sanshi_ml.data.readers import MALFORMED_LINE, _careful_frames, iter_table, read_table

    path = next(p for p in _real_csvs() if p.name == name)
    fast = read_table(path)
    assert MALFORMED_LINE not in fast.columns and fast.apply(lambda c: c.str.contains("\n").sum()).sum() > 10
    assert all(MALFORMED_LINE not in chunk.columns for chunk in iter_table(path, chunk_size=500))
    careful = next(_careful_frames(path, inspect(path), None))
    assert careful[MALFORMED_LINE].isna().all()
    pd.testing.assert_frame_equal(careful.drop(columns=MALFORMED_LINE), fast)


@pytest.mark.parametrize("width", [2, 3, 4, 6])
def test_real_multiline_texts_in_narrow_exports_are_never_flagged(petitions_csv, tmp_path, width):
    """The fewer the columns, the more a line of prose with ASCII commas looks like a row: every real message (title
    and text, so every cell spans lines) in an export of 2 to 6 columns, in each position, reads back unchanged,
    with no malformed row (a cell the fast path is unsure of sends the file to the careful reader, which decides)."""
    from sanshi_ml.data.readers import MALFORMED_LINE, malformed_lines, read_table

    messages = pd.read_csv(petitions_csv, dtype=str, keep_default_na=False)
    columns = {
        "编号": messages["留言编号"],
        "内容": messages["留言主题"] + "\n" + messages["留言详情"],
        "受理时间": messages["留言时间"],
        "标题": messages["留言主题"],
        "一级分类": messages["一级分类"],
        "三事": messages["三事"],
    }
    for text_column in range(width):  # the texts in every position, first and last included
        names = [n for n in columns if n != "内容"][: width - 1]
        names.insert(text_column, "内容")
        frame = pd.DataFrame({n: columns[n] for n in names})
        path = tmp_path / f"narrow{width}_{text_column}.csv"
        frame.to_csv(path, index=False)
        read = read_table(path)
        lines = malformed_lines(read)
        assert lines is None or not lines.any()
        pd.testing.assert_frame_equal(
            read.drop(columns=MALFORMED_LINE, errors="ignore").fillna(""), frame, check_dtype=False
        )


def test_a_stray_quote_in_a_real_export_loses_no_record(petitions_csv, tmp_path):
    """The hostile probe: one stray quote in a real export silently swallowed the records after it."""
    text = petitions_csv.read_text(encoding="utf-8")
    ids = pd.read_csv(petitions_csv, dtype=str, keep_default_na=False)["留言编号"].tolist()
    victim = ids[5_000]
    at = text.index(f"\n{victim},") + 1
    bad = tmp_path / "petitions_stray_quote.csv"
    bad.write_text(text[:at] + '"' + text[at:], encoding="utf-8")
    assert len(pd.read_csv(bad, dtype=str)) < len(ids)  # pandas alone
    records = load_records(bad, CMAP)
    report = records.report
    assert report.rows_read == len(ids) and report.malformed_lines == [str(text.count("\n", 0, at) + 1)]
    assert records.frame["id"].tolist() == [i for i in ids if i != victim]
