"""Batch scoring of archives: streamed in chunks, spread over processes, resumable after a crash, and on Dask.

One function, :func:`score_chunk`, turns a chunk of an export into scored rows. It maps the export's columns onto
the record schema (:func:`sanshi_ml.data.records.canonical_frame`), gives every row a ``status`` (a bad row gets its
reason and empty predictions, and never sinks its chunk), and scores the good rows with
:meth:`sanshi_ml.suggest.Suggester.score_frame`, the function the server's answers come from too. The local run
(:func:`score`) and the Dask run (:func:`score_dask`) both call it.

A local run reads the inputs in chunks of a fixed size, so chunk *k* is always the same rows. Each chunk's output is
written atomically (temporary file + ``os.replace``) into ``<out>.parts/`` and then checkpointed with a small JSON
marker. ``--resume`` skips every chunk whose part and marker exist, after checking that the run's fingerprint (model,
policy, inputs, chunk size, columns) is the one recorded; the final file is assembled from the parts in order, so it
holds every input record exactly once. A CSV row the reader found damaged keeps its place with status
``malformed``, so the output still has one row per input record.

A run holds a lock on its output for its whole length (:func:`sanshi_ml.data.outputs.output_lock`), so a second run on
the same ``--out``, ``--resume`` included, refuses instead of writing into the first's parts; everything a run writes
besides the output itself (parts, checkpoints, the assembly's temporary file) lives in the parts directory, which the
finished run removes.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from sanshi_ml.config import MAX_TEXT_CHARS
from sanshi_ml.core.text import build_unassigned_table
from sanshi_ml.data.outputs import atomic_file, atomic_write_bytes, check_writable, output_lock, writing
from sanshi_ml.data.readers import MALFORMED_LINE, data_columns, malformed_lines
from sanshi_ml.data.records import (
    CSV_SUFFIXES,
    EXCEL_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    ColumnMap,
    Layout,
    ReadOptions,
    RecordError,
    canonical_frame,
    header_columns,
    inspect,
    iter_table,
    model_input,
    resolve_columns,
)
from sanshi_ml.suggest import STATUS_OK, Suggester, text_status

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PART_FORMAT = "{:06d}"
STATUS_MALFORMED = "malformed"  # a CSV row the reader found damaged (a stray quote, too many or too few fields)
ASSEMBLY_PAUSE_ENV = "SANSHI_TEST_ASSEMBLY_PAUSE"  # tests: seconds to wait before the assembled file is renamed
SCORE_BATCH = 2048  # rows per call to score_frame: bounds the memory of tokens and feature matrices per worker
OUTPUT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class ScoringError(RecordError):
    """A scoring run that cannot start or resume; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# What one chunk becomes


@dataclass(frozen=True)
class ScoringSpec:
    """Everything :func:`score_chunk` needs besides the model: which columns, which limits, which extra columns."""

    columns: ColumnMap
    max_text_chars: int = MAX_TEXT_CHARS
    keep_cols: tuple[str, ...] = ()
    prefix_row_ids: bool = False  # several inputs without an id column: "file.csv:row12" keeps ids unique

    def text_columns(self) -> list[str]:
        return list(self.columns.text_cols) or [self.columns.segmented_col]


def output_schema(suggester: Suggester, keep_cols: Sequence[str] = ()) -> pa.Schema:
    """The columns of a scored archive, in order: id, received_at, kept input columns, per target T: T,
    T_confidence, T_needs_review (and for the 三事 target T_colour, T_handling_mode), policy_conflict, status,
    model_version."""
    fields = [pa.field("id", pa.string()), pa.field("received_at", pa.timestamp("us"))]
    fields += [pa.field(column, pa.string()) for column in keep_cols]
    for target in suggester.targets:
        fields += [
            pa.field(target, pa.string()),
            pa.field(f"{target}_confidence", pa.float32()),
            pa.field(f"{target}_needs_review", pa.bool_()),
        ]
        if target == suggester.sanshi_target:
            fields += [pa.field(f"{target}_colour", pa.string()), pa.field(f"{target}_handling_mode", pa.string())]
    fields += [
        pa.field("policy_conflict", pa.bool_()),
        pa.field("status", pa.string()),
        pa.field("model_version", pa.string()),
    ]
    return pa.schema(fields)


def _cell_problem(value: object) -> str | None:
    """A text cell that is not a string (or missing), or holds characters that cannot be used."""
    if not isinstance(value, str):
        missing = value is None or value is pd.NA or (np.isscalar(value) and pd.isna(value))
        return None if missing else "not_text"
    if "\ufffd" in value:
        return "undecodable"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes): nothing downstream can handle them
        return "undecodable"
    return None


def _row_statuses(
    raw: pd.DataFrame, canon: pd.DataFrame, spec: ScoringSpec, cell_problems: list[str | None]
) -> np.ndarray:
    """``ok`` or the reason a row is not scored; the rule is the server's: ``text_status`` of the request text."""
    statuses = np.empty(len(canon), dtype=object)
    for row, (problem, body) in enumerate(zip(cell_problems, canon["text"].tolist())):
        statuses[row] = problem or text_status(body, spec.max_text_chars)
    return statuses


