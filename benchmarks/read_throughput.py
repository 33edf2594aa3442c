"""How fast the streamed reader (`records.iter_table`, what `sanshi-ml score` reads CSV with) gets through an archive.

Builds a CSV of real texts from ../shared/data (petitions titles and texts sampled with replacement, each record
with its own id and received time; 100,000 records by default) in UTF-8 and, with --encodings, in the other
encodings a city's system writes, then times `iter_table` over each in --repeats rounds (interleaved, so a host
whose speed drifts moves every encoding alike) and prints the median seconds and records/s.

--before FILE times, in the same rounds, the `iter_table` of another version of the module that defined it (e.g.
`git show 5712621:src/sanshi_ml/data/records.py > /tmp/records_before.py`), on every encoding's archive.

--damaged also times the UTF-8 archive with one stray quote in its 100th record, which the fast path hands to the
careful reader (the csv module, line by line) from the first chunk on: what a damaged file costs to read.

Run: .venv/bin/python benchmarks/read_throughput.py [--records 100000] [--repeats 7] [--encodings utf-8,gb18030]
     [--before /tmp/records_before.py] [--damaged]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sanshi_ml.data.records import iter_table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def build_csv(n: int, path: Path, encoding: str, seed: int = 0) -> Path:
    messages = pd.read_csv(SHARED / "petitions" / "petitions_silver.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    rows = messages.iloc[rng.integers(0, len(messages), n)].reset_index(drop=True)
    frame = pd.DataFrame(
        {
            "工单编号": [f"W{i:08d}" for i in range(n)],
            "标题": rows["留言主题"],
            "诉求内容": rows["留言详情"],
            "受理时间": rows["留言时间"],
        }
    )
    frame.to_csv(path, index=False, encoding=encoding, errors="strict")
    return path


def stray_quote(source: Path, path: Path, record: int) -> Path:
    """A copy of ``source`` with a quote at the start of its ``record``-th record's id (records are numbered from
    1 in their ids): it would swallow the records after it up to the next quoted cell."""
    text = source.read_text(encoding="utf-8")
    at = text.index(f"\nW{record - 1:08d},") + 1
    path.write_text(text[:at] + '"' + text[at:], encoding="utf-8")
    return path


def time_read(path: Path, chunk_size: int, reader=iter_table) -> tuple[float, int]:
    started = time.perf_counter()
    rows = sum(len(chunk) for chunk in reader(path, chunk_size))
    return time.perf_counter() - started, rows


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("records_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["records_before"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--encodings", default="utf-8", help="comma-separated, e.g. utf-8,gb18030,utf-8-sig")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None, help="an older module defining iter_table")
    parser.add_argument("--damaged", action="store_true", help="also time an archive with one stray quote")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sanshi-read-"))
    workdir.mkdir(parents=True, exist_ok=True)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    paths = {e: build_csv(args.records, workdir / f"archive-{e}.csv", e) for e in encodings}
    runs = {e: (paths[e], iter_table) for e in encodings}
    if args.before:
        before = load_module(args.before).iter_table
        runs.update({f"{e}, before": (paths[e], before) for e in encodings})
    if args.damaged:
        utf8 = paths.get("utf-8") or build_csv(args.records, workdir / "archive-utf-8.csv", "utf-8")
        runs["utf-8, damaged"] = (stray_quote(utf8, workdir / "archive-damaged.csv", 100), iter_table)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for path, reader in runs.values():  # warm the page cache and the imports
        time_read(path, args.chunk_size, reader)
    for _ in range(args.repeats):
        for name, (path, reader) in runs.items():
            seconds, rows = time_read(path, args.chunk_size, reader)
            assert rows == args.records, (rows, args.records)
            times[name].append(seconds)
    for name, values in times.items():
        median = statistics.median(values)
        size = runs[name][0].stat().st_size / 2**20
        print(
            f"{name:>14}: {size:6.1f} MiB, median {median:.3f} s of {len(values)} "
            f"(min {min(values):.3f}, max {max(values):.3f}), {args.records / median:,.0f} records/s"
        )


if __name__ == "__main__":
    main()
