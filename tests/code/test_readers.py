"""Reading exports as a city's system writes them: encodings, delimiters, sheets, title rows, and clear errors.

These use the demo records (fictional, in the repository); tests/data/test_real_exports.py does the same with the
real texts.
"""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from sanshi_ml.cli import app
from sanshi_ml.config import ConfigError, Params, with_overrides
from sanshi_ml.data.readers import SAMPLE_BYTES, ReadOptions, RecordError, header_index, inspect, iter_table, read_table
from sanshi_ml.data.records import ColumnMap, load_records
from tests.conftest import DEMO_CSV

CMAP = ColumnMap(
    text_cols=("标题", "诉求内容"),
    targets={"sanshi": "三事", "unit": "承办单位"},
    id_col="工单编号",
    time_col="受理时间",
)
TITLE = "2024年1月12345工单明细"
runner = CliRunner()


@pytest.fixture(scope="module")
def demo() -> pd.DataFrame:
    return pd.read_csv(DEMO_CSV, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "demo.csv"
    demo.to_csv(path, index=False)
    return load_records(path, CMAP)


def _same(records, reference) -> None:
    assert records.content_hash() == reference.content_hash()
    pd.testing.assert_frame_equal(records.frame, reference.frame)
    assert "\ufffd" not in "".join(records.frame["text"]) + "".join(records.frame.columns)


# ------------------------------------------------------------------------------------------------------------ header


def test_header_is_the_first_row_holding_the_needed_columns_else_the_first_full_row():
    rows = [[TITLE, "", ""], ["", "", ""], ["编号", "标题", "内容"], ["1", "电梯", "坏了"], ["2", "", "噪音"]]
    assert header_index(rows, ["标题", "内容"]) == 2
    assert header_index(rows) == 2  # no columns known: the first row whose cells fill the table's width
    assert header_index([["标题", "内容"], ["路灯", "不亮"]], ["标题"]) == 0
    # A header whose only empty cell is the unnamed index column pandas writes is still the header.
    assert header_index([["", "标题", "内容"], ["0", "路灯", "不亮"]]) == 0
    # The needed columns in no row: the full-width rule, so the error then lists the header's names.
    assert header_index(rows, ["正文"]) == 2
    assert header_index([]) == 0


def test_a_title_row_above_the_header_is_skipped_in_csv(demo, reference, tmp_path):
    path = tmp_path / "report.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(f"{TITLE},,,,,,,\n\n")  # a title row as Excel saves it, then a blank row
        demo.to_csv(handle, index=False)
    _same(load_records(path, CMAP), reference)
    assert inspect(path, needed=("标题",)).header_skip == 2
    assert "header on row 3" in load_records(path, CMAP).report.lines()[0]
    # Without columns to look for, the first full row is the header too.
    assert list(read_table(path).columns) == list(demo.columns)
    # --header-row counts rows as a person reading the sheet does.
    _same(load_records(path, CMAP, ReadOptions(header_row=3)), reference)
    with pytest.raises(RecordError, match=r"report\.csv: missing column\(s\)"):
        load_records(path, CMAP, ReadOptions(header_row=1))


def test_excel_sheet_by_name_or_number_with_a_title_row_and_unknown_sheets_listed(demo, reference, tmp_path):
    path = tmp_path / "report.xlsx"
    with pd.ExcelWriter(path) as writer:
        pd.DataFrame({"说明": ["本表由12345系统导出"]}).to_excel(writer, sheet_name="说明", index=False)
        demo.to_excel(writer, sheet_name="工单明细", index=False, startrow=1)
        writer.sheets["工单明细"]["A1"] = TITLE
    for sheet in ("工单明细", "2", 2):
        _same(load_records(path, CMAP, ReadOptions(sheet=sheet)), reference)
    _same(load_records(path, CMAP, ReadOptions(sheet="工单明细", header_row=2)), reference)
    assert inspect(path, ReadOptions(sheet=2), needed=("标题",)).header_skip == 1
    with pytest.raises(RecordError, match=r"report\.xlsx: missing column\(s\)"):
        load_records(path, CMAP)  # the first sheet by default, which holds only the note
    with pytest.raises(RecordError, match=r"report\.xlsx: no sheet '明细'; the workbook has 1 '说明', 2 '工单明细'"):
        load_records(path, CMAP, ReadOptions(sheet="明细"))
    with pytest.raises(RecordError, match="no sheet '3'"):
        load_records(path, CMAP, ReadOptions(sheet=3))


# -------------------------------------------------------------------------------------------------------- delimiters


@pytest.mark.parametrize(
    "name, sep", [("semi.csv", ";"), ("tabs.csv", "\t"), ("unicode.txt", "\t"), ("plain.tsv", "\t"), ("comma.txt", ",")]
)
def test_comma_tab_and_semicolon_are_sniffed(demo, reference, tmp_path, name, sep):
    path = tmp_path / name
    demo.to_csv(path, index=False, sep=sep)
    assert inspect(path).delimiter == sep
    _same(load_records(path, CMAP), reference)


def test_a_sniff_that_fails_falls_back_to_comma(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("诉求内容\n小区电梯坏了\n路灯不亮\n", encoding="utf-8")
    assert inspect(path).delimiter == ","
    assert read_table(path)["诉求内容"].tolist() == ["小区电梯坏了", "路灯不亮"]


# --------------------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "encoding, expected",
    [("gb18030", "gb18030"), ("gbk", "gb18030"), ("utf-8-sig", "utf-8"), ("utf-8", "utf-8"), ("utf-16", "utf-16")],
)
def test_every_encoding_reads_as_the_same_records(demo, reference, tmp_path, encoding, expected):
    path = tmp_path / "export.csv"
    demo.to_csv(path, index=False, encoding=encoding)
    layout = inspect(path)
    assert layout.encoding == expected
    assert layout.encoding_source == ("byte-order mark" if encoding in ("utf-8-sig", "utf-16") else "detected")
    _same(load_records(path, CMAP), reference)
    _same(load_records(path, CMAP, ReadOptions(encoding=expected)), reference)  # given, as --encoding does
    chunks = list(iter_table(path, chunk_size=100, needed=("标题",)))
    assert [len(c) for c in chunks] == [100, 100, 100, 100, 20]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), read_table(path))


