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
import functools
import csv
import io
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
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
        f"(e.g. --encoding {_suggestion(sample, layout.encoding)})")


def _sample_of(path: Path, start: int = 0) -> bytes:
    """Up to SAMPLE_BYTES of ``path`` from the first whole line at or after byte ``start`` (for a suggestion)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        sample = handle.read(SAMPLE_BYTES)
    if start == 0:
        return sample
    cut = sample.find(b"\n")
    return sample[cut + 1:] if cut >= 0 else sample


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
            f"(e.g. --encoding {_suggestion(_sample_of(path), layout.encoding)})")


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
    return sample[:cut + 1] if cut > 0 else sample


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


def _resolve_encoding(path: Path, head: bytes, handle: io.BufferedReader,
                      given: str | None) -> tuple[str, str, int, bytes | None]:
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
            raise RecordError(f"{path}: starts with a {label} byte-order mark, but --encoding {given} was given; "
                              "drop --encoding (the mark says how the file is encoded)")
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
        head = head[:head.rfind("\n") + 1] or head
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
        raise RecordError(f"{path}: unsupported file type '{path.suffix}'; "
                          f"use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}")
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
# Reading


def csv_options(layout: Layout) -> dict:
    """pandas ``read_csv`` keywords for a CSV of this layout: every cell a string, empty cells missing."""
    return {"sep": layout.delimiter, "dtype": str, "keep_default_na": False, "na_values": [""],
            "encoding": layout.encoding, "encoding_errors": _error_handler(), "skiprows": layout.header_skip or None}


def _read_csv(path: Path, layout: Layout) -> pd.DataFrame:
    with open(path, "rb") as handle:
        before = _errors_so_far()
        frame = pd.read_csv(handle, **csv_options(layout))
        invalid = _errors_so_far() - before
    _check_column_names(frame, path, layout)
    chars = path.stat().st_size * layout.chars_per_byte
    if _too_many(invalid, chars):
        raise _undecodable(path, layout, min(invalid / max(chars, 1), 1.0), _sample_of(path))
    return _tidy_columns(frame)


def _iter_csv(path: Path, layout: Layout, chunk_size: int) -> Iterator[pd.DataFrame]:
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
                yield _tidy_columns(chunk)
                before = _errors_so_far()


def read_frame(path: str | Path, read: ReadOptions | None = None, needed: Sequence[str] = (),
               layout: Layout | None = None) -> tuple[pd.DataFrame, Layout]:
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
            else:
                frame = pd.read_json(path, lines=layout.kind == "jsonl", dtype=False)
    except RecordError:
        raise
    except Exception as error:  # the reader's own message is the useful part; keep the file name in front
        raise RecordError(f"{path}: cannot be read as {suffix[1:]}: {error}") from error
    if frame.empty and len(frame.columns) == 0:
        raise RecordError(f"{path}: no columns found (empty file?)")
    if layout.kind == "excel":
        frame = _tidy_columns(frame)
    return frame, layout


def read_table(path: str | Path, columns: Sequence[str] | None = None, *, read: ReadOptions | None = None,
               needed: Sequence[str] = (), layout: Layout | None = None) -> pd.DataFrame:
    """Read a whole export into a DataFrame of strings, with an error that names the file if it cannot be read.

    ``columns``: columns that must be there (an error names the missing ones). The header is the first row holding
    ``needed`` and ``columns``. ``read``: what the user fixed; ``layout``: how to read it, if already decided.
    """
    frame, _ = read_frame(path, read, tuple(needed) + tuple(columns or ()), layout)
    if columns is not None:
        require_columns(frame, columns, path)
    return frame


def iter_table(path: str | Path, chunk_size: int = 20_000, *, read: ReadOptions | None = None,
               needed: Sequence[str] = (), layout: Layout | None = None) -> Iterator[pd.DataFrame]:
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
            yield from pd.read_json(path, lines=True, chunksize=chunk_size, dtype=False)
        else:  # Excel and whole-document JSON have no streaming reader; they are small by nature.
            frame, _ = read_frame(path, layout=layout)
            for start in range(0, len(frame), chunk_size):
                yield frame.iloc[start:start + chunk_size]
    except RecordError:
        raise
    except Exception as error:
        raise RecordError(f"{path}: cannot be read as {path.suffix.lower()[1:]}: {error}") from error


def require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str | Path) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise RecordError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                          f"the file has {', '.join(map(str, frame.columns))}")
