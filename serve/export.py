"""Stored feedback as a CSV that ``sanshi-ml train`` reads directly.

The columns are the ones the serving model was trained on (its metadata's ``columns``), so the export can be
appended to the original training data: ``sanshi-ml train data/demo/records.csv feedback.csv``. A few audit columns
follow (feedback id, model version, time, the suggested labels); training ignores columns it is not told about.

The file is meant to be opened in a spreadsheet too, so no cell may run there: a cell that starts with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return (what Excel, LibreOffice and Google Sheets take as the start of a formula)
gets a single quote in front, the OWASP rule against CSV injection. Nothing else in the cell changes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sanshi_ml.config import DEFAULT_TARGETS
from sanshi_ml.data.records import compose
from serve.store import FeedbackRow

DEFAULT_ID_COL = "工单编号"
DEFAULT_TIME_COL = "受理时间"
DEFAULT_TEXT_COLS = ("标题", "诉求内容")
AUDIT_COLUMNS = ("反馈编号", "模型版本", "反馈时间", "修改字段")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """The cell as a spreadsheet shows it and never runs it: a leading quote before a formula's first character."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


@dataclass(frozen=True)
class ExportLayout:
    """Which CSV column holds what, taken from the model's recorded column map."""

    id_col: str
    time_col: str
    text_cols: tuple[str, ...]
    targets: dict[str, str]
    segmented_col: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict, targets: Iterable[str]) -> ExportLayout:
        """The training columns of a model; targets the metadata does not name keep their own name as column."""
        columns = metadata.get("columns") or {}
        mapped = dict(columns.get("targets") or DEFAULT_TARGETS)
        return cls(
            id_col=columns.get("id_col") or DEFAULT_ID_COL,
            time_col=columns.get("time_col") or DEFAULT_TIME_COL,
            text_cols=tuple(columns.get("text_cols") or (() if columns.get("segmented_col") else DEFAULT_TEXT_COLS)),
            targets={t: mapped.get(t, t) for t in targets},
            segmented_col=columns.get("segmented_col"),
        )

    @property
    def header(self) -> list[str]:
        cols = [self.id_col, *self.text_cols]
        if self.segmented_col:
            cols.append(self.segmented_col)
        cols += [self.time_col, *self.targets.values()]
        cols += list(AUDIT_COLUMNS) + [f"建议_{column}" for column in self.targets.values()]
        return cols

    def row(self, item: FeedbackRow, segment: Callable[[str], str] | None = None) -> list[str]:
        text_cells: list[str]
        if len(self.text_cols) >= 2:
            # title, text, and any further text columns left empty (training joins them to the text)
            text_cells = [item.title, item.text] + [""] * (len(self.text_cols) - 2)
        elif self.text_cols:
            text_cells = [compose(item.title, item.text)]
        else:
            text_cells = []
        cells = [item.record_id or f"FB{item.id}", *text_cells]
        if self.segmented_col:
            # A model trained on pre-segmented text reads this column; cut the text the way the model does.
            joined = compose(item.title, item.text)
            cells.append(segment(joined) if segment else joined)
        cells.append(item.received_at.strftime(TIME_FORMAT) if item.received_at else "")
        cells += [item.labels.get(target, "") for target in self.targets]
        cells += [
            str(item.id),
            item.model_version,
            item.created_at.isoformat(timespec="seconds"),
            ",".join(item.corrected),
        ]
        cells += [(item.suggestion.get(target) or {}).get("label", "") for target in self.targets]
        return [spreadsheet_safe(cell) for cell in cells]


def csv_chunks(
    layout: ExportLayout, rows: Iterable[FeedbackRow], segment: Callable[[str], str] | None = None, bom: bool = True
) -> Iterator[bytes]:
    """The CSV, encoded as UTF-8 (with a BOM so spreadsheet programs detect it), a few hundred rows per chunk."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(layout.header)
    yield (("\ufeff" if bom else "") + buffer.getvalue()).encode("utf-8")
    buffer.seek(0)
    buffer.truncate()
    for number, item in enumerate(rows, start=1):
        writer.writerow(layout.row(item, segment))
        if number % 500 == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")