def test_gb18030_with_ascii_column_names_is_decoded_not_garbled(demo, reference, tmp_path):
    path = tmp_path / "ascii_names.csv"
    names = {
        "工单编号": "id",
        "标题": "title",
        "诉求内容": "body",
        "受理时间": "time",
        "三事": "sanshi",
        "承办单位": "unit",
    }
    demo.rename(columns=names).to_csv(path, index=False, encoding="gb18030")
    records = load_records(
        path,
        ColumnMap(
            text_cols=("title", "body"), targets={"sanshi": "sanshi", "unit": "unit"}, id_col="id", time_col="time"
        ),
    )
    _same(records, reference)
    assert set(records.frame["sanshi"]) == {"公事", "共事", "家事"}


def test_a_sample_cut_inside_a_character_is_not_an_error(tmp_path):
    # Two-byte GB18030 characters on one long line, so byte SAMPLE_BYTES falls inside one (an odd offset).
    text = "小区电梯坏了一个多月物业一直不修" * (SAMPLE_BYTES // 16 + 500)
    path = tmp_path / "long.csv"
    path.write_bytes(("标题,诉求内容\n" + "ab," + text + "\n").encode("gb18030"))
    assert len(("标题,诉求内容\nab,").encode("gb18030")) % 2 == 1
    layout = inspect(path)
    assert layout.encoding == "gb18030"
    assert read_table(path)["诉求内容"].iloc[0] == text


def test_an_ascii_head_does_not_decide_the_encoding_of_the_chinese_further_on(tmp_path):
    rows = [f"A{i:07d},plain ascii row number {i} with some words in it" for i in range(30_000)]  # > 1 MiB
    chinese = ["B0000001,小区电梯坏了一个多月物业一直不修，老人上下楼很困难", "B0000002,楼上邻居深夜噪音扰民"]
    path = tmp_path / "ascii_head.csv"
    path.write_bytes(("id,text\n" + "\n".join(rows + chinese) + "\n").encode("gb18030"))
    assert path.stat().st_size > SAMPLE_BYTES
    layout = inspect(path)
    assert (layout.encoding, layout.encoding_source) == ("gb18030", "detected")
    frame = pd.concat(iter_table(path, chunk_size=10_000, layout=layout))
    assert frame["text"].iloc[-2:].tolist() == [c.split(",")[1] for c in chinese]


def test_a_stretch_that_does_not_decode_later_in_the_file_stops_the_read(demo, tmp_path):
    # Two exports joined: UTF-8 for the first megabytes (all the sample sees), GB18030 after.
    path = tmp_path / "joined.csv"
    utf8 = pd.concat([demo] * 20, ignore_index=True)
    utf8.to_csv(path, index=False)
    demo.to_csv(path, mode="ab", index=False, header=False, encoding="gb18030")
    assert path.stat().st_size > 2 * SAMPLE_BYTES and inspect(path).encoding == "utf-8"
    with pytest.raises(
        RecordError,
        match=r"joined\.csv: cannot be decoded as utf-8 \(detected\): \d+(\.\d+)?% of "
        r"characters read up to byte [\d,]+ are invalid; pass --encoding",
    ):
        for _ in iter_table(path, chunk_size=500):
            pass
    with pytest.raises(RecordError, match=r"joined\.csv: cannot be decoded as utf-8 \(detected\)"):
        load_records(path, CMAP)


def test_an_undecodable_file_names_the_file_the_encoding_and_the_fix(demo, tmp_path):
    path = tmp_path / "gb.csv"
    demo.to_csv(path, index=False, encoding="gb18030")
    with pytest.raises(RecordError) as error:
        load_records(path, CMAP, ReadOptions(encoding="utf-8"))
    message = str(error.value)
    assert message.startswith(f"{path}: cannot be decoded as utf-8 (given): ")
    assert "% of characters are invalid; pass --encoding with the file's encoding (e.g. --encoding gb18030)" in message
    assert "\ufffd" not in message and "\n" not in message


def test_one_damaged_character_is_no_error_but_a_damaged_column_name_is(demo, reference, tmp_path):
    path = tmp_path / "damaged.csv"
    data = demo.to_csv(index=False).encode("utf-8")
    damaged = data.replace("电梯".encode(), b"\xe7\x94", 1)  # one character cut short
    path.write_bytes(damaged)
    records = load_records(path, CMAP)
    assert len(records.report.undecodable_ids) == 1 and len(records) == len(reference) - 1
    assert not any("\ufffd" in t for t in records.frame["text"])
    path.write_bytes(data.replace("标题".encode(), b"\xe6\xa0", 1))
    with pytest.raises(
        RecordError,
        match=r"damaged\.csv: 1 column name\(s\) hold undecodable characters when "
        r"decoded as utf-8 \(detected\); pass --encoding",
    ):
        load_records(path, CMAP)


def test_a_byte_order_mark_contradicting_the_given_encoding_is_an_error(demo, tmp_path):
    path = tmp_path / "bom.csv"
    demo.to_csv(path, index=False, encoding="utf-8-sig")
    with pytest.raises(RecordError, match="starts with a UTF-8 byte-order mark, but --encoding gb18030 was given"):
        load_records(path, CMAP, ReadOptions(encoding="gb18030"))
    with pytest.raises(RecordError, match="unknown encoding 'klingon'"):
        inspect(path, ReadOptions(encoding="klingon"))


def test_without_options_every_read_detects_and_options_hold_for_their_read_only(tmp_path):
    path = tmp_path / "ascii.csv"
    path.write_text("id,text\n1,street light\n", encoding="ascii")
    given = inspect(path, ReadOptions(encoding="big5"))
    assert (given.encoding, given.encoding_source) == ("big5", "given")
    assert (inspect(path).encoding, inspect(path).encoding_source) == ("utf-8", "assumed")


def test_params_name_the_encoding_sheet_and_header_row():
    params = with_overrides(Params(), {"data.encoding": "gbk", "data.sheet": "工单明细", "data.header_row": 2})
    assert ReadOptions.from_config(params.data) == ReadOptions("gbk", "工单明细", 2)
    with pytest.raises(ConfigError, match="data.encoding: .*unknown encoding 'gbkk'"):
        with_overrides(Params(), {"data.encoding": "gbkk"})
    with pytest.raises(ConfigError, match="data.header_row"):
        with_overrides(Params(), {"data.header_row": 0})
    with pytest.raises(ConfigError, match="data.sheet: .*counts from 1"):
        with_overrides(Params(), {"data.sheet": 0})


# --------------------------------------------------------------------------------------------------------------- CLI


def _prepare(tmp_path, path, *options):
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  enabled: false\n", encoding="utf-8")
    out = tmp_path / "prepared"
    result = runner.invoke(
        app,
        [
            "prepare",
            str(path),
            "--out",
            str(out),
            "--params",
            str(params),
            "--text-cols",
            "标题,诉求内容",
            "--id-col",
            "工单编号",
            "--time-col",
            "受理时间",
            "--target",
            "sanshi=三事",
            "--target",
            "unit=承办单位",
            *options,
        ],
    )
    return result, out / "records.parquet"


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_reads_with_encoding_sheet_and_header_row_and_fails_in_one_line(demo, reference, tmp_path):
    gb = tmp_path / "gb.csv"
    demo.to_csv(gb, index=False, encoding="gb18030")
    result, prepared = _prepare(tmp_path, gb)
    assert result.exit_code == 0, result.output
    assert "gb.csv: 420 rows read, 418 kept; gb18030 (detected)" in result.output
    _same(load_records(prepared, CMAP), reference)
    result, prepared = _prepare(tmp_path, gb, "--encoding", "gbk")
    assert result.exit_code == 0, result.output
    assert "gb18030 (given)" in result.output
    _same(load_records(prepared, CMAP), reference)

    line = _one_line_error(_prepare(tmp_path, gb, "--encoding", "utf-8")[0])
    assert line.startswith(f"error: {gb}: cannot be decoded as utf-8 (given): ")
    assert line.endswith("pass --encoding with the file's encoding (e.g. --encoding gb18030)")
    line = _one_line_error(_prepare(tmp_path, gb, "--encoding", "klingon")[0])
    assert "unknown encoding 'klingon'" in line

    broken = tmp_path / "broken.csv"
    broken.write_bytes("标题,诉求内容\n".encode() + bytes(range(128, 256)) * 40)
    line = _one_line_error(_prepare(tmp_path, broken)[0])
    assert line.startswith(f"error: {broken}: cannot be decoded as ") and "% of characters are invalid" in line

    book = tmp_path / "book.xlsx"
    with pd.ExcelWriter(book) as writer:
        pd.DataFrame({"说明": ["备注"]}).to_excel(writer, sheet_name="说明", index=False)
        demo.to_excel(writer, sheet_name="工单明细", index=False, startrow=2)
        writer.sheets["工单明细"]["A1"] = TITLE
    result, prepared = _prepare(tmp_path, book, "--sheet", "2")
    assert result.exit_code == 0, result.output
    assert "sheet '工单明细', header on row 3" in result.output
    _same(load_records(prepared, CMAP), reference)
    result, prepared = _prepare(tmp_path, book, "--sheet", "工单明细", "--header-row", "3")
    assert result.exit_code == 0, result.output
    _same(load_records(prepared, CMAP), reference)
    line = _one_line_error(_prepare(tmp_path, book, "--sheet", "汇总")[0])
    assert "no sheet '汇总'; the workbook has 1 '说明', 2 '工单明细'" in line
    # The options ended with their command: the next read in this process detects again.
    assert inspect(gb).encoding_source == "detected"
