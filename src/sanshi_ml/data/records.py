"""The record schema, loaders for CSV / Excel / Parquet / JSONL exports, validation, and splits and folds that keep
repeated texts together.

Files are read by :mod:`sanshi_ml.data.readers` (encoding, delimiter, sheet, header row), re-exported here.
An export may name its columns anything; :class:`ColumnMap` says which column is which. Whatever the source, a loaded
:class:`RecordSet` has the canonical columns ``id, title, text, received_at`` (plus ``segmented`` when the export was
already cut into words) and one column per target, named by the target.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sanshi_ml.config import ColumnsConfig
from sanshi_ml.data.readers import (  # noqa: F401 (re-exported)
    CSV_SUFFIXES,
    EXCEL_SUFFIXES,
    JSONL_SUFFIXES,
    MALFORMED_LINE,
    PARQUET_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Layout,
    ReadOptions,
    RecordError,
    inspect,
    iter_table,
    malformed_lines,
    read_frame,
    read_table,
    require_columns,
)

log = logging.getLogger(__name__)

ID_CANDIDATES = ("留言编号", "工单编号", "编号", "record_id", "id", "ID", "Id")
TIME_CANDIDATES = ("留言时间", "受理时间", "来电时间", "登记时间", "创建时间", "received_at", "created_at", "time")

BASE_COLUMNS = ("id", "title", "text", "received_at")
UNDECODABLE = "\ufffd"


# ------------------------------------------------------------------------------------------------------------------
# The string a model reads of a record


def compose(title: str | None, text: str | None) -> str:
    """Title and text as one human-readable string (an export's single text cell): joined by a newline."""
    title = (title or "").strip()
    text = (text or "").strip()
    if title and text:
        return f"{title}\n{text}"
    return title or text


# Ends the title in a model's input string (the ASCII unit separator; model_input turns any inside a title or text
# into a space). str.split() counts it as whitespace, so normalising a whole input string makes it a space, exactly
# like the newline that joined title and text before titles had a feature block of their own.
TITLE_END = "\x1f"


def model_input(title: str | None, text: str | None) -> str:
    """The string a model reads: the title, :data:`TITLE_END`, then the text; without a title, the text alone."""
    title = (title or "").replace(TITLE_END, " ").strip()
    text = (text or "").replace(TITLE_END, " ").strip()
    return f"{title}{TITLE_END}{text}" if title else text


def split_title(text: str) -> tuple[str, str]:
    """(title, text) of a :func:`model_input` string; a string without a title is all text."""
    title, found, body = text.partition(TITLE_END)
    return (title, body) if found else ("", text)


@dataclass(frozen=True)
class ColumnMap:
    """Which column of an export holds what."""

    text_cols: tuple[str, ...] = ()
    targets: dict[str, str] = field(default_factory=dict)
    id_col: str | None = None
    time_col: str | None = None
    segmented_col: str | None = None

    @classmethod
    def from_config(cls, cfg: ColumnsConfig) -> ColumnMap:
        return cls(
            text_cols=tuple(cfg.text_cols),
            targets=dict(cfg.targets),
            id_col=cfg.id_col,
            time_col=cfg.time_col,
            segmented_col=cfg.segmented_col,
        )

    def without_targets(self) -> ColumnMap:
        return ColumnMap(self.text_cols, {}, self.id_col, self.time_col, self.segmented_col)


@dataclass
class LoadReport:
    """What happened to the rows of an export on the way in. Nothing is dropped without being counted here."""

    source: str
    rows_read: int = 0
    empty_text_ids: list[str] = field(default_factory=list)
    undecodable_ids: list[str] = field(default_factory=list)
    # Rows the CSV reader found damaged (a stray quote, too many or too few fields), by their line in the file
    # ("25001", or "jan.csv:25001" when several exports are loaded as one).
    malformed_lines: list[str] = field(default_factory=list)
    duplicate_rows: int = 0
    duplicate_groups: int = 0
    missing_labels: dict[str, int] = field(default_factory=dict)
    unparsed_times: int = 0
    reading: str = ""  # how the file was read, when it was not plain UTF-8 CSV with the header on row 1

    @property
    def rows_kept(self) -> int:
        return self.rows_read - len(self.empty_text_ids) - len(self.undecodable_ids) - len(self.malformed_lines)

    def lines(self) -> list[str]:
        """A short human-readable account, one fact a line."""
        out = [
            f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept"
            + (f"; {self.reading}" if self.reading else "")
        ]
        if self.empty_text_ids:
            shown = _shown(self.empty_text_ids)
            out.append(f"  skipped {len(self.empty_text_ids)} rows with empty text (ids: {shown})")
        if self.undecodable_ids:
            out.append(
                f"  skipped {len(self.undecodable_ids)} rows whose text or labels hold undecodable bytes "
                f"(U+FFFD; ids: {_shown(self.undecodable_ids)})"
            )
        if self.malformed_lines:
            out.append(
                f"  skipped {len(self.malformed_lines)} malformed rows (a stray quote, or too many or too few "
                f"fields; lines: {_shown(self.malformed_lines)})"
            )
        if self.duplicate_rows:
            out.append(
                f"  {self.duplicate_rows} rows repeat an earlier text exactly ({self.duplicate_groups} texts); "
                "copies are kept on the same side of every split"
            )
        for target, count in self.missing_labels.items():
            if count:
                out.append(f"  {count} rows have no label for target '{target}' and are left out of its training")
        if self.unparsed_times:
            out.append(f"  {self.unparsed_times} received times could not be parsed and are left empty")
        return out

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "empty_text": len(self.empty_text_ids),
            "undecodable": len(self.undecodable_ids),
            "malformed": len(self.malformed_lines),
            "malformed_lines": self.malformed_lines[:100],
            "duplicate_rows": self.duplicate_rows,
            "duplicate_groups": self.duplicate_groups,
            "missing_labels": dict(self.missing_labels),
            "unparsed_times": self.unparsed_times,
            "reading": self.reading,
        }


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")


