"""Batch scoring throughput and memory, against a fastText reference measured in the same run.

1. Builds archives of real texts from ../shared/data (petitions + 附件3 + 附件4 titles and texts, about 14,200
   messages, sampled with replacement and shuffled, each record with its own id and received time) as Parquet:
   200,000 records, and 1,000,000 for the memory check.
2. Trains (or reuses) a model on petitions_silver.csv: title + text, four targets (category, 三事, unit, appeal).
3. Times, in this run, on the same 200,000 records, in --repeats rounds (each round runs all three, so a host whose
   speed drifts moves both sides of a round's ratio alike; the ratios reported are the medians of the rounds'):
   - `sanshi-ml score` with every core (--jobs 0), end to end: process start, model load, reading, scoring all four
     targets with the policy, writing Parquet.
   - the reference: rjieba segmentation + predict of a fastText supervised model (fasttext-numpy2-wheel, trained
     here on the same petitions texts, one target: category), reading the same Parquet, single process and with
     every core (one process per core, each with its own rjieba; the fastText model shared by fork). For context
     also four fastText models, one per target (the job sanshi-ml does), in one process.
   - ceilings, with every core: rjieba segmentation alone (the reference without fastText), and sanshi-ml's own
     first two stages alone (normalisation and segmentation, no features, model or output). Reading and
     segmenting alone reach these rates here, so they bound, up to how the cutting is batched, any pipeline that
     segments with rjieba, whatever comes after segmentation.
4. Prints records/s, the ratios, peak memory of the whole process tree (sum of RSS, and sum of PSS, which counts
   pages shared between processes once), the CPU time per record, and then scores the 1,000,000-record archive to
   show that the peak does not grow with the archive, followed by the all-cores reference on the same archive (the
   ratio once the start-up is spread over many records, as in a yearly archive).

`--profile` first runs pyinstrument over score_chunk on one 20,000-record chunk and prints where the time goes.

Run: .venv/bin/python benchmarks/score_throughput.py [--records 200000] [--big 1000000] [--repeats 3] [--profile]
The machine's load average is printed before and after: other work on the machine lowers every figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SANSHI_ML = str(Path(sys.executable).with_name("sanshi-ml"))
COLUMN_ARGS = ["--text-cols", "标题,诉求内容", "--id-col", "工单编号", "--time-col", "受理时间"]
PETITION_TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


# --------------------------------------------------------------------------------------------------------------------
# Data and model


def real_messages() -> pd.DataFrame:
    """Title, text and time of every real message: petitions, 附件3 and 附件4 (a message may appear twice)."""
    frames = [pd.read_csv(SHARED / "petitions" / "petitions_silver.csv", dtype=str, keep_default_na=False)]
    for name in ("fj3_unlabeled.csv", "fj4_replies_with_derived_unit.csv"):
        frames.append(pd.read_csv(SHARED / "tipdm2020_c" / name, dtype=str, keep_default_na=False))
    messages = pd.concat([f[["留言主题", "留言详情", "留言时间"]] for f in frames], ignore_index=True)
    return messages.rename(columns={"留言主题": "标题", "留言详情": "诉求内容", "留言时间": "受理时间"})


def build_archive(messages: pd.DataFrame, n: int, path: Path, seed: int = 0) -> Path:
    """``n`` records sampled with replacement from ``messages`` (so shuffled), written in 100,000-row batches."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([(c, pa.string()) for c in ("工单编号", "标题", "诉求内容", "受理时间")])
    with pq.ParquetWriter(tmp, schema) as w:
        for start in range(0, n, 100_000):
            size = min(100_000, n - start)
            rows = messages.iloc[rng.integers(0, len(messages), size)].reset_index(drop=True)
            rows.insert(0, "工单编号", [f"A{start + i:09d}" for i in range(size)])
            w.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False), row_group_size=50_000)
    tmp.replace(path)
    return path