def _sanitised(raw: pd.DataFrame, spec: ScoringSpec) -> tuple[pd.DataFrame, list[str | None]]:
    """The chunk with unusable text cells emptied, and per row the first cell problem (None if none)."""
    problems: list[str | None] = [None] * len(raw)
    columns = [c for c in spec.text_columns() if c in raw.columns]
    replaced = {}
    for column in columns:
        values = raw[column].tolist()
        found = [_cell_problem(v) for v in values]
        if any(found):
            replaced[column] = [None if p else v for v, p in zip(values, found)]
            problems = [old or new for old, new in zip(problems, found)]
    if replaced:
        raw = raw.assign(**{c: pd.Series(v, index=raw.index, dtype=object) for c, v in replaced.items()})
    return raw, problems


def _timestamps(series: pd.Series) -> pa.Array:
    """Received times as naive timestamps (a time zone, if any, is dropped and the wall-clock time kept)."""
    if not pd.api.types.is_datetime64_any_dtype(series):
        series = pd.to_datetime(series, errors="coerce", utc=True).dt.tz_localize(None)
    elif getattr(series.dt, "tz", None) is not None:
        series = series.dt.tz_localize(None)
    return pa.array(series.astype("datetime64[us]"), type=pa.timestamp("us"), from_pandas=True)


def score_chunk(
    raw: pd.DataFrame, suggester: Suggester, spec: ScoringSpec, source: str | Path = "input", row_offset: int = 0
) -> pd.DataFrame:
    """Score one chunk of an export: the per-chunk function of both the local run and the Dask run.

    ``row_offset`` is the position of the chunk's first row in its file (ids default to the row number). Returns a
    frame with :func:`output_schema`'s columns (Arrow-backed dtypes); rows keep the input order.
    """
    raw, problems = _sanitised(raw, spec)
    canon = canonical_frame(raw, spec.columns, source, row_offset)
    statuses = _row_statuses(raw, canon, spec, problems)
    lines = malformed_lines(raw)
    malformed = np.flatnonzero(lines) if lines is not None else np.empty(0, dtype=np.int64)
    statuses[malformed] = STATUS_MALFORMED
    good = np.flatnonzero(statuses == STATUS_OK)
    texts = [
        model_input(title, text) for title, text in zip(canon["title"].to_numpy()[good], canon["text"].to_numpy()[good])
    ]
    scored = [suggester.score_frame(texts[i : i + SCORE_BATCH]) for i in range(0, len(texts), SCORE_BATCH)]
    schema = output_schema(suggester, spec.keep_cols)
    n = len(canon)
    ids = canon["id"].astype(object).to_numpy()
    name = Path(str(source)).name
    if spec.prefix_row_ids and not spec.columns.id_col:
        ids = np.asarray([f"{name}:{i}" for i in ids], dtype=object)
    if len(malformed):  # no cell of a damaged row can be trusted, its id neither: its line in the file instead
        ids = ids.copy()
        ids[malformed] = [f"{name}:line{lines[i]}" if spec.prefix_row_ids else f"line{lines[i]}" for i in malformed]
    arrays: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.string()),
        "received_at": _timestamps(canon["received_at"]),
    }
    for column in spec.keep_cols:
        arrays[column] = pa.array(
            raw[column].astype("string").astype(object).to_numpy(), type=pa.string(), from_pandas=True
        )
    predicted = pd.concat(scored, ignore_index=True) if scored else None
    for name in schema.names:
        if name in arrays or name in ("status", "model_version"):
            continue
        kind = schema.field(name).type
        if predicted is None:
            arrays[name] = pa.nulls(n, type=kind)
            continue
        # Bad rows keep empty (null) predictions; good rows get score_frame's values in their places.
        values = np.full(n, None, dtype=object)
        values[good] = predicted[name].to_numpy(dtype=object)
        arrays[name] = pa.array(values, type=kind, from_pandas=True)
    arrays["status"] = pa.array(statuses, type=pa.string())
    arrays["model_version"] = pa.array([suggester.version] * n, type=pa.string())
    table = pa.table([arrays[name] for name in schema.names], schema=schema)
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def empty_output(suggester: Suggester, keep_cols: Sequence[str] = ()) -> pd.DataFrame:
    """A zero-row frame with the output's columns and dtypes (the ``meta`` Dask needs)."""
    return output_schema(suggester, keep_cols).empty_table().to_pandas(types_mapper=pd.ArrowDtype)