@dataclass
class RecordSet:
    """Canonical records and the report of how they were loaded."""

    frame: pd.DataFrame
    targets: list[str]
    report: LoadReport
    segmented: bool = False

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def model_texts(self) -> list[str]:
        """The texts a model sees: the segmented column if there is one, else title and text (:func:`model_input`)."""
        if self.segmented:
            return self.frame["segmented"].tolist()
        return [model_input(t, x) for t, x in zip(self.frame["title"], self.frame["text"])]

    def labels(self, target: str) -> np.ndarray:
        return self.frame[target].to_numpy(dtype=object)

    def has_label(self, target: str) -> np.ndarray:
        """Which rows carry a label for ``target`` (loading turns empty cells into None)."""
        return self.frame[target].notna().to_numpy()

    def contents(self) -> pd.Series:
        """What identifies a record's text: the segmented column, else title and text joined. Rows with equal
        contents are repeats of one text (see :func:`duplicate_groups`)."""
        return content_of(self.frame, self.segmented)

    def content_hash(self) -> str:
        """sha256 over texts and labels, in row order: identifies the training data in metadata and MLflow."""
        digest = hashlib.sha256()
        columns = ["id", "segmented" if self.segmented else "text", "title", *self.targets]
        # A missing label hashes as "None" (pandas 3's astype(str) would leave it NaN and break the join).
        for row in self.frame[columns].astype(object).fillna("None").astype(str).itertuples(index=False):
            digest.update("\x1f".join(row).encode("utf-8"))
            digest.update(b"\x1e")
        return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Reading files: how bytes become a frame of strings is readers.py's; here, which columns a command needs


def header_columns(cmap: ColumnMap) -> tuple[str, ...]:
    """The columns named in ``cmap``: the header row of an export is the first row that holds them all."""
    named = (*cmap.text_cols, cmap.segmented_col, cmap.id_col, cmap.time_col, *cmap.targets.values())
    return tuple(dict.fromkeys(c for c in named if c))