def petitions_model(model_dir: Path) -> Path:
    """The model the benchmark scores with: trained on petitions, four targets (reused if already there)."""
    if (model_dir / "metadata.json").exists():
        return model_dir
    from sanshi_ml.config import load_params, with_overrides
    from sanshi_ml.stages.train import train

    params = load_params(REPO / "params.yaml")
    params = with_overrides(
        params,
        {
            "data.columns": {
                "id_col": "留言编号",
                "text_cols": ["留言主题", "留言详情"],
                "time_col": "留言时间",
                "segmented_col": None,
                "targets": PETITION_TARGETS,
            },
            "split.stratify_target": "category",
            "tracking.enabled": False,
        },
    )
    print(f"training the benchmark model on petitions into {model_dir} …", flush=True)
    train(
        [SHARED / "petitions" / "petitions_silver.csv"],
        params,
        model_dir=model_dir,
        progress=lambda _m: None,
        track=False,
    )
    return model_dir


# --------------------------------------------------------------------------------------------------------------------
# Measuring a process tree


class TreeMonitor:
    """Peak memory of a process and all its descendants: sum of RSS, and sum of PSS (shared pages counted once)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                    if tick % 3 == 0:  # reading smaps is slower: PSS every third sample
                        pss += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            if tick % 3 == 0:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.interval)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_score(archive: Path, model_dir: Path, out: Path) -> dict:
    """One `sanshi-ml score --jobs 0` run, end to end, with its wall time, CPU time and peak memory."""
    cpu0 = children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            SANSHI_ML,
            "score",
            str(archive),
            "--model-dir",
            str(model_dir),
            "--out",
            str(out),
            "--jobs",
            "0",
            "--chunk-size",
            "10000",
            "--no-progress",
            "--overwrite",
            *COLUMN_ARGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeMonitor(proc.pid) as monitor:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"sanshi-ml score failed:\n{stderr}")
    rows = pq.ParquetFile(out).metadata.num_rows
    return {
        "wall": wall,
        "rows": rows,
        "rate": rows / wall,
        "cpu": children_cpu() - cpu0,
        "peak_rss": monitor.peak_rss,
        "peak_pss": monitor.peak_pss,
        "log": stderr.strip().splitlines()[0],
    }


# --------------------------------------------------------------------------------------------------------------------
# The fastText reference


_REF: dict = {}


def _segment(title: str, text: str) -> str:
    # fastText reads one line per example: the cut tokens joined by spaces, newlines removed.
    return " ".join(t for t in _REF["cut"](f"{title}\n{text}") if not t.isspace())


def train_reference(work: Path, target: str = "category"):
    """fastText supervised on the petitions texts (one target), segmented by rjieba: the reference model."""
    import fasttext
    import rjieba

    _REF["cut"] = rjieba.Jieba().cut
    frame = pd.read_csv(SHARED / "petitions" / "petitions_silver.csv", dtype=str, keep_default_na=False)
    column = PETITION_TARGETS[target]
    lines = [
        f"__label__{label} {_segment(t, x)}" for t, x, label in zip(frame["留言主题"], frame["留言详情"], frame[column])
    ]
    train_file = work / f"fasttext_train_{target}.txt"
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fasttext.train_supervised(str(train_file), epoch=25, wordNgrams=2, dim=100, minCount=1, thread=2, verbose=0)


def _reference_batches(archive: Path, batch: int = 20_000, part: int = 0, parts: int = 1):
    for index, chunk in enumerate(pq.ParquetFile(archive).iter_batches(batch_size=batch, columns=["标题", "诉求内容"])):
        if index % parts == part:
            yield chunk.column(0).to_pylist(), chunk.column(1).to_pylist()


def _reference_part(args: tuple[Path, int, int]) -> int:
    """rjieba + fastText predict over this worker's share of the archive's batches."""
    import rjieba

    archive, part, parts = args
    _REF["cut"] = rjieba.Jieba().cut  # each worker its own segmenter
    models, n = _REF["models"], 0
    for titles, texts in _reference_batches(archive, part=part, parts=parts):
        lines = [_segment(t, x) for t, x in zip(titles, texts)]
        for model in models:
            model.predict(lines, k=1)
        n += len(texts)
    return n


def _front_stages_part(args: tuple[Path, int, int]) -> int:
    """sanshi-ml's first two stages only (normalisation, then one rjieba cut per batch, as score_chunk does them)
    over this worker's share of the archive: no features, no model, no output."""
    from sanshi_ml.core.text import mark_titles
    from sanshi_ml.data.records import model_input
    from sanshi_ml.scoring import SCORE_BATCH

    archive, part, parts = args
    model, n = _REF["sanshi_model"], 0
    for titles, texts in _reference_batches(archive, part=part, parts=parts):
        inputs = [model_input(t, x) for t, x in zip(titles, texts)]
        for start in range(0, len(inputs), SCORE_BATCH):
            model.segmenter.raw_cut_joined(model.normalize_many(mark_titles(inputs[start : start + SCORE_BATCH])))
        n += len(texts)
    return n