# --------------------------------------------------------------------------------------------------------------------
# Inputs, chunks and the run's fingerprint


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Paths and glob patterns to existing files, in the order given (each pattern's matches sorted)."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise RecordError(f"{text}: no files match this pattern")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(text))
    if not paths:
        raise RecordError("no input files given")
    for path in paths:
        if not path.exists():
            raise RecordError(f"{path}: file not found")
        if path.suffix.lower() not in CSV_SUFFIXES | PARQUET_SUFFIXES | JSONL_SUFFIXES | EXCEL_SUFFIXES:
            raise RecordError(f"{path}: unsupported file type '{path.suffix}'; use CSV, Excel, Parquet or JSONL")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise RecordError("the same input file is given twice: its records would be scored twice")
    return paths


def model_columns(metadata: dict) -> ColumnMap:
    """The column map recorded with the model (how its training export was read), without the targets."""
    from sanshi_ml.config import ColumnsConfig

    recorded = metadata.get("columns")
    if not recorded:
        raise ScoringError("the model records no column map; give --text-cols (and --id-col, --time-col)")
    return ColumnMap.from_config(ColumnsConfig.model_validate(recorded)).without_targets()


def read_layouts(paths: Sequence[Path], spec: ScoringSpec, read: ReadOptions | None = None) -> dict[Path, Layout]:
    """How each input is read (encoding, delimiter, sheet, header row), decided once per file on a sample."""
    needed = (*header_columns(spec.columns), *spec.keep_cols)
    return {path: inspect(path, read, needed) for path in paths}


def check_columns(paths: Sequence[Path], spec: ScoringSpec, layouts: dict[Path, Layout] | None = None) -> list[Path]:
    """Fail before any work if an input lacks a needed column, naming the file and the column. Returns the inputs
    that hold no records (only a header)."""
    empty = []
    for path in paths:
        first = next(iter_table(path, chunk_size=1, layout=(layouts or {}).get(path)), None)
        if first is None or not len(first):
            empty.append(path)
            if first is None:
                continue
        resolve_columns(first, spec.columns, path)
        missing = [c for c in spec.keep_cols if c not in first.columns]
        if missing:
            raise RecordError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))} given to --keep-cols; "
                f"the file has {', '.join(map(str, data_columns(first)))}"
            )
    return empty


def _file_fingerprint(path: Path) -> dict:
    """Size, modification time and a hash of the first MiB: enough to notice a changed or swapped input."""
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def run_fingerprint(
    paths: Sequence[Path],
    model_sha256: str,
    policy_sha256: str,
    chunk_size: int,
    spec: ScoringSpec,
    layouts: dict[Path, Layout] | None = None,
) -> dict:
    """What must be the same for ``--resume`` to continue a run: model, policy, inputs and how they are read,
    chunking, columns."""
    layouts = layouts or read_layouts(paths, spec)
    return {
        "model_sha256": model_sha256,
        "policy_sha256": policy_sha256,
        "chunk_size": chunk_size,
        "inputs": [_file_fingerprint(p) for p in paths],
        # Another encoding or header row would give other rows: chunk k would no longer be the same records.
        "reading": [layouts[p].describe() for p in paths],
        "columns": {
            "text_cols": list(spec.columns.text_cols),
            "id_col": spec.columns.id_col,
            "time_col": spec.columns.time_col,
            "segmented_col": spec.columns.segmented_col,
        },
        "keep_cols": list(spec.keep_cols),
        "max_text_chars": spec.max_text_chars,
        "prefix_row_ids": spec.prefix_row_ids,
    }


def _fingerprint_difference(recorded: dict, current: dict) -> str | None:
    labels = {
        "model_sha256": "the model",
        "policy_sha256": "the 三事 policy",
        "chunk_size": "the chunk size",
        "inputs": "the input files",
        "reading": "how the inputs are read (--encoding, --sheet, --header-row)",
        "columns": "the column options",
        "keep_cols": "--keep-cols",
        "max_text_chars": "the text length limit",
        "prefix_row_ids": "the number of inputs",
    }
    for key, label in labels.items():
        if recorded.get(key) != current.get(key):
            return label
    return None


@dataclass
class Chunk:
    """Chunk ``index`` of the run: rows ``row_offset``… of input file ``source``.

    Parquet chunks stay Arrow tables until a worker turns them into a frame: the reading process then holds only
    compact Arrow buffers, and they travel to the worker without becoming Python objects first.
    """

    index: int
    source: Path
    row_offset: int
    data: pd.DataFrame | pa.Table

    def __len__(self) -> int:
        return self.data.num_rows if isinstance(self.data, pa.Table) else len(self.data)

    @property
    def frame(self) -> pd.DataFrame:
        return self.data.to_pandas() if isinstance(self.data, pa.Table) else self.data


def _read_chunks(path: Path, chunk_size: int, layout: Layout | None = None) -> Iterator[pd.DataFrame | pa.Table]:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            # Without pre-buffering the reader holds a 1 MiB window instead of whole column chunks (hundreds of MB
            # for a large row group), so the reading process stays small.
            reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            for batch in reader.iter_batches(batch_size=chunk_size):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as error:
            raise RecordError(f"{path}: cannot be read as parquet: {error}") from error
        return
    yield from iter_table(path, chunk_size, layout=layout)


