"""Reading an export file into a frame of strings: its encoding, delimiter, sheet and header row.

City 12345 systems, and Excel on Chinese Windows, write CSV in GB18030/GBK; Excel's "Unicode text" is UTF-16 and
tab-separated; Taiwanese and Hong Kong systems write Big5; reports put a title row above the header. Every command
reads through :func:`read_table` or :func:`iter_table`, so each reads such a file as it is.

What is decided for a file (its :class:`Layout`) is decided once, on a bounded sample: a byte-order mark if there is
one, else charset-normalizer's detection; ``csv.Sniffer`` for the delimiter; the first row holding the needed
columns for the header. Decoding replaces a bad byte rather than failing, so one damaged character does not sink an
export, but the share of replaced characters is counted in the sample and again while the whole file is read: more
than a damaged character or two, and more than 0.1%, is an error naming the file, the encoding and the fix.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
EXCEL_SUFFIXES = {".xlsx", ".xlsm", ".xls"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
SUPPORTED_SUFFIXES = CSV_SUFFIXES | EXCEL_SUFFIXES | PARQUET_SUFFIXES | JSONL_SUFFIXES

SAMPLE_BYTES = 1 << 20  # what detection and the sample check see: about 350,000 Chinese characters
ASCII_SCAN_BYTES = 64 << 20  # how far a file that opens in plain ASCII is searched for its first other byte
HEADER_SCAN_ROWS = 20
SNIFF_CHARS = 64 << 10
DELIMITERS = ",\t;"
MAX_INVALID_SHARE = 0.001
FEW_INVALID = 3  # one damaged character decodes to up to three replacement characters; never an error alone

# The encodings Chinese exports come in. Detection chooses among them only: a single-byte code page (Latin-1,
# cp1252) would decode any bytes without one replacement character, so a wrong guess there would be silent mojibake.
DETECTABLE = ("utf_8", "gb18030", "big5", "cp950", "big5hkscs")
# GB18030 is a superset of GBK and GB2312; a file detected or named as either is read as GB18030.
GB_FAMILY = {"gb2312", "gbk", "gb18030"}
BOMS = (  # UTF-32's little-endian mark begins with UTF-16's, so it is tried first
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


class RecordError(ValueError):
    """An export that cannot be used as it is; the message names the file and, where it applies, the column."""


# --------------------------------------------------------------------------------------------------------------------
# What the user may fix, and what was decided for a file


@dataclass(frozen=True)
class ReadOptions:
    """What the user fixed instead of detection: ``--encoding``, ``--sheet``, ``--header-row`` (or ``data.*``)."""

    encoding: str | None = None
    sheet: str | int | None = None  # Excel: a sheet's name or 1-based position; None is the first sheet
    header_row: int | None = None  # 1-based, as a person reading the sheet counts; None is detected

    @classmethod
    def from_config(cls, data: Any) -> ReadOptions:
        """From a :class:`sanshi_ml.config.DataConfig`."""
        return cls(encoding=data.encoding, sheet=data.sheet, header_row=data.header_row)


@dataclass(frozen=True)
class Layout:
    """How one file is read: decided once per file by :func:`inspect`, then used by every read of it."""

    kind: str  # csv, excel, parquet, jsonl, json
    encoding: str | None = None  # the codec a CSV is decoded with
    encoding_source: str | None = None  # byte-order mark, given, detected, or why it was assumed
    delimiter: str | None = None
    header_skip: int = 0  # rows above the header, as a spreadsheet shows them (a quoted line break stays in its row)
    sheet: str | None = None
    chars_per_byte: float = 1.0  # measured on the sample: turns bytes read into characters read

    def describe(self) -> dict:
        """What decides which records a read gives (a scoring run's fingerprint): not how the encoding was found,
        nor the measurement."""
        skipped = ("encoding_source", "chars_per_byte")
        return {key: value for key, value in asdict(self).items() if key not in skipped and value is not None}

    def summary(self) -> str:
        """What a person needs to know when it is not plain UTF-8 CSV with the header on row 1; else ''."""
        parts = []
        if self.kind == "csv" and self.encoding != "utf-8":
            parts.append(f"{self.encoding} ({self.encoding_source})")
        if self.kind == "csv" and self.delimiter != ",":
            parts.append(f"delimiter {_delimiter_name(self.delimiter)}")
        if self.sheet is not None:
            parts.append(f"sheet '{self.sheet}'")
        if self.header_skip:
            parts.append(f"header on row {self.header_skip + 1}")
        return ", ".join(parts)


def _delimiter_name(delimiter: str | None) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon"}.get(delimiter or ",", repr(delimiter))


# --------------------------------------------------------------------------------------------------------------------
# Counting replaced characters
#
# Decoding goes through this error handler instead of "replace": the same U+FFFD, but counted, and at no cost while
# a file decodes cleanly. pandas' C parser calls it for UTF-8 and its text wrapper for every other codec; the count
# is per thread, and a read takes the difference around its own calls.

_ERRORS = threading.local()
ERROR_HANDLER = "sanshi-ml-replace"


def _count_and_replace(error: UnicodeError) -> tuple[str, int]:
    _ERRORS.count = getattr(_ERRORS, "count", 0) + 1
    return "\ufffd", error.end  # type: ignore[attr-defined]


@functools.cache
def _error_handler() -> str:
    """The counting handler's name, registered with the codecs on first use (nothing is registered at import)."""
    codecs.register_error(ERROR_HANDLER, _count_and_replace)
    return ERROR_HANDLER


def _errors_so_far() -> int:
    return getattr(_ERRORS, "count", 0)


def _percent(share: float) -> str:
    return f"{share:.0%}" if share >= 0.01 else f"{share:.2%}"


def _too_many(invalid: int, chars: float) -> bool:
    return invalid > FEW_INVALID and invalid > MAX_INVALID_SHARE * chars


def _suggestion(sample: bytes, tried: str | None) -> str:
    """An encoding to suggest when ``tried`` failed: charset-normalizer's best other candidate for ``sample``."""
    from charset_normalizer import from_bytes

    for match in from_bytes(_whole_lines(sample), cp_isolation=list(DETECTABLE)):
        name = _canonical(match.encoding)
        if name != tried:
            return name
    return "big5" if tried == "gb18030" else "gb18030"


def _undecodable(path: Path, layout: Layout, share: float, sample: bytes, where: str = "") -> RecordError:
    return RecordError(
        f"{path}: cannot be decoded as {layout.encoding} ({layout.encoding_source}): {_percent(share)} of "
        f"characters{where} are invalid; pass --encoding with the file's encoding "
        f"(e.g. --encoding {_suggestion(sample, layout.encoding)})"
    )


def _sample_of(path: Path, start: int = 0) -> bytes:
    """Up to SAMPLE_BYTES of ``path`` from the first whole line at or after byte ``start`` (for a suggestion)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        sample = handle.read(SAMPLE_BYTES)
    if start == 0:
        return sample
    cut = sample.find(b"\n")
    return sample[cut + 1 :] if cut >= 0 else sample


class _DecodeCheck:
    """Follows a streamed read: stops it when a stretch of the file does not decode (the sample may not show it,
    e.g. a file that is ASCII for its first megabytes, or two exports of different encodings joined)."""

    def __init__(self, path: Path, layout: Layout, handle: io.BufferedReader) -> None:
        self.path, self.layout, self.handle = path, layout, handle
        self.invalid = 0
        self.position = 0

    def after_chunk(self, invalid: int) -> None:
        # pandas reads ahead of the rows it returns, so the bytes read measure a chunk only roughly; a chunk of
        # many rows (scoring reads 10,000) outweighs the read-ahead.
        position = self.handle.tell()
        chars = (position - self.position) * self.layout.chars_per_byte
        total_chars = position * self.layout.chars_per_byte
        self.invalid += invalid
        if _too_many(invalid, chars) or _too_many(self.invalid, total_chars):
            share = max(invalid / max(chars, 1), self.invalid / max(total_chars, 1))
            sample = _sample_of(self.path, max(self.position, 0))
            raise _undecodable(self.path, self.layout, min(share, 1.0), sample, f" read up to byte {position:,}")
        self.position = position


def _check_column_names(frame: pd.DataFrame, path: Path, layout: Layout) -> None:
    bad = [c for c in frame.columns if isinstance(c, str) and "\ufffd" in c]
    if bad:
        raise RecordError(
            f"{path}: {len(bad)} column name(s) hold undecodable characters when decoded as {layout.encoding} "
            f"({layout.encoding_source}); pass --encoding with the file's encoding "
            f"(e.g. --encoding {_suggestion(_sample_of(path), layout.encoding)})"
        )


def _tidy_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Column names without the spaces around them that spreadsheet headers often carry (unless that would make
    two columns one name)."""
    stripped = [c.strip() if isinstance(c, str) else c for c in frame.columns]
    if stripped != list(frame.columns) and len(set(stripped)) == len(stripped):
        frame.columns = stripped
    return frame


# --------------------------------------------------------------------------------------------------------------------
# Encodings


def _canonical(name: str) -> str:
    """Python's name for an encoding, GBK and GB2312 widened to GB18030, UTF-8 without the BOM variant."""
    try:
        name = codecs.lookup(name).name
    except LookupError:
        raise RecordError(f"unknown encoding '{name}'; e.g. gb18030, utf-8, utf-16, big5") from None
    if name in GB_FAMILY:
        return "gb18030"
    if name == "utf-8-sig":
        return "utf-8"  # the mark, if there is one, is handled as a mark
    return name


def _bom(head: bytes) -> tuple[bytes, str, str] | None:
    for mark, encoding, label in BOMS:
        if head.startswith(mark):
            return mark, encoding, label
    return None


def _whole_lines(sample: bytes) -> bytes:
    """``sample`` up to its last line break, so that a multi-byte character cut at the end is not in it.

    In UTF-8, GB18030 and Big5 the byte of a line break is never part of another character.
    """
    cut = sample.rfind(b"\n")
    return sample[: cut + 1] if cut > 0 else sample


_NON_ASCII = re.compile(rb"[\x80-\xff]")


def _first_non_ascii(handle: io.BufferedReader, start: int) -> bytes | None:
    """A sample from the line where the first non-ASCII byte after ``start`` is, or None if there is none within
    ASCII_SCAN_BYTES: an ASCII head tells nothing of how the Chinese text further on is encoded."""
    handle.seek(start)
    offset = start
    while offset < start + ASCII_SCAN_BYTES:
        block = handle.read(SAMPLE_BYTES)
        if not block:
            return None
        found = _NON_ASCII.search(block)
        if found:
            line = block.rfind(b"\n", 0, found.start()) + 1
            handle.seek(offset + line)
            return handle.read(SAMPLE_BYTES)
        offset += len(block)
    return None


def _detect(head: bytes, handle: io.BufferedReader) -> tuple[str, str, bytes | None]:
    """Encoding and how it was chosen, for a file without a byte-order mark; and the later sample it was chosen on
    when the head is all ASCII (else None)."""
    from charset_normalizer import from_bytes

    later = None
    if head.isascii():
        later = _first_non_ascii(handle, len(head))
        if later is None:
            return "utf-8", "assumed", None  # ASCII as far as was searched; the read checks the rest
    sample = _whole_lines(later if later is not None else head)
    match = from_bytes(sample, cp_isolation=list(DETECTABLE)).best()
    if match is not None:
        return _canonical(match.encoding), "detected", later
    # charset-normalizer offers only encodings the sample decodes in without an error, so a damaged byte leaves it
    # with none: the candidate that replaces the fewest characters is meant (and the sample check judges it).
    invalid = {name: _decode_sample(sample, name, final=False)[1] for name in DETECTABLE}
    return _canonical(min(DETECTABLE, key=invalid.__getitem__)), "detected", later


def _resolve_encoding(
    path: Path, head: bytes, handle: io.BufferedReader, given: str | None
) -> tuple[str, str, int, bytes | None]:
    """Encoding, its source, the length of a UTF-8 byte-order mark to skip, and a later sample if one was needed."""
    if given is not None:
        try:
            given = _canonical(given)
        except RecordError as error:
            raise RecordError(f"{path}: {error}") from None
    bom = _bom(head)
    if bom is not None:
        mark, encoding, label = bom
        if given is not None and re.sub(r"-(le|be)$", "", given) != encoding:
            raise RecordError(
                f"{path}: starts with a {label} byte-order mark, but --encoding {given} was given; "
                "drop --encoding (the mark says how the file is encoded)"
            )
        # The UTF-16 and UTF-32 codecs read their mark themselves; pandas' UTF-8 path skips it too.
        return encoding, "byte-order mark", len(mark) if encoding == "utf-8" else 0, None
    if given is not None:
        return given, "given", 0, None
    encoding, source, later = _detect(head, handle)
    return encoding, source, 0, later


def _decode_sample(sample: bytes, encoding: str, final: bool) -> tuple[str, int]:
    """The sample decoded, and how many characters were replaced. ``final=False`` leaves a character cut at the end
    of the sample out instead of counting it as invalid."""
    before = _errors_so_far()
    text = codecs.getincrementaldecoder(encoding)(errors=_error_handler()).decode(sample, final=final)
    return text, _errors_so_far() - before


# --------------------------------------------------------------------------------------------------------------------
# Delimiter and header row


def _sniff_delimiter(text: str) -> str:
    """Comma, tab or semicolon, as ``csv.Sniffer`` finds it in the first lines; comma if it cannot tell."""
    head = text[:SNIFF_CHARS]
    if len(text) > SNIFF_CHARS:
        head = head[: head.rfind("\n") + 1] or head
    try:
        return csv.Sniffer().sniff(head, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def _csv_rows(text: str, delimiter: str) -> list[list[str]]:
    rows: list[list[str]] = []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            rows.append(row)
            if len(rows) >= HEADER_SCAN_ROWS:
                break
    except csv.Error:  # a cut quoted cell at the end of the sample, a NUL byte: the rows read so far do
        pass
    return rows


def header_index(rows: Sequence[Sequence[str]], needed: Sequence[str] = ()) -> int:
    """Which of the first rows is the header (0-based).

    With the columns a command needs, the first row holding all of them. Without (or when no row does), the first
    row whose non-empty cells fill the table's width: a title row above the header fills one cell. A header whose
    only empty cell is the first (the unnamed index column pandas and Excel write) fills it too.
    """
    rows = [[str(cell).strip() for cell in row] for row in rows[:HEADER_SCAN_ROWS]]
    wanted = {name.strip() for name in needed if name}
    if wanted:
        for index, row in enumerate(rows):
            if wanted <= set(row):
                return index
    filled = [sum(1 for cell in row if cell) for row in rows]
    width = max(filled, default=0)
    for index, row in enumerate(rows):
        if width and (filled[index] == width or (row and not row[0] and filled[index] == len(row) - 1 == width - 1)):
            return index
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Layouts


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    if path.is_dir():
        raise RecordError(f"{path}: is a directory, expected a CSV, Excel, Parquet or JSONL file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise RecordError(
            f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    if path.stat().st_size == 0:
        raise RecordError(f"{path}: file is empty")


def _csv_layout(path: Path, options: ReadOptions, needed: Sequence[str]) -> Layout:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(SAMPLE_BYTES)
        encoding, source, skip, later = _resolve_encoding(path, head, handle, options.encoding)
    whole = len(head) == size
    text, invalid = _decode_sample(head[skip:], encoding, final=whole)
    layout = Layout("csv", encoding, source, chars_per_byte=max(len(text), 1) / max(len(head) - skip, 1))
    if _too_many(invalid, len(text)):
        raise _undecodable(path, layout, invalid / max(len(text), 1), head)
    if later is not None:  # the ASCII head said nothing; the sample detection used is checked too
        later_text, later_invalid = _decode_sample(later, encoding, final=False)
        if _too_many(later_invalid, len(later_text)):
            raise _undecodable(path, layout, later_invalid / max(len(later_text), 1), later)
        layout = replace(layout, chars_per_byte=max(len(later_text), 1) / max(len(later), 1))
    if source == "given":
        # A wrong --encoding can decode without one invalid character (Big5 read as GB18030): say so, read as told.
        with open(path, "rb") as handle:
            detected, how, _ = _detect(head, handle)
        if how == "detected" and detected != encoding:
            log.warning("%s: read as %s as given, though it looks like %s", path, encoding, detected)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(text)
    if options.header_row is not None:
        header_skip = options.header_row - 1
    else:
        header_skip = header_index(_csv_rows(text, delimiter), needed)
    return replace(layout, delimiter=delimiter, header_skip=header_skip)


def _sheet_name(path: Path, names: Sequence[str], wanted: str | int | None) -> str:
    """The sheet ``wanted`` names: a sheet's name, else its 1-based position; the first sheet by default."""
    if wanted is None:
        return names[0]
    if isinstance(wanted, str) and wanted in names:
        return wanted
    position = wanted if isinstance(wanted, int) else (int(wanted) if str(wanted).strip().isdigit() else None)
    if position is not None and 1 <= position <= len(names):
        return names[position - 1]
    listed = ", ".join(f"{i} '{name}'" for i, name in enumerate(names, start=1))
    raise RecordError(f"{path}: no sheet '{wanted}'; the workbook has {listed} (--sheet takes a name or a number)")


def _excel_layout(path: Path, book: pd.ExcelFile, options: ReadOptions, needed: Sequence[str]) -> Layout:
    sheet = _sheet_name(path, [str(n) for n in book.sheet_names], options.sheet)
    if options.header_row is not None:
        header_skip = options.header_row - 1
    else:
        # header=None keeps every row, blank ones too, so row i of the grid is row i + 1 of the sheet.
        grid = pd.read_excel(book, sheet_name=sheet, header=None, nrows=HEADER_SCAN_ROWS, dtype=str)
        rows = [["" if pd.isna(cell) else cell for cell in row] for row in grid.itertuples(index=False)]
        header_skip = header_index(rows, needed)
    return Layout("excel", sheet=sheet, header_skip=header_skip)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in EXCEL_SUFFIXES:
        return "excel"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "json" if suffix == ".json" else "jsonl"


def inspect(path: str | Path, read: ReadOptions | None = None, needed: Sequence[str] = ()) -> Layout:
    """Decide once how ``path`` is read: encoding, delimiter, sheet and header row (see the module's docstring).

    ``needed``: the columns the command needs, by which the header row is found; ``read``: what the user fixed
    (default: the options set for the command, else detection).
    """
    path = Path(path)
    _check_file(path)
    options = read or ReadOptions()
    kind = _kind(path)
    try:
        if kind == "csv":
            layout = _csv_layout(path, options, needed)
        elif kind == "excel":
            with pd.ExcelFile(path) as book:
                layout = _excel_layout(path, book, options, needed)
        else:
            layout = Layout(kind)
    except RecordError:
        raise
    except Exception as error:  # the reader's own message is the useful part; keep the file name in front
        raise RecordError(f"{path}: cannot be read as {path.suffix.lower()[1:]}: {error}") from error
    _log_layout(path, layout)
    return layout


def _log_layout(path: Path, layout: Layout) -> None:
    # Debug only: the load report (train, evaluate, prepare, tune) and scoring's progress lines say it once.
    if layout.summary():
        log.debug("%s: %s", path, layout.summary())


# --------------------------------------------------------------------------------------------------------------------
# Malformed rows
#
# pandas' C parser, the fast path, reads a clean CSV file. It cannot be trusted with a damaged one: a row with too
# many fields stops the read (a ParserError), a row with too few is padded with empty cells without a word, and a
# stray quote at the start of a field opens a quoted cell that swallows the records after it, up to the next quote
# character of the file, as silently. So each chunk the C parser returns is vouched for before it is given out
# (:class:`_Vouch`): where its last column holds an empty cell (a padded row would), pyarrow's parser checks once,
# with an invalid-row handler and no column converted, that every row of the file has the header's width; and no
# cell may look like swallowed records (:func:`swallowed`, a check of the cells holding a line break). From the
# first chunk that fails, the file is read by the careful reader (:class:`_CarefulReader`: the csv module over
# numbered physical lines), which turns each damaged record into one *malformed* row, its first line in the file in
# the column MALFORMED_LINE, and reads the records after it as they are. The pandas python engine's ``on_bad_lines``
# callable was not used: it is called with a bad row's fields, not its line, and never for a stray quote.

MALFORMED_LINE = "\x00malformed_line"  # a frame's column; a name no export has. Set on malformed rows only.
_BREAK = re.compile(r"\r\n|\r|\n")  # a line break, as the file's lines are split (Python's newline="" reading)
ASCII_COMPATIBLE_PROBE = '\n\r",;\t'


def _fields_in(line: str, delimiter: str) -> int:
    """How many fields ``line`` holds read alone as a CSV line (a line without quotes: its delimiters plus one)."""
    if '"' not in line:
        return line.count(delimiter) + 1
    try:
        return len(next(csv.reader([line], delimiter=delimiter), [""]))
    except csv.Error:
        return 0


def swallowed(cell: str, column: int, width: int, delimiter: str) -> bool:
    """Whether a cell holding a line break may hold records that a stray quote swallowed (a candidate).

    A stray quote at the start of field ``column`` of a record opens a quoted cell that runs up to the next quote
    character of the file. The cell then holds the rest of that record's line (its ``width - column`` fields from
    ``column`` on, joined by delimiters, with no quote among them), the whole lines of any records after it, and
    the start of the record whose quoted field closed it. So a cell is a candidate when its first line reads as
    exactly ``width - column`` fields without a quote, and either a line between two of its line breaks reads as
    exactly ``width`` fields without a quote (a whole record swallowed) or its last line reads as ``column + 1`` to
    ``width`` fields (the start of a record up to a quoted field: for the widths to add up, as pandas found them,
    that field is at ``column`` or later). In the last column that quoted field can only be the record's last one,
    holding no delimiter and no line break, so quoted for a quote it holds: the last line then holds a quote too.
    A file of one column cannot be checked: any line of text reads as a row of it. A candidate is only a cue to
    read the file's own lines carefully (:class:`_CarefulReader`), which decides.
    """
    if width < 2:
        return False
    found = _BREAK.search(cell)
    if found is None:
        return False
    first = cell[: found.start()]  # most legitimate cells fail here, before the whole cell is split
    if '"' in first or first.count(delimiter) != width - column - 1:
        return False
    lines = _BREAK.split(cell)
    if any('"' not in line and line.count(delimiter) == width - 1 for line in lines[1:-1]):
        return True
    if column == width - 1 and '"' not in lines[-1]:
        return False
    return column + 1 <= _fields_in(lines[-1], delimiter) <= width


def _cells_with_breaks(series: pd.Series) -> Iterator[str]:
    """The cells holding a line break. Arrow-backed strings (pandas' str dtype) are searched in their value buffer
    with ``bytes.find`` (memchr), so the check costs a copy and a scan of memory, not a Python loop over cells."""
    import pyarrow as pa

    values = series.array
    chunks = None
    if hasattr(values, "__arrow_array__"):
        arrow = values.__arrow_array__()
        chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
        if not all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in chunks):
            chunks = None
    if chunks is None:
        yield from (v for v in series.tolist() if isinstance(v, str) and ("\n" in v or "\r" in v))
        return
    for chunk in chunks:
        offsets_buffer, data_buffer = chunk.buffers()[1:3]
        if data_buffer is None or not len(chunk):
            continue
        dtype = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=dtype)[chunk.offset : chunk.offset + len(chunk) + 1]
        start, end = int(offsets[0]), int(offsets[-1])
        data = data_buffer.to_pybytes()
        hits = []
        for needle in (b"\n", b"\r"):
            at = data.find(needle, start, end)
            while at >= 0:
                hits.append(at)
                at = data.find(needle, at + 1, end)
        if hits:
            for cell in np.unique(np.searchsorted(offsets, hits, side="right") - 1).tolist():
                yield data[offsets[cell] : offsets[cell + 1]].decode("utf-8", errors="replace")


def _holds_swallowed(frame: pd.DataFrame, delimiter: str) -> bool:
    """Whether a frame from the C parser holds a candidate cell (:func:`swallowed`): then the file is read again by
    the careful reader, which decides on the file's own lines."""
    width = frame.shape[1]
    if width < 2:
        return False
    return any(
        swallowed(cell, column, width, delimiter)
        for column in range(width)
        for cell in _cells_with_breaks(frame.iloc[:, column])
    )


def _ascii_compatible(encoding: str) -> bool:
    """Whether the delimiter, quote and line-break bytes of the file are those of ASCII (UTF-8, GB18030, Big5: a
    byte below 0x40 is never part of another character), so a parser may read its bytes as they are."""
    encoding = encoding.removesuffix("-sig")
    try:
        return ASCII_COMPATIBLE_PROBE.encode(encoding) == ASCII_COMPATIBLE_PROBE.encode("ascii")
    except (LookupError, UnicodeError):
        return False


class _Utf8Stream(io.RawIOBase):
    """A text stream's remaining characters as UTF-8 bytes (for pyarrow, on a file in UTF-16 or UTF-32)."""

    def __init__(self, text: io.TextIOBase) -> None:
        self.text, self.pending = text, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while len(self.pending) < len(buffer):
            more = self.text.read(1 << 16)
            if not more:
                break
            self.pending += more.encode("utf-8", errors="surrogatepass")
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


def _text_encoding(layout: Layout, handle: io.BufferedReader) -> str:
    """The codec a text read of the file uses: the layout's, a UTF-8 byte-order mark skipped as pandas skips it."""
    encoding = layout.encoding or "utf-8"
    if encoding == "utf-8" and handle.peek(3)[:3] == codecs.BOM_UTF8:
        return "utf-8-sig"
    return encoding


def _skip_title_rows(reader, layout: Layout) -> None:
    """Skip the rows above the header as pandas' ``skiprows`` does: records, a blank line counting as one."""
    for _ in range(layout.header_skip):
        if next(reader, None) is None:
            return


def _widths_agree(path: Path, layout: Layout) -> bool:
    """Whether every data row of a CSV file has the header's number of fields.

    pyarrow's parser reads the file from its header on and calls an invalid-row handler for each row of another
    width; no column is converted, so this costs about a third of pandas' read, and it is only asked of a file with
    an empty cell in its last column. A line of spaces is no row (pandas skips it too). A file pyarrow cannot parse
    counts as not agreeing: the careful reader then decides.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    invalid = 0

    def handler(row) -> str:
        nonlocal invalid
        if row.text is None or row.text.strip():
            invalid += 1
        return "skip"

    # pyarrow decodes an invalid row's text as UTF-8 before it calls the handler; for a GB18030 or Big5 row (or a
    # damaged byte) that fails inside pyarrow, which reports it as an "exception ignored" and stops with an error.
    # Such a row is counted here, quietly, instead of printed; any other report goes on to the usual hook.
    undecoded = []
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.object is handler:
            undecoded.append(unraisable)
        else:
            previous_hook(unraisable)

    # One thread: in a scoring run the other cores are the workers'.
    options = {
        "read_options": pacsv.ReadOptions(autogenerate_column_names=True, use_threads=False),
        "parse_options": pacsv.ParseOptions(
            delimiter=layout.delimiter or ",", newlines_in_values=True, invalid_row_handler=handler
        ),
        "convert_options": pacsv.ConvertOptions(include_columns=[]),
    }
    sys.unraisablehook = hook
    try:
        with open(path, "rb") as handle:
            encoding = _text_encoding(layout, handle)
            offset = len(codecs.BOM_UTF8) if encoding == "utf-8-sig" else 0
            text = None
            if layout.header_skip:
                # Title rows end where the csv module says (a title may hold a quoted line break).
                text = io.TextIOWrapper(handle, encoding=encoding, errors="replace", newline="")
                lines = _Lines(text)
                _skip_title_rows(csv.reader(lines, delimiter=layout.delimiter or ","), layout)
                offset += len("".join(line for _, line in lines.taken).encode(encoding.replace("-sig", "")))
            if _ascii_compatible(encoding):  # pyarrow reads the bytes as they are, from the header on
                with pa.OSFile(str(path)) as raw:
                    raw.seek(offset)
                    pacsv.read_csv(raw, **options)
            else:  # UTF-16 or UTF-32: the text from the header on, as UTF-8
                if text is None:
                    text = io.TextIOWrapper(handle, encoding=encoding, errors="replace", newline="")
                pacsv.read_csv(io.BufferedReader(_Utf8Stream(text), buffer_size=1 << 20), **options)
    except (pa.ArrowException, OSError, ValueError, UnicodeError):
        return False
    finally:
        sys.unraisablehook = previous_hook
    return invalid == 0 and not undecoded


class _Lines:
    """The physical lines of a text stream, numbered from 1, handed to a ``csv.reader`` one at a time; the lines of
    the last record are kept in ``taken``, and lines can be put back to be read again."""

    def __init__(self, text: io.TextIOBase) -> None:
        self._read = text.readline
        self.count = 0
        self.back: list[tuple[int, str]] = []  # put back, the next to hand out last
        self.taken: list[tuple[int, str]] = []
        self.log: list[tuple[int, str]] | None = None  # every line handed out, while a trial reads ahead

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.back:
            item = self.back.pop()
        else:
            line = self._read()
            if not line:
                raise StopIteration
            self.count += 1
            item = (self.count, line)
        self.taken.append(item)
        if self.log is not None:
            self.log.append(item)
        return item[1]

    def put_back(self, items: Sequence[tuple[int, str]]) -> None:
        self.back.extend(reversed(items))


@functools.cache
def _rfc_pattern(delimiter: str) -> re.Pattern:
    d = re.escape(delimiter)
    field = rf'(?:"(?:[^"]|"")*+"|[^"{d}\r\n]*+)'
    return re.compile(rf"{field}(?:{d}{field})*+(?:\r\n|\r|\n)?")


def _rfc_record(lines: Sequence[tuple[int, str]], delimiter: str) -> bool:
    """Whether a record's raw lines are well-formed CSV (RFC 4180): every quote opens a field, closes it before a
    delimiter or the line's end, or is doubled inside it. A swallowed record written by a CSV writer is; the
    continuation of a legitimate multi-line cell is not (its closing quote ends a field that did not open with one)."""
    return _rfc_pattern(delimiter).fullmatch("".join(line for _, line in lines)) is not None


class _CarefulReader:
    """Records of a CSV file read with the csv module over numbered physical lines: each well-formed record as its
    fields, each damaged one as None with its first line.

    A record is damaged when it does not have the header's width, or when a stray quote made one of its cells
    swallow the records after it. A record that spans several lines is split at the first line break of a cell when
    the lines after that break, up to the record's last line, read again as records, give more well-formed ones
    (the header's width, and well-formed CSV: :func:`_rfc_record`) than not, and at least one: they are the records
    the quote swallowed. For a record of the header's width only candidate cells are tried (:func:`swallowed`), the
    cells the fast path also looks for. The lines before the break are then one malformed row, and the lines after
    it are read as records again. A record of another width that is not split is one malformed row.

    The continuation lines of a legitimate multi-line cell do not read as well-formed records: its last line ends
    with the cell's closing quote, which a well-formed record never holds in the middle of a field.
    """

    def __init__(self, text: io.TextIOBase, layout: Layout) -> None:
        if csv.field_size_limit() < 1 << 30:  # pandas reads cells of any length; so must the careful reader
            csv.field_size_limit(1 << 30)
        self.delimiter = layout.delimiter or ","
        self.lines = _Lines(text)
        self.reader = csv.reader(self.lines, delimiter=self.delimiter)
        _skip_title_rows(self.reader, layout)
        header = next(self._records(), None)  # the first record that is not blank
        self.width = len(header[0]) if header is not None and header[0] is not None else 0

    def _records(self) -> Iterator[tuple[list[str] | None, list[tuple[int, str]]]]:
        """Every record that is not a blank line, with its lines (None for one the csv module refused)."""
        lines, reader = self.lines, self.reader
        while True:
            lines.taken = []
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:  # not expected in the csv module's lenient default mode; a malformed row if it comes
                if lines.taken:
                    yield None, lines.taken
                    continue
                return
            taken = lines.taken
            if not fields or (len(fields) == 1 and len(taken) == 1 and not fields[0].strip()):
                continue  # a blank line, or one of spaces: pandas skips it too
            yield fields, taken

    def _split(self, fields: list[str], taken: list[tuple[int, str]], column: int) -> bool:
        """Whether the record ends at the first line break of cell ``column`` (see the class). If so, the lines
        after the break are left to be read as records; if not, they are dropped as this record's."""
        breaks = sum(len(_BREAK.findall(cell)) for cell in fields[:column])
        rest = taken[breaks + 1 :]
        if not rest:
            return False
        last = taken[-1][0]
        lines = self.lines
        lines.put_back(rest)
        lines.log = []
        good = bad = 0
        for record, record_lines in self._records():
            if record_lines[0][0] > last:
                break
            if record is not None and len(record) == self.width and _rfc_record(record_lines, self.delimiter):
                good += 1
            else:
                bad += 1
        consumed, lines.log = lines.log, None
        lines.put_back(consumed)  # read again either way: as records, or dropped just below
        if good > bad:
            return True
        del lines.back[len(lines.back) - len(rest) :]  # they belong to this record after all
        return False

    def rows(self) -> Iterator[tuple[list[str] | None, int]]:
        """(fields, first line) per data record; fields None for a malformed one."""
        width, delimiter = self.width, self.delimiter
        for fields, taken in self._records():
            first = taken[0][0]
            if fields is None:
                yield None, first
                continue
            if len(taken) > 1:  # a quoted line break: the only place a stray quote can hide records
                candidates = [k for k, cell in enumerate(fields) if "\n" in cell or "\r" in cell]
                if len(fields) == width:
                    candidates = [k for k in candidates if swallowed(fields[k], k, width, delimiter)]
                if any(self._split(fields, taken, k) for k in candidates):
                    yield None, first
                    continue
            yield (fields, first) if len(fields) == width else (None, first)


def _careful_frames(path: Path, layout: Layout, chunk_size: int | None, skip_rows: int = 0) -> Iterator[pd.DataFrame]:
    """The careful reader's rows as frames of ``chunk_size`` rows (one frame when None), with the fast path's column
    names and cell conventions (strings, empty cells missing) plus the MALFORMED_LINE column; the first
    ``skip_rows`` rows (already read by the fast path) are left out."""
    with open(path, "rb") as handle:
        columns = list(pd.read_csv(handle, nrows=0, **csv_options(layout)).columns)
    width = len(columns)
    with open(path, "rb") as handle:
        check = _DecodeCheck(path, layout, handle)
        before = _errors_so_far()
        text = io.TextIOWrapper(handle, encoding=_text_encoding(layout, handle), errors=_error_handler(), newline="")
        careful = _CarefulReader(text, layout)
        if careful.width != width:  # the header itself is read differently: nothing sensible can follow
            raise RecordError(
                f"{path}: the header row has {careful.width} fields as the csv module reads it and "
                f"{width} as pandas reads it; check the file's quoting"
            )
        rows: list[list[str | None]] = []
        marks: list[int | None] = []
        seen = 0
        empty: list[None] = [None] * width
        for fields, line in careful.rows():
            seen += 1
            if seen <= skip_rows:
                continue
            if fields is None:
                rows.append(empty)
                marks.append(line)
            else:
                rows.append([cell if cell != "" else None for cell in fields])
                marks.append(None)
            if chunk_size is not None and len(rows) >= chunk_size:
                check.after_chunk(_errors_so_far() - before)
                yield _careful_frame(rows, marks, columns)
                before = _errors_so_far()
                rows, marks = [], []
        check.after_chunk(_errors_so_far() - before)
        if rows or chunk_size is None:
            yield _careful_frame(rows, marks, columns)


def _careful_frame(rows: list[list[str | None]], marks: list[int | None], columns: list[str]) -> pd.DataFrame:
    cells = list(zip(*rows)) if rows else [()] * len(columns)
    frame = pd.DataFrame({index: pd.Series(list(values), dtype=str) for index, values in enumerate(cells)})
    frame.columns = columns
    frame[MALFORMED_LINE] = pd.array(marks, dtype="Int64")
    return frame


def malformed_lines(frame: pd.DataFrame) -> np.ndarray | None:
    """Per row, the file's line where a malformed record began (0 for a well-formed row), or None if the frame was
    read without the careful reader (every row well-formed)."""
    if MALFORMED_LINE not in frame.columns:
        return None
    return frame[MALFORMED_LINE].fillna(0).to_numpy(dtype=np.int64)


def data_columns(frame: pd.DataFrame) -> list:
    """The export's own columns (without the reader's MALFORMED_LINE)."""
    return [c for c in frame.columns if c != MALFORMED_LINE]


# --------------------------------------------------------------------------------------------------------------------
# Reading


def csv_options(layout: Layout) -> dict:
    """pandas ``read_csv`` keywords for a CSV of this layout: every cell a string, empty cells missing."""
    return {
        "sep": layout.delimiter,
        "dtype": str,
        "keep_default_na": False,
        "na_values": [""],
        "encoding": layout.encoding,
        "encoding_errors": _error_handler(),
        "skiprows": layout.header_skip or None,
    }


class _Vouch:
    """What the fast path checks on each frame pandas' C parser returns before trusting it (a row with too many
    fields stops the C parser itself, with a ParserError)."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path, self.layout = path, layout
        self.widths: bool | None = None  # whether every row has the header's width, once asked

    def clean(self, frame: pd.DataFrame) -> bool:
        if not isinstance(frame.index, pd.RangeIndex):
            return False  # a first data row wider than the header: pandas took its first column as the index
        if frame.shape[1] and frame.iloc[:, -1].isna().any():
            # The C parser pads a row with too few fields with empty cells, so an empty last cell may be one: the
            # whole file's widths are checked once (pyarrow), only for files with such cells.
            if self.widths is None:
                self.widths = _widths_agree(self.path, self.layout)
            if not self.widths:
                return False
        return not _holds_swallowed(frame, self.layout.delimiter or ",")


def _read_csv(path: Path, layout: Layout) -> pd.DataFrame:
    frame = None
    try:
        with open(path, "rb") as handle:
            before = _errors_so_far()
            frame = pd.read_csv(handle, **csv_options(layout))
            invalid = _errors_so_far() - before
    except pd.errors.ParserError:
        frame = None  # a row with too many fields, a quote never closed: the careful reader says which row
    if frame is not None and not _Vouch(path, layout).clean(frame):
        frame = None
    if frame is None:
        log.debug("%s: read by the careful reader", path)
        before = _errors_so_far()
        frame = next(_careful_frames(path, layout, None))
        invalid = _errors_so_far() - before
    _check_column_names(frame, path, layout)
    chars = path.stat().st_size * layout.chars_per_byte
    if _too_many(invalid, chars):
        raise _undecodable(path, layout, min(invalid / max(chars, 1), 1.0), _sample_of(path))
    return _tidy_columns(frame)


def _iter_csv(path: Path, layout: Layout, chunk_size: int) -> Iterator[pd.DataFrame]:
    """Chunks of the C parser while the file is clean; the careful reader's from the first chunk the checks cannot
    vouch for (it skips the rows already given, so chunk k is always the same rows)."""
    given = 0
    vouch = _Vouch(path, layout)
    try:
        with open(path, "rb") as handle:
            check = _DecodeCheck(path, layout, handle)
            before = _errors_so_far()  # opening the reader already reads (and decodes) the header
            with pd.read_csv(handle, chunksize=chunk_size, **csv_options(layout)) as reader:
                first = True
                for chunk in reader:
                    check.after_chunk(_errors_so_far() - before)
                    if first:
                        _check_column_names(chunk, path, layout)
                        first = False
                    if not vouch.clean(chunk):
                        break
                    yield _tidy_columns(chunk)
                    given += len(chunk)
                    before = _errors_so_far()
                else:
                    return
    except pd.errors.ParserError:
        pass  # a row with too many fields, a quote never closed: the careful reader says which row
    log.debug("%s: read by the careful reader from row %d", path, given + 1)
    first = True
    for chunk in _careful_frames(path, layout, chunk_size, skip_rows=given):
        if first:
            _check_column_names(chunk, path, layout)
            first = False
        yield _tidy_columns(chunk)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSON-lines file with their numbers (1-based)."""
    with open(path, encoding="utf-8", errors=_error_handler()) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _jsonl_frame(lines: list[tuple[int, str]]) -> pd.DataFrame:
    """Rows of JSON-lines as pandas reads them, a line that is not a JSON object as a malformed row (every cell
    missing, its line in MALFORMED_LINE)."""
    good = []
    for position, (_, line) in enumerate(lines):
        try:
            if isinstance(json.loads(line), dict):
                good.append(position)
        except ValueError:
            pass
    if good:
        text = "".join(lines[i][1] if lines[i][1].endswith("\n") else lines[i][1] + "\n" for i in good)
        try:
            frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
        except (ValueError, TypeError):  # a line json accepts and pandas does not: one at a time
            kept, frames = [], []
            for i in good:
                try:
                    frames.append(pd.read_json(io.StringIO(lines[i][1]), lines=True, dtype=False))
                    kept.append(i)
                except (ValueError, TypeError):
                    pass
            good = kept
            frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        frame.index = good
    else:
        frame = pd.DataFrame()
    frame = frame.reindex(range(len(lines)))
    marks = [None] * len(lines)
    for position in set(range(len(lines))) - set(good):
        marks[position] = lines[position][0]
    frame[MALFORMED_LINE] = pd.array(marks, dtype="Int64")
    return frame


def _iter_jsonl(path: Path, chunk_size: int) -> Iterator[pd.DataFrame]:
    """pandas' chunks while every line is a JSON object; from the first chunk that is not, the lines one by one
    (the rows already given skipped), each line that is not a JSON object a malformed row."""
    given = 0
    try:
        for chunk in pd.read_json(path, lines=True, chunksize=chunk_size, dtype=False):
            yield chunk
            given += len(chunk)
        return
    except (ValueError, TypeError):
        log.debug("%s: read line by line from row %d", path, given + 1)
    batch: list[tuple[int, str]] = []
    seen = 0
    for item in _jsonl_lines(path):
        seen += 1
        if seen <= given:
            continue
        batch.append(item)
        if len(batch) >= chunk_size:
            yield _jsonl_frame(batch)
            batch = []
    if batch:
        yield _jsonl_frame(batch)


def _read_jsonl(path: Path) -> pd.DataFrame:
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, TypeError):
        return _jsonl_frame(list(_jsonl_lines(path)))


def read_frame(
    path: str | Path, read: ReadOptions | None = None, needed: Sequence[str] = (), layout: Layout | None = None
) -> tuple[pd.DataFrame, Layout]:
    """A whole export as a DataFrame of strings, and how it was read (see :func:`read_table`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in EXCEL_SUFFIXES and layout is None:
            _check_file(path)
            with pd.ExcelFile(path) as book:  # opened once, for the header's detection and the read
                layout = _excel_layout(path, book, read or ReadOptions(), needed)
                frame = pd.read_excel(book, sheet_name=layout.sheet, header=layout.header_skip, dtype=str)
            _log_layout(path, layout)
        else:
            layout = layout or inspect(path, read, needed)
            if layout.kind == "csv":
                frame = _read_csv(path, layout)
            elif layout.kind == "excel":
                frame = pd.read_excel(path, sheet_name=layout.sheet, header=layout.header_skip, dtype=str)
            elif layout.kind == "parquet":
                frame = pd.read_parquet(path)
            elif layout.kind == "jsonl":
                frame = _read_jsonl(path)
            else:
                frame = pd.read_json(path, dtype=False)
    except RecordError:
        raise
    except Exception as error:  # the reader's own message is the useful part; keep the file name in front
        raise RecordError(f"{path}: cannot be read as {suffix[1:]}: {error}") from error
    if frame.empty and len(frame.columns) == 0:
        raise RecordError(f"{path}: no columns found (empty file?)")
    if layout.kind == "excel":
        frame = _tidy_columns(frame)
    return frame, layout


def read_table(
    path: str | Path,
    columns: Sequence[str] | None = None,
    *,
    read: ReadOptions | None = None,
    needed: Sequence[str] = (),
    layout: Layout | None = None,
) -> pd.DataFrame:
    """Read a whole export into a DataFrame of strings, with an error that names the file if it cannot be read.

    ``columns``: columns that must be there (an error names the missing ones). The header is the first row holding
    ``needed`` and ``columns``. ``read``: what the user fixed; ``layout``: how to read it, if already decided.
    """
    frame, _ = read_frame(path, read, tuple(needed) + tuple(columns or ()), layout)
    if columns is not None:
        require_columns(frame, columns, path)
    return frame


def iter_table(
    path: str | Path,
    chunk_size: int = 20_000,
    *,
    read: ReadOptions | None = None,
    needed: Sequence[str] = (),
    layout: Layout | None = None,
) -> Iterator[pd.DataFrame]:
    """Stream an export in chunks of about ``chunk_size`` rows, so memory stays flat whatever the file's size.

    CSV stays a pandas C-engine read; pass ``layout`` (from :func:`inspect`) to read a file several times while
    deciding how to read it only once.
    """
    path = Path(path)
    layout = layout or inspect(path, read, needed)
    try:
        if layout.kind == "csv":
            yield from _iter_csv(path, layout, chunk_size)
        elif layout.kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
                yield batch.to_pandas()
        elif layout.kind == "jsonl":
            yield from _iter_jsonl(path, chunk_size)
        else:  # Excel and whole-document JSON have no streaming reader; they are small by nature.
            frame, _ = read_frame(path, layout=layout)
            for start in range(0, len(frame), chunk_size):
                yield frame.iloc[start : start + chunk_size]
    except RecordError:
        raise
    except Exception as error:
        raise RecordError(f"{path}: cannot be read as {path.suffix.lower()[1:]}: {error}") from error


def require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str | Path) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise RecordError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"the file has {', '.join(map(str, data_columns(frame)))}"
        )