def _run_parts(part: Callable[[tuple[Path, int, int]], int], archive: Path, jobs: int) -> dict:
    """Time ``part`` over the whole archive with ``jobs`` processes (1 = in this process)."""
    started, cpu_self, cpu_children = time.perf_counter(), time.process_time(), children_cpu()
    if jobs == 1:
        rows = part((archive, 0, 1))
    else:
        pool = mp.get_context("fork").Pool(jobs)
        rows = sum(pool.map(part, [(archive, i, jobs) for i in range(jobs)]))
        pool.close()
        pool.join()  # joined workers count in RUSAGE_CHILDREN
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_self + children_cpu() - cpu_children
    return {"wall": wall, "rows": rows, "rate": rows / wall, "cpu": cpu}


def run_reference(models: list, archive: Path, jobs: int) -> dict:
    """Time the reference over the whole archive with ``jobs`` processes; no models: rjieba segmentation alone."""
    _REF["models"] = models
    return _run_parts(_reference_part, archive, jobs)


def run_front_stages(model_dir: Path, archive: Path, jobs: int) -> dict:
    """Time sanshi-ml's normalisation and segmentation alone over the archive with ``jobs`` processes."""
    if "sanshi_model" not in _REF:
        from sanshi_ml.artifacts import load_model
        from sanshi_ml.core.text import build_unassigned_table

        model = load_model(model_dir).model
        model.segmenter.raw_cut_joined(["小区电梯坏了", "噪音扰民"])  # rjieba's dictionary, before the fork
        build_unassigned_table()
        _REF["sanshi_model"] = model
    return _run_parts(_front_stages_part, archive, jobs)


# --------------------------------------------------------------------------------------------------------------------
# Profile


def profile(archive: Path, model_dir: Path) -> None:
    """pyinstrument over score_chunk on one 20,000-record chunk (after a warm-up chunk)."""
    from pyinstrument import Profiler

    from sanshi_ml.artifacts import load_model
    from sanshi_ml.data.records import ColumnMap
    from sanshi_ml.scoring import ScoringSpec, score_chunk
    from sanshi_ml.suggest import Suggester

    suggester = Suggester.from_loaded(load_model(model_dir))
    spec = ScoringSpec(ColumnMap(text_cols=("标题", "诉求内容"), id_col="工单编号", time_col="受理时间"))
    batches = pq.ParquetFile(archive).iter_batches(batch_size=20_000)
    score_chunk(next(batches).to_pandas().head(5_000), suggester, spec)
    chunk = next(batches).to_pandas()
    profiler = Profiler(interval=0.001)
    cpu = time.process_time()
    profiler.start()
    score_chunk(chunk, suggester, spec)
    profiler.stop()
    cpu = time.process_time() - cpu
    print(
        f"profile of score_chunk on {len(chunk)} records in one process "
        f"({cpu * 1e6 / len(chunk):.0f} µs CPU per record under the profiler):"
    )
    print(profiler.output_text(unicode=True, color=False))