def iter_chunks(paths: Sequence[Path], chunk_size: int, layouts: dict[Path, Layout] | None = None) -> Iterator[Chunk]:
    """The run's chunks in order: the same inputs, chunk size and layouts always give the same chunks."""
    index = 0
    for path in paths:
        offset = 0
        for data in _read_chunks(path, chunk_size, (layouts or {}).get(path)):
            chunk = Chunk(index, path, offset, data)
            yield chunk
            index += 1
            offset += len(chunk)


def estimate_rows(paths: Sequence[Path]) -> tuple[int | None, bool]:
    """Total rows for the progress bar: exact for Parquet, counted lines (an estimate) for CSV and JSONL."""
    import pyarrow.parquet as pq

    total, exact = 0, True
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            total += pq.ParquetFile(path).metadata.num_rows
        elif suffix in CSV_SUFFIXES | JSONL_SUFFIXES:
            lines = 0
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    lines += block.count(b"\n")
            total += max(lines - (suffix in CSV_SUFFIXES), 0)
            exact = False  # a quoted cell may span lines
        else:
            return None, False
    return total, exact


# --------------------------------------------------------------------------------------------------------------------
# Parts and checkpoints


def part_paths(parts_dir: Path, index: int) -> tuple[Path, Path]:
    """The part file of chunk ``index`` and its checkpoint marker."""
    stem = PART_FORMAT.format(index)
    return parts_dir / f"{stem}.parquet", parts_dir / f"{stem}.done.json"


def write_part(parts_dir: Path, chunk: Chunk, frame: pd.DataFrame, schema: pa.Schema) -> dict:
    """Write a chunk's output atomically, then its checkpoint marker; returns the marker."""
    import pyarrow.parquet as pq

    part, marker = part_paths(parts_dir, chunk.index)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    with writing(part, "a part of the scored output"), atomic_file(part) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    done = {
        "chunk": chunk.index,
        "source": str(chunk.source),
        "row_offset": chunk.row_offset,
        "rows": len(frame),
        "status": dict(Counter(frame["status"].tolist())),
    }
    with writing(marker, "a checkpoint"):
        atomic_write_bytes(marker, json.dumps(done, ensure_ascii=False).encode("utf-8"))
    return done


def read_marker(parts_dir: Path, index: int) -> dict | None:
    """The checkpoint of chunk ``index`` if both it and its part file exist and agree, else None."""
    part, marker = part_paths(parts_dir, index)
    if not (part.exists() and marker.exists()):
        return None
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
        import pyarrow.parquet as pq

        if pq.ParquetFile(part).metadata.num_rows != done["rows"]:
            return None
    except (ValueError, KeyError, OSError, pa.ArrowException):
        return None
    return done


def assemble(parts_dir: Path, n_chunks: int, out: Path, fmt: str, schema: pa.Schema) -> int:
    """Concatenate the parts in chunk order into ``out``: written to a temporary file in the parts directory (beside
    ``out``, so on its file system), then renamed. A run killed while assembling leaves that file in the parts
    directory, which the resumed run removes with the rest."""
    with writing(out, "the scored output"):
        return _assemble(parts_dir, n_chunks, out, fmt, schema)


def _assemble(parts_dir: Path, n_chunks: int, out: Path, fmt: str, schema: pa.Schema) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = 0
    with atomic_file(out, temp_dir=parts_dir) as tmp:
        if fmt == "parquet":
            with pq.ParquetWriter(str(tmp), schema, compression="zstd") as writer:
                for index in range(n_chunks):
                    table = pq.read_table(part_paths(parts_dir, index)[0], schema=schema)
                    writer.write_table(table)
                    rows += table.num_rows
        else:
            import pyarrow.compute as pc

            times = schema.get_field_index("received_at")
            csv_schema = schema.set(times, pa.field("received_at", pa.string()))
            with open(tmp, "wb") as handle:
                handle.write("\ufeff".encode())  # a BOM, so spreadsheet programs read the Chinese text as UTF-8
                with pacsv.CSVWriter(handle, csv_schema) as writer:
                    for index in range(n_chunks):
                        table = pq.read_table(part_paths(parts_dir, index)[0], schema=schema)
                        # "2024-03-05 08:30:00", not Arrow's "2024-03-05 08:30:00.000000" (the Parquet output
                        # keeps fractions of a second; received times in hotline exports have none)
                        seconds = table.column(times).cast(pa.timestamp("s"), safe=False)
                        table = table.set_column(times, "received_at", pc.strftime(seconds, format="%Y-%m-%d %H:%M:%S"))
                        writer.write_table(table)
                        rows += table.num_rows
        pause = os.environ.get(ASSEMBLY_PAUSE_ENV)
        if pause:  # lets a test kill the run at the worst moment: the output complete, not yet in place
            time.sleep(float(pause))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Worker processes


_WORKER: dict = {}


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the scoring process dies (kill -9 included), so no orphan keeps writing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown handling is all there is
        return
    if os.getppid() != _WORKER.get("parent_pid"):
        os._exit(1)  # the parent died before prctl took effect