def _detect(frame: pd.DataFrame, explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit
    for name in candidates:
        if name in frame.columns:
            return name
    return None


def resolve_columns(frame: pd.DataFrame, cmap: ColumnMap, source: str | Path) -> ColumnMap:
    """Fill in the id and time columns by their usual names, then check that every named column exists."""
    resolved = ColumnMap(
        cmap.text_cols,
        dict(cmap.targets),
        _detect(frame, cmap.id_col, ID_CANDIDATES),
        _detect(frame, cmap.time_col, TIME_CANDIDATES),
        cmap.segmented_col,
    )
    if not resolved.text_cols and not resolved.segmented_col:
        raise RecordError(f"{source}: no text column given (use --text-cols or --segmented-col)")
    needed = [c for c in (resolved.id_col, resolved.time_col, resolved.segmented_col) if c]
    needed += list(resolved.text_cols) + list(resolved.targets.values())
    require_columns(frame, needed, source)
    return resolved


def _cell_text(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    return "" if value is None or pd.isna(value) else str(value)


def _as_text(series: pd.Series) -> pd.Series:
    """Cells as stripped strings; missing, NaN and non-string values that are not numbers become ''."""
    # A comprehension with the common case inline: Series.map with a lambda cost batch scoring ~4 µs per record.
    values = [value.strip() if type(value) is str else _cell_text(value) for value in series.tolist()]
    return pd.Series(values, index=series.index)


def canonical_frame(frame: pd.DataFrame, cmap: ColumnMap, source: str | Path, row_offset: int = 0) -> pd.DataFrame:
    """Map an export's columns onto the record schema. Ids default to the 1-based row number."""
    cmap = resolve_columns(frame, cmap, source)
    out = pd.DataFrame(index=frame.index)
    if cmap.id_col:
        out["id"] = _as_text(frame[cmap.id_col])
    else:
        out["id"] = [f"row{row_offset + i + 1}" for i in range(len(frame))]
    text_cols = list(cmap.text_cols)
    if len(text_cols) > 1:
        out["title"] = _as_text(frame[text_cols[0]])
        body = _as_text(frame[text_cols[1]])
        for column in text_cols[2:]:
            body = body.str.cat(_as_text(frame[column]), sep="\n").str.strip()
        out["text"] = body
    elif text_cols:
        out["title"] = ""
        out["text"] = _as_text(frame[text_cols[0]])
    else:
        out["title"] = ""
        out["text"] = _as_text(frame[cmap.segmented_col])
    if cmap.segmented_col:
        out["segmented"] = _as_text(frame[cmap.segmented_col])
    if cmap.time_col:
        out["received_at"] = pd.to_datetime(frame[cmap.time_col], errors="coerce", format="mixed")
    else:
        out["received_at"] = pd.NaT
    for target, column in cmap.targets.items():
        labels = _as_text(frame[column])
        out[target] = labels.where(labels != "", None).astype(object)
    return out.reset_index(drop=True)


def to_records(frame: pd.DataFrame, cmap: ColumnMap, source: str | Path, reading: str = "") -> RecordSet:
    """Validate an export already in memory: report and skip empty texts and texts or labels with undecodable
    bytes, count duplicates and missing labels."""
    canon = canonical_frame(frame, cmap, source)
    segmented = cmap.segmented_col is not None
    report = LoadReport(source=str(source), rows_read=len(canon), reading=reading)
    lines = malformed_lines(frame)
    malformed = pd.Series(lines > 0 if lines is not None else False, index=canon.index)
    report.malformed_lines = [str(line) for line in lines[lines > 0]] if lines is not None else []
    content = canon["segmented"] if segmented else canon["title"].str.cat(canon["text"], sep="\n")
    empty = ~malformed & (content.str.strip() == "")
    report.empty_text_ids = canon.loc[empty, "id"].tolist()
    # A byte the reader could not decode became U+FFFD; such a row is neither learned from nor measured on (a
    # garbled label would become a class of its own). The reader has already refused a file with many of them.
    undecodable = (
        ~empty & ~malformed & _holds_undecodable(canon, ["segmented" if segmented else "text", "title", *cmap.targets])
    )
    report.undecodable_ids = canon.loc[undecodable, "id"].tolist()
    if _detect(frame, cmap.time_col, TIME_CANDIDATES):
        report.unparsed_times = int(canon.loc[~malformed, "received_at"].isna().sum())
    canon = canon.loc[~(empty | undecodable | malformed)].reset_index(drop=True)
    return _with_groups(canon, list(cmap.targets), report, segmented)


def _holds_undecodable(canon: pd.DataFrame, columns: list[str]) -> pd.Series:
    found = pd.Series(False, index=canon.index)
    for column in columns:
        values = canon[column].tolist()
        if any(UNDECODABLE in v for v in values if isinstance(v, str)):
            found |= pd.Series([isinstance(v, str) and UNDECODABLE in v for v in values], index=canon.index)
    return found


def content_of(frame: pd.DataFrame, segmented: bool) -> pd.Series:
    """A canonical frame's record contents (see :meth:`RecordSet.contents`)."""
    return frame["segmented"] if segmented else frame["title"].str.cat(frame["text"], sep="\n").str.strip()


def _with_groups(frame: pd.DataFrame, targets: list[str], report: LoadReport, segmented: bool) -> RecordSet:
    """Number the duplicate groups, count repeats and missing labels, and log the report."""
    frame["group"] = duplicate_groups(content_of(frame, segmented))
    repeated = frame["group"].duplicated(keep="first")
    report.duplicate_rows = int(repeated.sum())
    report.duplicate_groups = int(frame.loc[repeated, "group"].nunique())
    report.missing_labels = {t: int(frame[t].isna().sum()) for t in targets}
    for line in report.lines():
        log.debug(line)
    return RecordSet(frame=frame, targets=targets, report=report, segmented=segmented)


def load_records(path: str | Path, cmap: ColumnMap, read: ReadOptions | None = None) -> RecordSet:
    """Read and validate one export. ``read``: encoding, sheet and header row fixed by the user (default: those
    set for the command, else detected); the header is the first row holding the columns ``cmap`` names."""
    frame, layout = read_frame(path, read, header_columns(cmap))
    return to_records(frame, cmap, path, layout.summary())


def load_many(paths: Sequence[str | Path], cmap: ColumnMap, read: ReadOptions | None = None) -> RecordSet:
    """Read several exports (e.g. the original labels and the clerks' feedback export) as one record set."""
    sets = [load_records(path, cmap, read) for path in paths]
    if len(sets) == 1:
        records = sets[0]
    else:
        frame = pd.concat([s.frame.drop(columns="group") for s in sets], ignore_index=True)
        report = LoadReport(
            source=" + ".join(str(p) for p in paths),
            rows_read=sum(s.report.rows_read for s in sets),
            reading="; ".join(f"{p}: {s.report.reading}" for p, s in zip(paths, sets) if s.report.reading),
        )
        report.empty_text_ids = [i for s in sets for i in s.report.empty_text_ids]
        report.undecodable_ids = [i for s in sets for i in s.report.undecodable_ids]
        report.malformed_lines = [
            f"{Path(p).name}:{line}" for p, s in zip(paths, sets) for line in s.report.malformed_lines
        ]
        report.unparsed_times = sum(s.report.unparsed_times for s in sets)
        records = _with_groups(frame, sets[0].targets, report, sets[0].segmented)
    if not len(records):
        raise RecordError(_nothing_to_use(records.report))
    return records


def _nothing_to_use(report: LoadReport) -> str:
    """Why a load gave no record to learn from or measure on, naming the export(s)."""
    if not report.rows_read:
        return f"{report.source}: no records, only a header (or nothing) below the column names"
    reasons = [
        f"{n} {what}"
        for n, what in (
            (len(report.empty_text_ids), "with empty text"),
            (len(report.undecodable_ids), "with undecodable bytes"),
            (len(report.malformed_lines), "malformed"),
        )
        if n
    ]
    return f"{report.source}: none of its {report.rows_read} rows can be used ({', '.join(reasons)})"


def duplicate_groups(content: pd.Series) -> np.ndarray:
    """One group number per distinct text: exact repeats share a number and so are never split apart."""
    codes, _ = pd.factorize(content.to_numpy(dtype=object))
    return codes


# --------------------------------------------------------------------------------------------------------------------
# Splits and folds


def split_indices(
    records: RecordSet, test_size: float, seed: int, stratify_target: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test split at the level of distinct texts, so duplicates never straddle it.

    Each group of identical texts is one unit, stratified by the label of its first row. Classes with a single
    group cannot be stratified and go to the training side.
    """

    frame = records.frame
    target = stratify_target or records.targets[0]
    if target not in frame:
        raise RecordError(f"stratify target '{target}' is not among the targets {records.targets}")
    labels = frame[target].fillna("<missing>").astype(str).to_numpy(dtype=object)
    return grouped_stratified_split(frame["group"].to_numpy(), labels, test_size, seed)


def grouped_stratified_split(
    groups: np.ndarray, labels: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions so that each group lies wholly on one side, stratified by each group's first label."""
    from sklearn.model_selection import train_test_split

    first = pd.Series(labels).groupby(groups, sort=True).first()
    counts = first.value_counts()
    singletons = first.index[first.map(counts) < 2]
    splittable = first.drop(index=singletons)
    train_groups, test_groups = train_test_split(
        splittable.index.to_numpy(), test_size=test_size, random_state=seed, stratify=splittable.to_numpy(dtype=object)
    )
    in_test = np.isin(groups, test_groups)
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def fold_indices(
    records: RecordSet, k: int, seed: int, stratify_target: str | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds that keep duplicate texts together."""
    target = stratify_target or records.targets[0]
    y = records.frame[target].fillna("<missing>").astype(str).to_numpy(dtype=object)
    return grouped_folds(records.frame["group"].to_numpy(), y, k, seed)


def grouped_folds(groups: np.ndarray, labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of row positions, stratified by label, each group wholly in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups=groups))


def subset(records: RecordSet, index: np.ndarray) -> RecordSet:
    """The rows at ``index`` as a RecordSet of their own (sharing the load report)."""
    return RecordSet(
        frame=records.frame.iloc[index].reset_index(drop=True),
        targets=records.targets,
        report=records.report,
        segmented=records.segmented,
    )
