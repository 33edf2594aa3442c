"""The prepare stage: validate labelled exports and write them as one prepared Parquet file for train and evaluate.

``prepare`` reads the exports with the same loader as ``train`` (so a broken export fails here, with the file and
column named), drops and reports the rows ``train`` would drop (empty texts), joins several exports (the original
labels and the clerks' feedback export) into one, and writes ``records.parquet`` plus ``prepare.json`` (the load
report, the label counts and the data hash).

The prepared file keeps the export's own column names, so the column map in ``params.yaml`` reads it unchanged, and
loading it gives the same records, the same data hash, and therefore the same folds and holdout as loading the
exports directly: a model trained by ``dvc repro`` and one trained by ``sanshi-ml train data/demo/records.csv``
record the same ``data_sha256``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from sanshi_ml.config import Params
from sanshi_ml.data.outputs import atomic_file, check_writable, writing
from sanshi_ml.data.records import ColumnMap, ReadOptions, RecordSet, load_many

log = logging.getLogger(__name__)

PREPARED_FILE = "records.parquet"
REPORT_FILE = "prepare.json"
ID_COLUMN = "id"  # used when the exports have no id column, so the generated row ids survive the round trip
TIME_COLUMN = "received_at"


def export_frame(records: RecordSet, cmap: ColumnMap) -> pd.DataFrame:
    """The records under the export's column names, such that ``load_records(…, cmap)`` gives them back."""
    frame = records.frame
    out: dict[str, object] = {cmap.id_col or ID_COLUMN: frame["id"].astype(str)}
    text_cols = list(cmap.text_cols)
    if len(text_cols) >= 2:
        out[text_cols[0]] = frame["title"]
        out[text_cols[1]] = frame["text"]
        for column in text_cols[2:]:  # already joined into the text column above
            out[column] = ""
    elif text_cols:
        out[text_cols[0]] = frame["text"]
    if cmap.segmented_col:
        out[cmap.segmented_col] = frame["segmented"]
    if frame["received_at"].notna().any():
        out[cmap.time_col or TIME_COLUMN] = frame["received_at"]
    for target, column in cmap.targets.items():
        out[column] = frame[target].astype(object)
    return pd.DataFrame(out)


def label_counts(records: RecordSet) -> dict[str, dict[str, int]]:
    """How many rows carry each label, per target (missing labels not counted)."""
    return {
        target: {str(k): int(v) for k, v in records.frame[target].value_counts().items()} for target in records.targets
    }


def prepare(
    data: Sequence[str | Path],
    params: Params,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Validate ``data``, write ``records.parquet`` and ``prepare.json`` to ``out_dir``; returns the report."""
    say = progress or log.info
    cmap = ColumnMap.from_config(params.data.columns)
    out_dir = Path(out_dir or params.prepare.out_dir)
    check_writable(out_dir, "prepared records")
    records = load_many([str(p) for p in data], cmap, ReadOptions.from_config(params.data))
    for line in records.report.lines():
        say(line)
    frame = export_frame(records, cmap)
    target = out_dir / PREPARED_FILE
    with writing(target, "the prepared records"):
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:  # an interrupted run never leaves half a file for train to read
            frame.to_parquet(tmp, index=False)
    report = {
        "sources": [str(p) for p in data],
        "output": str(target),
        "rows": len(frame),
        "data_sha256": records.content_hash(),
        "load_report": records.report.as_dict(),
        "labels": label_counts(records),
    }
    with writing(out_dir / REPORT_FILE):
        (out_dir / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    say(f"wrote {len(frame)} records to {target} (data sha256 {report['data_sha256'][:12]})")
    return report