def _init_worker(
    parent_pid: int,
    model_dir: str | None,
    policy_path: str | None,
    spec: ScoringSpec,
    parts_dir: str,
    schema: pa.Schema,
) -> None:
    """Per worker, once: with fork the model is inherited from the parent; with spawn it is loaded here."""
    _WORKER["parent_pid"] = parent_pid
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if "suggester" not in _WORKER:
        from sanshi_ml.artifacts import load_model

        _WORKER["suggester"] = Suggester.from_loaded(load_model(model_dir), policy_path)
    _WORKER.update(spec=spec, parts_dir=Path(parts_dir), schema=schema)


def release_memory() -> None:
    """Hand freed memory back to the OS (Arrow's pool and glibc's heap keep it otherwise), so that a long run's
    resident memory reflects what it holds, not its peak."""
    pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _score_and_write(chunk: Chunk) -> dict:
    """Worker task: score a chunk and checkpoint it; only the small marker travels back."""
    frame = score_chunk(chunk.frame, _WORKER["suggester"], _WORKER["spec"], chunk.source, chunk.row_offset)
    marker = write_part(_WORKER["parts_dir"], chunk, frame, _WORKER["schema"])
    del frame, chunk
    release_memory()
    return marker


def resolve_jobs(jobs: int) -> int:
    """``0`` means every core this process may use."""
    if jobs < 0:
        raise ScoringError(f"--jobs must be 0 (all cores) or more, got {jobs}")
    if jobs:
        return jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------------------
# The local run


@dataclass
class ScoreResult:
    """What a run did."""

    out: Path
    rows: int
    chunks: int
    resumed_chunks: int
    seconds: float
    status: dict[str, int] = field(default_factory=dict)
    model_version: str = ""
    jobs: int = 1

    @property
    def records_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items(), key=lambda kv: -kv[1]))
        resumed = f", {self.resumed_chunks} of {self.chunks} chunks from the checkpoint" if self.resumed_chunks else ""
        return [
            f"scored {self.rows} records into {self.out} with model {self.model_version} in {self.seconds:.1f}s "
            f"({self.records_per_second:,.0f} records/s, {self.jobs} process(es){resumed})",
            f"status: {statuses}",
        ]


def output_format(out: Path) -> str:
    fmt = OUTPUT_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise ScoringError(f"{out}: output must end in .parquet or .csv")
    return fmt


def parts_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _prepare_parts_dir(parts_dir: Path, fingerprint: dict, resume: bool, overwrite: bool) -> None:
    run_file = parts_dir / RUN_FILE
    if run_file.exists() and not resume and not overwrite:
        raise ScoringError(
            f"{parts_dir} holds an unfinished run: pass --resume to finish it, or --overwrite to "
            "start again from scratch"
        )
    if resume:
        if not run_file.exists():
            raise ScoringError(f"nothing to resume: {run_file} not found (run without --resume to start)")
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        difference = _fingerprint_difference(recorded.get("fingerprint", {}), fingerprint)
        if difference:
            raise ScoringError(
                f"refusing to resume: {difference} differ from the interrupted run recorded in "
                f"{run_file}; finish it with the same options, or pass --overwrite to start again"
            )
        # What the interrupted run was writing when it died (a part, the assembly): no run holds them now (the lock).
        for stale in parts_dir.glob(".*"):
            stale.unlink(missing_ok=True)
        return
    with writing(parts_dir, "the run's parts"):
        if parts_dir.exists():
            shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True)
        atomic_write_bytes(
            run_file,
            json.dumps({"fingerprint": fingerprint, "started_at": time.time()}, ensure_ascii=False, indent=2).encode(
                "utf-8"
            ),
        )


def _progress_bar(total: int | None, exact: bool, initial: int, enabled: bool):
    from tqdm import tqdm

    desc = "scoring" if exact or total is None else "scoring (total ≈)"
    return tqdm(
        total=total,
        initial=initial,
        unit="rec",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        mininterval=1.0,
        smoothing=0.1,
        dynamic_ncols=True,
    )


def score(
    inputs: Sequence[str | Path],
    model_dir: str | Path,
    out: str | Path,
    *,
    columns: ColumnMap | None = None,
    chunk_size: int = 10_000,
    jobs: int = 0,
    resume: bool = False,
    dask: str | None = None,
    keep_cols: Sequence[str] = (),
    max_text_chars: int = MAX_TEXT_CHARS,
    policy_path: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_parts: bool = False,
    read: ReadOptions | None = None,
    say: Callable[[str], None] | None = None,
) -> ScoreResult:
    """Score archives into one Parquet or CSV file (or, with ``dask``, a Parquet directory written by a cluster).

    ``columns``: how the inputs' columns map onto the record schema; None uses the column map recorded with the
    model. ``jobs``: worker processes (0 = every core). ``resume``: finish an interrupted run of the same inputs,
    model and options. ``read``: encoding, sheet and header row fixed by the user (default: detected per file).
    """
    say = say or log.info
    if chunk_size < 1:
        raise ScoringError(f"--chunk-size must be at least 1, got {chunk_size}")
    paths = expand_inputs(inputs)
    out = Path(out)
    if not dask:
        output_format(out)
        if out.exists() and out.is_dir():
            raise ScoringError(f"{out} is a directory; give a file name ending in .parquet or .csv")
    check_writable(out.parent, "scored output")  # before the work, not when the first part is written
    with output_lock(out):  # held until the run ends, so a second run on this output refuses instead of interfering
        return _score(
            paths,
            model_dir,
            out,
            columns=columns,
            chunk_size=chunk_size,
            jobs=jobs,
            resume=resume,
            dask=dask,
            keep_cols=keep_cols,
            max_text_chars=max_text_chars,
            policy_path=policy_path,
            overwrite=overwrite,
            progress=progress,
            keep_parts=keep_parts,
            read=read,
            say=say,
        )