# --------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--big", type=int, default=1_000_000, help="records of the memory check (0 skips it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where archives and the model are kept")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse this model instead of training one")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile of score_chunk first")
    args = parser.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} not found: the benchmark reads the real texts there")
    work = args.workdir or Path(tempfile.gettempdir()) / "sanshi_score_bench"
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(
        f"machine: {cores} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )

    messages = real_messages()
    archive = build_archive(messages, args.records, work / f"archive_{args.records}.parquet")
    print(
        f"archive: {args.records:,} records sampled from {len(messages):,} real messages "
        f"(mean {(messages['标题'].str.len() + messages['诉求内容'].str.len()).mean():.0f} characters)"
    )
    model_dir = petitions_model(args.model_dir or work / "model")
    if args.profile:
        profile(archive, model_dir)

    # The runs are interleaved, round by round (sanshi-ml, reference on 1 process, reference on every core), so a
    # host whose speed drifts during the benchmark (a shared VM's does) moves both sides of each ratio alike.
    reference_model = [train_reference(work)]
    print(
        f"\n{args.repeats} rounds, each: sanshi-ml score --jobs 0 ({cores} processes, 4 targets), then the "
        "reference (rjieba + fastText supervised predict, one target: category) on 1 process and on "
        f"{cores}, same records:",
        flush=True,
    )
    runs, reference_runs, ceiling_runs = [], {1: [], cores: []}, {"rjieba": [], "front": []}
    for i in range(args.repeats):
        runs.append(run_score(archive, model_dir, work / "scored.parquet"))
        r = runs[-1]
        print(
            f"  round {i + 1}: sanshi-ml {r['rate']:,.0f} records/s end to end ({r['wall']:.1f}s), "
            f"{r['cpu'] * 1e6 / r['rows']:.0f} µs CPU per record, peak RSS sum {r['peak_rss'] / 2**20:,.0f} MiB, "
            f"PSS sum {r['peak_pss'] / 2**20:,.0f} MiB\n    {r['log']}",
            flush=True,
        )
        for jobs in reference_runs:
            reference_runs[jobs].append(run_reference(reference_model, archive, jobs))
            ref = reference_runs[jobs][-1]
            print(
                f"    reference, {jobs} process(es): {ref['rate']:,.0f} records/s, "
                f"{ref['cpu'] * 1e6 / ref['rows']:.0f} µs CPU per record -> this round's ratio "
                f"{r['rate'] / ref['rate']:.2f}x",
                flush=True,
            )
        # Ceilings: what segmenting alone reaches here, whatever comes after it.
        ceiling_runs["rjieba"].append(run_reference([], archive, cores))
        ceiling_runs["front"].append(run_front_stages(model_dir, archive, cores))
        print(
            f"    ceilings, {cores} processes: rjieba segmentation alone (the reference without fastText) "
            f"{ceiling_runs['rjieba'][-1]['rate']:,.0f} records/s; sanshi-ml's normalisation + segmentation alone "
            f"{ceiling_runs['front'][-1]['rate']:,.0f} records/s",
            flush=True,
        )
    ours = statistics.median(r["rate"] for r in runs)
    reference = {jobs: statistics.median(r["rate"] for r in results) for jobs, results in reference_runs.items()}
    ratio = {
        jobs: statistics.median(ours_run["rate"] / ref["rate"] for ours_run, ref in zip(runs, results))
        for jobs, results in reference_runs.items()
    }
    reference_cpu = [r["cpu"] / r["rows"] for results in reference_runs.values() for r in results]

    print("context: the same reference with one fastText model per target (all four), 1 process:", flush=True)
    four = [run_reference([train_reference(work, t) for t in PETITION_TARGETS], archive, 1) for _ in range(1)][0]
    print(f"  {four['rate']:,.0f} records/s, {four['cpu'] / four['rows'] * 1e6:.0f} µs CPU per record", flush=True)

    peak_200 = max(r["peak_rss"] for r in runs), max(r["peak_pss"] for r in runs)
    our_cpu = statistics.median(r["cpu"] / r["rows"] for r in runs)
    ref_cpu = statistics.median(reference_cpu)
    print("\nsummary")
    print(f"  sanshi-ml score, {cores} processes, 4 targets: {ours:,.0f} records/s (median)")
    print(
        f"  CPU per record (insensitive to other load on the machine): sanshi-ml {our_cpu * 1e6:.0f} µs "
        f"(start-up included), reference {ref_cpu * 1e6:.0f} µs -> the reference costs "
        f"{ref_cpu / our_cpu:.2f}x ours; on {cores} idle cores that is at most {cores / our_cpu:,.0f} records/s"
    )
    print(
        f"  fastText reference, 1 process:   {reference[1]:,.0f} records/s (median) -> ratio {ratio[1]:.2f}x "
        "(median of the rounds' ratios)"
    )
    print(
        f"  fastText reference, {cores} processes:  {reference[cores]:,.0f} records/s (median) -> "
        f"ratio {ratio[cores]:.2f}x (median of the rounds' ratios)"
    )
    print(
        f"  fastText, four models (one per target), 1 process: {four['rate']:,.0f} records/s -> "
        f"ratio {ours / four['rate']:.2f}x"
    )
    ceiling = {name: statistics.median(r["rate"] for r in results) for name, results in ceiling_runs.items()}
    front_cpu = statistics.median(r["cpu"] / r["rows"] for r in ceiling_runs["front"])
    print(
        f"  ceilings, {cores} processes (medians): rjieba segmentation alone {ceiling['rjieba']:,.0f} records/s; "
        f"sanshi-ml's normalisation + segmentation alone {ceiling['front']:,.0f} records/s "
        f"({front_cpu * 1e6:.0f} µs CPU per record)"
    )
    print(
        f"  15,000 records/s on {cores} cores allows {cores / 15_000 * 1e6:.0f} µs CPU per record: after "
        f"normalising and segmenting, {max(cores / 15_000 - front_cpu, 0) * 1e6:.0f} µs would be left for "
        f"features, four heads, calibration, policy and Parquet; sanshi-ml spends "
        f"{(our_cpu - front_cpu) * 1e6:.0f} µs on them (start-up included)"
    )
    print(
        f"  peak memory at {args.records:,}: RSS sum {peak_200[0] / 2**20:,.0f} MiB, "
        f"PSS sum {peak_200[1] / 2**20:,.0f} MiB"
    )
    if args.big:
        big = build_archive(messages, args.big, work / f"archive_{args.big}.parquet", seed=1)
        r = run_score(big, model_dir, work / "scored_big.parquet")
        print(
            f"  {args.big:,} records: {r['rate']:,.0f} records/s ({r['wall']:.0f}s), peak RSS sum "
            f"{r['peak_rss'] / 2**20:,.0f} MiB, PSS sum {r['peak_pss'] / 2**20:,.0f} MiB "
            f"(x{r['peak_pss'] / max(peak_200[1], 1):.2f} the {args.records:,}-record peak)"
        )
        # A yearly archive is tens of millions of records: there the start-up (one core busy, the other idle, a
        # few seconds) no longer counts, so the ratio at this size is the one such a run sees.
        ref_big = run_reference(reference_model, big, cores)
        print(
            f"  {args.big:,} records, fastText reference, {cores} processes, straight after: "
            f"{ref_big['rate']:,.0f} records/s -> ratio {r['rate'] / ref_big['rate']:.2f}x"
        )
    goals = [
        ("≥ 15,000 records/s", ours >= 15_000),
        ("≥ 1.0x the 1-process reference", ratio[1] >= 1.0),
        (f"≥ 1.0x the {cores}-process reference", ratio[cores] >= 1.0),
        ("peak PSS < 1.5 GB", peak_200[1] < 1.5e9),
    ]
    print("  goals: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in goals))
    print(
        f"load average {os.getloadavg()[0]:.2f} at the end (with {cores} cores, anything above 0 is other work "
        "competing with the benchmark)"
    )


if __name__ == "__main__":
    main()
