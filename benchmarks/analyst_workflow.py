"""Cost of the analyst's workflow on the demo data, against references measured in the same run.

1. MLflow tracking: one demo training with tracking (a fresh SQLite store per run: params, metrics, plots, the
   pyfunc model) against the same training untracked; medians of alternating repeats, and the ratio.
2. ``dvc repro`` of prepare → train → evaluate on a clean clone, against the same three ``sanshi-ml`` commands run
   by hand in another clean clone: DVC's own overhead.
3. The three notebooks executed as CI does (nbclient, one kernel each), against one untracked training in-process.

Run: .venv/bin/python benchmarks/analyst_workflow.py [--repeats 3]   (needs git; no network, no ../shared/data)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = REPO / "data" / "demo" / "records.csv"


def _timed(func, *args, **kwargs) -> float:
    started = time.perf_counter()
    func(*args, **kwargs)
    return time.perf_counter() - started


def tracking_overhead(repeats: int, work: Path) -> None:
    from sanshi_ml.config import load_params, with_overrides
    from sanshi_ml.stages.train import train

    params = load_params(REPO / "params.yaml")
    _timed(lambda: train([DEMO], params, model_dir=work / "warm", progress=lambda _m: None, track=False))
    untracked, fresh, existing = [], [], []
    for i in range(repeats):
        quiet = {"progress": lambda _m: None}
        untracked.append(_timed(train, [DEMO], params, model_dir=work / f"u{i}", track=False, **quiet))
        store = with_overrides(params, {"tracking.uri": f"sqlite:///{work / f'store{i}' / 'mlflow.db'}"})
        # A new store (MLflow creates its tables; the first one also pays for importing mlflow) ...
        fresh.append(_timed(train, [DEMO], store, model_dir=work / f"t{i}", track=True, **quiet))
        # ... and a second run into the same store: the usual case.
        existing.append(_timed(train, [DEMO], store, model_dir=work / f"t{i}b", track=True, **quiet))
    u, e = statistics.median(untracked), statistics.median(existing)
    print(f"1. demo training, untracked (reference): median {u:.2f}s over {repeats}")
    print(f"   tracked, into an existing SQLite store: median {e:.2f}s → {e / u:.2f}× the reference (+{e - u:.2f}s)")
    print(
        f"   tracked, into a new store: median {statistics.median(fresh):.2f}s; the very first "
        f"(imports mlflow): {fresh[0]:.2f}s → {fresh[0] / u:.2f}×"
    )


def _clone(work: Path, name: str) -> Path:
    target = work / name
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True)
    return target


def dvc_overhead(work: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(work / "dvc-site"),
    }
    by_hand = _clone(work, "by_hand")
    env_hand = {**env, "PYTHONPATH": str(by_hand / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'hand.db'}"}
    commands = [
        ["sanshi-ml", "prepare"],
        ["sanshi-ml", "train", "data/prepared/records.parquet"],
        ["sanshi-ml", "evaluate", "data/prepared/records.parquet"],
    ]
    hand = _timed(
        lambda: [subprocess.run(c, cwd=by_hand, env=env_hand, check=True, capture_output=True) for c in commands]
    )
    with_dvc = _clone(work, "with_dvc")
    env_dvc = {**env, "PYTHONPATH": str(with_dvc / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'dvc.db'}"}
    repro = _timed(
        lambda: subprocess.run([str(BIN / "dvc"), "repro"], cwd=with_dvc, env=env_dvc, check=True, capture_output=True)
    )
    noop = _timed(
        lambda: subprocess.run([str(BIN / "dvc"), "repro"], cwd=with_dvc, env=env_dvc, check=True, capture_output=True)
    )
    print(f"2. prepare + train + evaluate by hand on a clean clone (reference): {hand:.1f}s")
    print(
        f"   dvc repro on a clean clone: {repro:.1f}s → {repro / hand:.2f}× the reference; "
        f"a second dvc repro (nothing changed): {noop:.1f}s"
    )


def notebooks(work: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    from sanshi_ml.config import load_params
    from sanshi_ml.stages.train import train

    params = load_params(REPO / "params.yaml")
    reference = _timed(lambda: train([DEMO], params, model_dir=work / "nb_ref", progress=lambda _m: None, track=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'nb.db'}"
    total = 0.0
    lines = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        seconds = _timed(client.execute)
        total += seconds
        lines.append(f"   {path.name}: {seconds:.1f}s → {seconds / reference:.1f}×")
    print(f"3. one untracked demo training in-process (reference): {reference:.2f}s")
    print("\n".join(lines))
    print(f"   all notebooks: {total:.1f}s → {total / reference:.1f}× the reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["tracking", "dvc", "notebooks"])
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; demo data {DEMO.relative_to(REPO)}")
    with tempfile.TemporaryDirectory(prefix="sanshi-bench-") as tmp:
        work = Path(tmp)
        if "tracking" not in args.skip:
            tracking_overhead(args.repeats, work)
        if "dvc" not in args.skip:
            dvc_overhead(work)
        if "notebooks" not in args.skip:
            notebooks(work)


if __name__ == "__main__":
    main()