def _score(
    paths: list[Path],
    model_dir: str | Path,
    out: Path,
    *,
    columns: ColumnMap | None,
    chunk_size: int,
    jobs: int,
    resume: bool,
    dask: str | None,
    keep_cols: Sequence[str],
    max_text_chars: int,
    policy_path: str | None,
    overwrite: bool,
    progress: bool,
    keep_parts: bool,
    read: ReadOptions | None,
    say: Callable[[str], None],
) -> ScoreResult:
    from sanshi_ml.artifacts import load_model

    loaded = load_model(model_dir)  # integrity-checked before anything else happens
    spec = ScoringSpec(
        columns=columns or model_columns(loaded.metadata),
        max_text_chars=max_text_chars,
        keep_cols=tuple(keep_cols),
        prefix_row_ids=len(paths) > 1,
    )
    layouts = read_layouts(paths, spec, read)
    for path, layout in layouts.items():
        if layout.summary():
            say(f"{path}: {layout.summary()}")
    empty = check_columns(paths, spec, layouts)
    if len(empty) == len(paths):
        names = ", ".join(map(str, empty))
        raise ScoringError(f"{names}: no records to score, only a header (or nothing) below the column names")
    for path in empty:
        say(f"{path}: no records, only a header")
    suggester = Suggester.from_loaded(loaded, policy_path)
    _check_keep_cols(suggester, spec.keep_cols)
    if dask:
        if resume:
            raise ScoringError(
                "--resume is for local runs; with --dask a failed partition is retried by Dask and "
                "an interrupted run is started again (--overwrite)"
            )
        return score_dask(paths, loaded, suggester, spec, out, dask, overwrite=overwrite, say=say, layouts=layouts)

    fmt = output_format(out)
    schema = output_schema(suggester, spec.keep_cols)
    parts_dir = parts_dir_for(out)
    fingerprint = run_fingerprint(
        paths, loaded.metadata["artifact"]["sha256"], suggester.policy.sha256, chunk_size, spec, layouts
    )
    _prepare_parts_dir(parts_dir, fingerprint, resume, overwrite)
    n_jobs = resolve_jobs(jobs)
    started = time.perf_counter()
    total, exact = estimate_rows(paths)
    status: Counter = Counter()
    rows_done = resumed = n_chunks = 0
    frozen_before = gc.get_freeze_count() > 0
    executor = _start_workers(n_jobs, suggester, model_dir, policy_path, spec, parts_dir, schema)
    bar = None
    try:
        pending: dict[Future, int] = {}

        def collect(block: bool) -> None:
            nonlocal rows_done
            done, _ = wait(list(pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                marker = future.result()  # a worker's exception surfaces here and stops the run
                status.update(marker["status"])
                rows_done += marker["rows"]
                bar.update(marker["rows"])

        bar = _progress_bar(total, exact, 0, progress)
        for chunk in iter_chunks(paths, chunk_size, layouts):
            n_chunks += 1
            marker = read_marker(parts_dir, chunk.index) if resume else None
            if marker is not None and marker["rows"] == len(chunk):
                resumed += 1
                status.update(marker["status"])
                rows_done += marker["rows"]
                bar.update(marker["rows"])
                continue
            if executor is None:
                _WORKER.update(suggester=suggester, spec=spec, parts_dir=parts_dir, schema=schema)
                marker = _score_and_write(chunk)
                status.update(marker["status"])
                rows_done += marker["rows"]
                bar.update(marker["rows"])
                continue
            # One chunk per worker plus one waiting: workers never idle, and memory stays flat however long the
            # archive is.
            while len(pending) > n_jobs:
                collect(block=True)
            pending[executor.submit(_score_and_write, chunk)] = chunk.index
            del chunk
            collect(block=False)
            release_memory()
        while pending:
            collect(block=True)
        if bar.total is not None and bar.n != bar.total:
            bar.total = bar.n
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            _stop_workers(executor, frozen_before)
        _WORKER.clear()  # the in-process path left the suggester here; the caller's next model must not sit beside it
    rows = assemble(parts_dir, n_chunks, out, fmt, schema)
    if rows != rows_done:  # cannot happen unless a part was changed behind the run's back
        raise ScoringError(
            f"{parts_dir}: the parts hold {rows} rows, the checkpoints {rows_done}; rerun with --overwrite"
        )
    if not keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    result = ScoreResult(
        out=out,
        rows=rows,
        chunks=n_chunks,
        resumed_chunks=resumed,
        seconds=time.perf_counter() - started,
        status=dict(status),
        model_version=suggester.version,
        jobs=n_jobs,
    )
    for line in result.lines():
        say(line)
    return result


def _check_keep_cols(suggester: Suggester, keep_cols: Sequence[str]) -> None:
    taken = set(output_schema(suggester).names)
    clash = [c for c in keep_cols if c in taken]
    if clash:
        raise ScoringError(f"--keep-cols {', '.join(clash)}: the output already has a column of that name")
    if len(set(keep_cols)) != len(keep_cols):
        raise ScoringError("--keep-cols names a column twice")


def _start_workers(
    n_jobs: int, suggester: Suggester, model_dir, policy_path, spec: ScoringSpec, parts_dir: Path, schema: pa.Schema
) -> ProcessPoolExecutor | None:
    """A pool of ``n_jobs`` processes, or None to score in this process when one job is asked for.

    On Linux the workers are forked after the model is loaded and warmed up, so they share its pages (the
    coefficients alone are hundreds of MB) instead of each loading a copy; ``gc.freeze`` keeps the collector
    from touching, and so copying, those pages (:func:`_stop_workers` unfreezes once the workers are gone).
    Elsewhere each worker loads the model once in its initializer.
    """
    if n_jobs <= 1:
        return None
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        # Warm-up builds the segmenter's dictionary and the fast TF-IDF index once, before the fork, so they are
        # shared too. Few enough texts that pyarrow's thread pools are not started in the parent.
        suggester.score_frame(["小区电梯坏了一个多月物业不修", "楼上邻居深夜噪音扰民"])
        build_unassigned_table()  # a two-text batch takes the per-text path, which never builds it
        _WORKER["suggester"] = suggester
        gc.collect()
        gc.freeze()
        context = mp.get_context("fork")
        load_dir = None
    else:
        context = mp.get_context("spawn")
        load_dir = str(model_dir)
    executor = ProcessPoolExecutor(
        max_workers=n_jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(os.getpid(), load_dir, policy_path, spec, str(parts_dir), schema),
    )
    # Start every worker now, before this process starts threads of its own (progress bar, Arrow readers).
    for future in [executor.submit(os.getpid) for _ in range(n_jobs)]:
        future.result()
    _WORKER.pop("suggester", None)
    return executor


def _stop_workers(executor: ProcessPoolExecutor, frozen_before: bool) -> None:
    """Shut the pool down, then give this process its garbage collector back: the freeze in :func:`_start_workers`
    was for the forked workers' sake, and a notebook that scored goes on running here, where what it frees later in
    reference cycles must stay collectable. ``frozen_before``: the caller had frozen objects itself; leave them."""
    executor.shutdown(wait=True, cancel_futures=True)
    if not frozen_before:
        gc.unfreeze()


# --------------------------------------------------------------------------------------------------------------------
# Dask


@dataclass
class ModelBundle:
    """What a Dask worker needs to build the Suggester: the model file's bytes, checked, plus the loaded policy."""

    model_bytes: bytes
    sha256: str
    metadata: dict
    policy: object


_DASK_CACHE: dict[str, Suggester] = {}


def _bundle_suggester(bundle: ModelBundle) -> Suggester:
    """The Suggester of a bundle, unpickled once per worker process and then reused by every partition.

    The bytes go through the loader every other path uses (:func:`sanshi_ml.artifacts.model_from_bytes`): their
    sha256, the allow-list unpickler and the type check; the client checked the signature before shipping them."""
    suggester = _DASK_CACHE.get(bundle.sha256)
    if suggester is None:
        from sanshi_ml.artifacts import ArtifactError, model_from_bytes

        try:
            model = model_from_bytes(bundle.model_bytes, bundle.sha256, source="the model a Dask worker received")
        except ArtifactError as error:
            raise ScoringError(str(error)) from None
        suggester = Suggester(model, bundle.policy, bundle.sha256[:12], bundle.metadata)
        _DASK_CACHE.clear()
        _DASK_CACHE[bundle.sha256] = suggester
    return suggester


def _score_partition(
    frame: pd.DataFrame,
    bundle: ModelBundle,
    spec: ScoringSpec,
    places: list[tuple[str, int]],
    partition_info: dict | None = None,
) -> pd.DataFrame:
    """Dask's per-partition call: the same :func:`score_chunk` as the local run."""
    number = partition_info["number"] if partition_info else 0
    source, offset = places[number] if places else ("input", 0)
    return score_chunk(frame, _bundle_suggester(bundle), spec, source, offset)


def _dask_frame(path: Path, layout: Layout | None = None):
    import dask.dataframe as dd

    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return dd.read_parquet(str(path), split_row_groups=True)
    if suffix in CSV_SUFFIXES:
        layout = layout or inspect(path)
        # One partition per CSV file (a block boundary could fall inside a quoted cell that spans lines), read on
        # the worker by the same reader as a local run, with the layout decided here: encoding, delimiter, header
        # row, and the check that the file decodes. Every partition carries the reader's MALFORMED_LINE column, so
        # its columns are the meta's whether or not the file held a damaged row.
        meta = _with_line_column(next(iter_table(path, chunk_size=1, layout=layout)).iloc[:0])
        return dd.from_map(_read_csv_partition, [str(path)], layout=layout, meta=meta)
    raise ScoringError(f"{path}: --dask reads Parquet or CSV; convert {suffix} files first")


def _with_line_column(frame: pd.DataFrame) -> pd.DataFrame:
    if MALFORMED_LINE in frame.columns:
        return frame
    return frame.assign(**{MALFORMED_LINE: pd.array([pd.NA] * len(frame), dtype="Int64")})


def _read_csv_partition(path: str, layout: Layout) -> pd.DataFrame:
    """A CSV input as one Dask partition: the local run's reader, with the MALFORMED_LINE column always there."""
    from sanshi_ml.data.readers import read_table

    return _with_line_column(read_table(path, layout=layout))


def connect(scheduler: str):
    """A distributed Client: ``local:N`` starts a LocalCluster of N single-threaded worker processes."""
    from dask.distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            n_workers = int(scheduler.split(":", 1)[1])
        except ValueError:
            raise ScoringError(f"--dask {scheduler}: expected local:N with N a number of workers") from None
        if n_workers < 1:
            raise ScoringError(f"--dask {scheduler}: at least one worker")
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="20s"), None
    except OSError as error:
        raise ScoringError(f"--dask {scheduler}: cannot reach the scheduler ({error})") from None


def score_dask(
    paths: Sequence[Path],
    loaded,
    suggester: Suggester,
    spec: ScoringSpec,
    out: Path,
    scheduler: str,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
    layouts: dict[Path, Layout] | None = None,
) -> ScoreResult:
    """Score with Dask: ``dask.dataframe`` over the inputs, :func:`score_chunk` per partition, Parquet out.

    The model file's bytes go to every worker once (``client.scatter(..., broadcast=True)``); each worker process
    unpickles them once and reuses the Suggester for all its partitions. The output is a directory of Parquet
    files, one per partition, in input order.
    """
    import dask.dataframe as dd

    say = say or log.info
    if out.suffix.lower() not in (".parquet", ".pq", ""):
        raise ScoringError(f"{out}: --dask writes a Parquet directory; name it *.parquet")
    if out.exists() and not overwrite:
        raise ScoringError(f"{out} exists; pass --overwrite to replace it")
    started = time.perf_counter()
    frames = [_dask_frame(path, (layouts or {}).get(path)) for path in paths]
    places: list[tuple[str, int]] = []
    for path, frame in zip(paths, frames):
        if spec.columns.id_col or resolve_columns(frame._meta, spec.columns, path).id_col:
            places += [(str(path), 0)] * frame.npartitions
        else:  # ids default to row numbers: each partition needs to know where it starts in its file
            lengths = frame.map_partitions(len).compute().tolist()
            places += [(str(path), int(o)) for o in np.cumsum([0] + lengths[:-1])]
    frame = frames[0] if len(frames) == 1 else dd.concat(frames, interleave_partitions=False)
    client, cluster = connect(scheduler)
    try:
        model_path = loaded.path / loaded.metadata["artifact"].get("file", "model.joblib")
        bundle = ModelBundle(
            model_path.read_bytes(), loaded.metadata["artifact"]["sha256"], loaded.metadata, suggester.policy
        )
        if hashlib.sha256(bundle.model_bytes).hexdigest() != bundle.sha256:
            raise ScoringError(f"{model_path} changed since it was loaded")
        shipped = client.scatter(bundle, broadcast=True)
        say(
            f"Dask: {len(client.scheduler_info()['workers'])} workers at {client.scheduler.address}, "
            f"{frame.npartitions} partitions; model {suggester.version} shipped once to each worker"
        )
        scored = frame.map_partitions(
            _score_partition,
            shipped,
            spec,
            places,
            meta=empty_output(suggester, spec.keep_cols),
            align_dataframes=False,
        )
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        with writing(out, "the scored output"):
            scored.to_parquet(
                str(out), schema=output_schema(suggester, spec.keep_cols), write_index=False, compression="zstd"
            )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    rows, status = 0, Counter()
    import pyarrow.parquet as pq

    for part in sorted(out.glob("*.parquet")):
        column = pq.read_table(part, columns=["status"]).column("status").to_pylist()
        rows += len(column)
        status.update(column)
    result = ScoreResult(
        out=out,
        rows=rows,
        chunks=frame.npartitions,
        resumed_chunks=0,
        seconds=time.perf_counter() - started,
        status=dict(status),
        model_version=suggester.version,
        jobs=0,
    )
    for line in result.lines():
        say(line)
    return result
