"""Nothing lost: a damaged CSV row (a stray quote, too many or too few fields) or a JSON line that does not parse is
one malformed row, reported with its line, and every record after it is read as it is.

The exports are demo records written by pandas: every 7th text holds an ASCII comma (so it is written in quotes, and
a stray quote further up ends there), and every 11th spans two lines (a legitimate multi-line cell). Damage is done
to the raw text, as a hand edit or a broken exporter would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sanshi_ml.data.readers import MALFORMED_LINE, RecordError, iter_table, malformed_lines, read_table, swallowed
from sanshi_ml.data.records import ColumnMap, load_many
from sanshi_ml.scoring import parts_dir_for, score
from tests.conftest import DEMO_CSV

N = 300
CMAP = ColumnMap(text_cols=("标题", "诉求内容"), targets={"sanshi": "三事"}, id_col="工单编号", time_col="受理时间")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, str]:
    demo = pd.read_csv(DEMO_CSV, dtype=str, keep_default_na=False)
    frame = demo.iloc[np.arange(N) % len(demo)].reset_index(drop=True)
    frame["工单编号"] = [f"R{i:04d}" for i in range(N)]
    frame.loc[::7, "诉求内容"] += ",请尽快处理"
    frame.loc[5::11, "诉求内容"] += "\n附：照片已上传"
    path = tmp_path_factory.mktemp("clean") / "clean.csv"
    frame.to_csv(path, index=False)
    return path, path.read_text(encoding="utf-8")


def start_of(text: str, record_id: str) -> int:
    return text.index(f"\n{record_id},") + 1


def line_of(text: str, record_id: str) -> int:
    return text.count("\n", 0, start_of(text, record_id)) + 1


def field_start(text: str, record_id: str, column: int) -> int:
    """Where field ``column`` of a record begins (the fields before it hold no comma or quote)."""
    at = start_of(text, record_id)
    for _ in range(column):
        at = text.index(",", at) + 1
    return at


def damaged(tmp_path: Path, text: str, name: str = "damaged.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def check_one_malformed(path: Path, clean_path: Path, line: int, position: int) -> None:
    """Every record read, exactly one malformed (at ``position``, with ``line``), the others as in the clean file."""
    expected = read_table(clean_path)
    for frame in (read_table(path), pd.concat(list(iter_table(path, chunk_size=40)), ignore_index=True)):
        assert len(frame) == N
        lines = malformed_lines(frame)
        assert lines is not None and np.flatnonzero(lines).tolist() == [position] and lines[position] == line
        others = frame.drop(columns=MALFORMED_LINE).drop(index=position)
        pd.testing.assert_frame_equal(others, expected.drop(index=position))
        assert frame.drop(columns=MALFORMED_LINE).iloc[position].isna().all()


def test_the_clean_export_is_read_by_the_fast_path_without_a_malformed_row(clean):
    path, text = clean
    assert text.count('"') > 0 and len(read_table(path)) == N
    assert all(MALFORMED_LINE not in chunk.columns for chunk in iter_table(path, chunk_size=40))


@pytest.mark.parametrize("column", [0, 1])
def test_a_stray_quote_that_swallows_records_marks_only_its_own_row(clean, tmp_path, column):
    path, text = clean
    # R0141: the records after it up to R0147 (whose text is quoted) would vanish into one of its cells.
    at = field_start(text, "R0141", column)
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    assert len(pd.read_csv(bad, dtype=str)) < N  # what pandas alone does: silently fewer records
    check_one_malformed(bad, path, line_of(text, "R0141"), 141)


def test_a_stray_quote_that_swallows_one_record_up_to_its_quoted_field(clean, tmp_path):
    """A quote at the title of R0139 closes at the quoted text of R0140: the widths still agree (the comma inside
    R0140's text makes up for the fields R0139 lost), so pandas returns one record fewer and no error."""
    path, text = clean
    at = field_start(text, "R0139", 1)
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    assert len(pd.read_csv(bad, dtype=str)) == N - 1
    check_one_malformed(bad, path, line_of(text, "R0139"), 139)


def test_a_quote_never_closed_marks_its_row_and_the_records_after_it_are_read(clean, tmp_path):
    path, text = clean
    at = field_start(text, "R0295", 1)  # after the last quoted text: the quote never closes
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    check_one_malformed(bad, path, line_of(text, "R0295"), 295)


@pytest.mark.parametrize("damage", ["too_many", "too_few"])
def test_a_row_with_too_many_or_too_few_fields_is_malformed_and_the_rest_read(clean, tmp_path, damage):
    path, text = clean
    start = start_of(text, "R0200")
    end = text.index("\n", start)
    row = text[start:end]
    row = row + ",多余的一列" if damage == "too_many" else row[: row.rindex(",")]
    bad = damaged(tmp_path, text[:start] + row + text[end:])
    check_one_malformed(bad, path, line_of(text, "R0200"), 200)


def test_a_damaged_first_chunk_and_blank_lines_are_handled_by_the_careful_reader(clean, tmp_path):
    path, text = clean
    start = start_of(text, "R0003")
    bad = damaged(tmp_path, text[:start] + "\n   \n" + text[start:].replace(",", ",,", 1))
    frame = read_table(bad)
    lines = malformed_lines(frame)
    assert len(frame) == N and np.flatnonzero(lines).tolist() == [3] and lines[3] == line_of(text, "R0003") + 2


def test_load_report_counts_malformed_rows_by_line_and_skips_them(clean, tmp_path):
    path, text = clean
    at = field_start(text, "R0141", 0)
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    records = load_many([bad], CMAP)
    report = records.report
    assert report.rows_read == N and report.malformed_lines == [str(line_of(text, "R0141"))]
    assert report.rows_kept == len(records) == report.rows_read - len(report.empty_text_ids) - 1
    assert "R0141" not in set(records.frame["id"]) and "R0142" in set(records.frame["id"])
    assert any("1 malformed rows" in line and str(line_of(text, "R0141")) in line for line in report.lines())
    assert report.as_dict()["malformed"] == 1
    both = load_many([bad, path], CMAP).report  # several exports: lines named with their file
    assert both.malformed_lines == [f"damaged.csv:{line_of(text, 'R0141')}"] and both.rows_read == 2 * N


def test_scoring_gives_a_damaged_row_status_malformed_and_resumes_through_it(clean, tmp_path, demo_model_dir):
    path, text = clean
    at = field_start(text, "R0141", 0)
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    out = tmp_path / "scored.parquet"
    result = score([bad], demo_model_dir, out, chunk_size=50, jobs=1, progress=False)
    scored = pd.read_parquet(out)
    assert result.rows == len(scored) == N and result.status["malformed"] == 1
    row = scored.iloc[141]
    assert row["status"] == "malformed" and row["id"] == f"line{line_of(text, 'R0141')}" and pd.isna(row["sanshi"])
    assert scored["id"].tolist()[:141] == [f"R{i:04d}" for i in range(141)]
    assert scored["id"].tolist()[142:] == [f"R{i:04d}" for i in range(142, N)]

    # An interrupted run resumed: the chunks after the damage are the same rows, read again by the careful reader.
    again = tmp_path / "again.parquet"
    score([bad], demo_model_dir, again, chunk_size=50, jobs=1, progress=False, keep_parts=True)
    for part in sorted(parts_dir_for(again).glob("00000[2-5].*")):
        part.unlink()
    score([bad], demo_model_dir, again, chunk_size=50, jobs=1, progress=False, resume=True)
    pd.testing.assert_frame_equal(pd.read_parquet(again), scored)

    # Several inputs: the line is named with its file.
    both = score([bad, path], demo_model_dir, tmp_path / "both.parquet", jobs=1, progress=False)
    assert both.rows == 2 * N and both.status["malformed"] == 1
    assert "damaged.csv:line" in set(
        pd.read_parquet(tmp_path / "both.parquet")["id"].str.replace(r"\d+$", "", regex=True)
    )


def test_a_jsonl_line_that_is_not_a_json_object_is_a_malformed_row(tmp_path):
    demo = pd.read_csv(DEMO_CSV, dtype=str, keep_default_na=False).head(60)
    lines = [json.dumps(row, ensure_ascii=False) for row in demo.to_dict("records")]
    lines[20] = lines[20][:-7]  # cut short
    lines[40] = "[1, 2]"  # JSON, but not an object
    lines.insert(30, "")  # a blank line is no record
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for frame in (read_table(path), pd.concat(list(iter_table(path, chunk_size=8)), ignore_index=True)):
        assert len(frame) == 60
        marks = malformed_lines(frame)
        assert np.flatnonzero(marks).tolist() == [20, 40] and marks[[20, 40]].tolist() == [21, 42]
        assert frame["工单编号"].iloc[[19, 21, 39, 41]].tolist() == demo["工单编号"].iloc[[19, 21, 39, 41]].tolist()


def test_the_candidate_rule(tmp_path):
    # A stray quote at column 0 of a 4-column file: the rest of its line, a whole record, the start of the next.
    assert swallowed("R1,标题,正文,2024-01-01\nR2,标题,正文,2024-01-02\nR3,标题,", 0, 4, ",")
    # At column 1: one record swallowed up to its quoted field (the last line holds at least 2 fields).
    assert swallowed("标题,正文,2024-01-01\nR2,标题", 1, 4, ",")
    # In the last column: the record whose last field, quoted for a quote it holds, closed the cell.
    assert swallowed('正文\nR2,标题,正文,投诉""了"', 3, 4, ",")
    assert not swallowed("正文\n最后一行,有三个,逗号,的句子", 3, 4, ",")
    # Legitimate multi-line texts: prose with commas, a line of a list, a quote inside.
    assert not swallowed("第一行,有逗号\n第二行\n第三行", 2, 4, ",")
    assert not swallowed(
        "我们是职工,伊景园的房子,\n在现在楼盘还未建成的情况下,就要求,捆绑,购买车位\n不想买,车位.", 2, 4, ","
    )
    assert not swallowed('他说"好,的"\n然后,走了', 1, 3, ",")
    assert not swallowed("一行\n两行", 0, 1, ",")  # one column: cannot be told


def test_a_file_that_does_not_decode_is_still_refused_by_the_careful_reader(clean, tmp_path):
    path, text = clean
    header, body = text.split("\n", 1)
    start = start_of(text, "R0003")
    end = text.index("\n", start)
    ragged = (text[:end] + ",多余的一列" + text[end:]).split("\n", 1)[1]  # sends the file to the careful reader
    raw = (header + "\n" + ragged + body * 25).encode("utf-8")
    cut = raw.index(b"\n", 1_200_000) + 1  # past the first MiB, which decodes: the read itself must notice
    bad = tmp_path / "garbled.csv"
    bad.write_bytes(raw[:cut] + bytes(range(0x80, 0xC0)) * 400 + raw[cut:])
    with pytest.raises(RecordError, match=r"garbled\.csv: cannot be decoded as utf-8 .* read up to byte"):
        list(iter_table(bad, chunk_size=500))


def test_the_export_names_every_column_in_errors_without_the_readers_own(clean, tmp_path):
    path, text = clean
    at = field_start(text, "R0141", 0)
    bad = damaged(tmp_path, text[:at] + '"' + text[at:])
    with pytest.raises(RecordError) as error:
        load_many([bad], ColumnMap(text_cols=("正文",)))
    assert "malformed" not in str(error.value) and not re.search(r"\x00", str(error.value))


def test_a_damaged_row_in_a_gb18030_export_is_malformed_and_nothing_is_printed(clean, tmp_path, capfd):
    path, text = clean
    start = start_of(text, "R0010")
    end = text.index("\n", start)
    bad = tmp_path / "gb.csv"
    bad.write_bytes((text[:start] + text[start:end][: text[start:end].rindex(",")] + text[end:]).encode("gb18030"))
    frame = read_table(bad)
    lines = malformed_lines(frame)
    assert len(frame) == N and np.flatnonzero(lines).tolist() == [10] and lines[10] == line_of(text, "R0010")
    captured = capfd.readouterr()
    assert "Exception ignored" not in captured.err + captured.out
