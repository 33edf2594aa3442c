"""Batch scoring end to end: a real kill -9 in the middle of a run then --resume, a real Dask LocalCluster, and the
server giving the same answer as the batch for the same record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sanshi_ml.artifacts import load_model
from sanshi_ml.data.records import ColumnMap
from sanshi_ml.scoring import ScoringSpec, score, score_chunk
from sanshi_ml.suggest import Suggester
from tests.conftest import DEMO_CSV

SANSHI_ML = str(Path(sys.executable).with_name("sanshi-ml"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """4,000 records drawn from the demo data (with its empty texts), each with its own id."""
    demo = pd.read_csv(DEMO_CSV, dtype=str)
    rows = demo.iloc[np.random.default_rng(7).integers(0, len(demo), 4_000)].reset_index(drop=True)
    rows["工单编号"] = [f"K{i:05d}" for i in range(len(rows))]
    path = tmp_path_factory.mktemp("archive") / "archive.csv"
    rows.to_csv(path, index=False)
    return path


def run_score(archive: Path, model_dir: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [
            SANSHI_ML,
            "score",
            str(archive),
            "--model-dir",
            str(model_dir),
            "--out",
            str(out),
            "--chunk-size",
            "100",
            "--jobs",
            "2",
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_kill_9_in_the_middle_then_resume_gives_every_record_exactly_once(archive, demo_model_dir, tmp_path):
    out = tmp_path / "scored.parquet"
    parts = tmp_path / "scored.parquet.parts"
    victim = run_score(archive, demo_model_dir, out)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.done.json"))) < 5:
        assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()}"
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.02)
    workers = psutil.Process(victim.pid).children(recursive=True)
    os.kill(victim.pid, signal.SIGKILL)  # a real kill -9 of the scoring process, mid-run
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    # Its workers die with it (PR_SET_PDEATHSIG), so nothing keeps writing parts behind the resumed run's back.
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    done_before = len(list(parts.glob("*.done.json")))
    assert 5 <= done_before < 40 and not out.exists()

    resumed = run_score(archive, demo_model_dir, out, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"{done_before} of 40 chunks from the checkpoint" in stderr

    scored = pd.read_parquet(out)
    assert len(scored) == 4_000 and scored["id"].is_unique
    assert scored["id"].tolist() == pd.read_csv(archive, dtype=str)["工单编号"].tolist()

    clean = run_score(archive, demo_model_dir, tmp_path / "clean.parquet")
    assert clean.communicate(timeout=300) and clean.returncode == 0
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "clean.parquet"))


def _plain(path: Path) -> pd.DataFrame:
    """A Parquet file or directory as a frame, without the pandas metadata Dask adds."""
    return pq.read_table(path).replace_schema_metadata(None).to_pandas()


@pytest.mark.slow
def test_dask_local_cluster_output_equals_the_single_machine_output(demo_model_dir, tmp_path):
    demo = pd.read_csv(DEMO_CSV, dtype=str)
    source = tmp_path / "demo.parquet"
    pq.write_table(pa.Table.from_pandas(demo, preserve_index=False), source, row_group_size=60)  # 7 partitions
    local = score([source], demo_model_dir, tmp_path / "local.parquet", chunk_size=50, jobs=1, progress=False)
    on_dask = score([source], demo_model_dir, tmp_path / "dask.parquet", dask="local:2", progress=False)
    assert on_dask.chunks == 7 and len(list((tmp_path / "dask.parquet").glob("*.parquet"))) == 7
    pd.testing.assert_frame_equal(_plain(on_dask.out), _plain(local.out))  # row for row, column for column

    # CSV files without an id column: Dask partitions must still number rows the way the local run does.
    for name, part in (("a.csv", demo.iloc[:250]), ("b.csv", demo.iloc[250:])):
        part.drop(columns="工单编号").to_csv(tmp_path / name, index=False)
    # A damaged row in b.csv (line 11, too many fields): read by the same careful reader on a Dask worker.
    lines = (tmp_path / "b.csv").read_text(encoding="utf-8").split("\n")
    lines[10] += ",多余的一列"
    (tmp_path / "b.csv").write_text("\n".join(lines), encoding="utf-8")
    columns = ColumnMap(text_cols=("标题", "诉求内容"), time_col="受理时间")
    inputs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    local = score(inputs, demo_model_dir, tmp_path / "local_csv.parquet", columns=columns, jobs=1, progress=False)
    on_dask = score(
        inputs, demo_model_dir, tmp_path / "dask_csv.parquet", columns=columns, dask="local:2", progress=False
    )
    expected = _plain(local.out)
    assert expected["id"].iloc[[0, 250, 259, 260]].tolist() == [
        "a.csv:row1",
        "b.csv:row1",
        "b.csv:line11",
        "b.csv:row11",
    ]
    assert (expected["status"] == "malformed").sum() == 1 and len(expected) == len(demo)
    pd.testing.assert_frame_equal(_plain(on_dask.out), expected)


def test_batch_scoring_gives_the_servers_answer(demo_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from tests.system.serve_support import make_settings, wait_ready

    title, text = "小区电梯坏了", "青青家园5栋电梯坏了一个多月，物业一直不修，老人上下楼很困难"
    frame = pd.DataFrame({"工单编号": ["s1"], "标题": [title], "诉求内容": [text], "受理时间": ["2024-05-01"]})
    suggester = Suggester.from_loaded(load_model(demo_model_dir))
    row = score_chunk(frame, suggester, ScoringSpec(ColumnMap(("标题", "诉求内容"), id_col="工单编号"))).iloc[0]
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'feedback.db'}"))
    with TestClient(app) as client:
        wait_ready(client)
        body = client.post("/v1/suggest", json={"title": title, "text": text}).json()
    assert body["model_version"] == row["model_version"]
    for target, field in body["fields"].items():
        assert row[target] == field["label"]
        assert float(row[f"{target}_confidence"]) == pytest.approx(field["confidence"], rel=1e-6)
        assert bool(row[f"{target}_needs_review"]) == field["needs_review"]
    assert row["sanshi_colour"] == body["fields"]["sanshi"]["sanshi"]["colour"]


def _wait_for(directory: Path, pattern: str, victim: subprocess.Popen, timeout: float = 180) -> None:
    """Until a file matching ``pattern`` appears in ``directory``, while ``victim`` still runs."""
    deadline = time.monotonic() + timeout
    while not (directory.is_dir() and any(directory.glob(pattern))):
        assert victim.poll() is None, f"the run ended before it reached {pattern}: {victim.communicate()}"
        assert time.monotonic() < deadline, f"{directory / pattern} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_during_assembly_then_resume_leaves_nothing_behind(archive, demo_model_dir, tmp_path):
    out_dir = tmp_path / "scored"
    out_dir.mkdir()
    out = out_dir / "scored.csv"
    parts = out_dir / "scored.csv.parts"
    # The test hook holds the run after the assembled output is complete and before it is renamed into place.
    victim = run_score(archive, demo_model_dir, out, env={**os.environ, "SANSHI_TEST_ASSEMBLY_PAUSE": "120"})
    _wait_for(parts, ".scored.csv.*", victim)  # the output being assembled, in the run's parts directory
    time.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)  # a real kill -9 of the scoring process, mid-assembly
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL and not out.exists()

    resumed = run_score(archive, demo_model_dir, out, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "40 of 40 chunks from the checkpoint" in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["scored.csv"]  # no parts, no temporary file, no lock
    scored = pd.read_csv(out, dtype=str, encoding="utf-8-sig")
    assert scored["id"].tolist() == pd.read_csv(archive, dtype=str)["工单编号"].tolist()


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(archive, demo_model_dir, tmp_path):
    from sanshi_ml.data.outputs import OutputError

    out = tmp_path / "scored.parquet"
    parts = tmp_path / "scored.parquet.parts"
    first = run_score(archive, demo_model_dir, out, env={**os.environ, "SANSHI_TEST_ASSEMBLY_PAUSE": "120"})
    while len(list(parts.glob("*.done.json"))) < 3:  # the first run is scoring: it holds the lock
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    for options in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(OutputError, match=r"another sanshi-ml score run \(process \d+\) is writing this output"):
            score([archive], demo_model_dir, out, chunk_size=100, jobs=1, progress=False, **options)
    second = run_score(archive, demo_model_dir, out, "--overwrite")
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 2 and "another sanshi-ml score run" in stderr and "Traceback" not in stderr
    _wait_for(parts, ".scored.parquet.*", first)  # the first run went on undisturbed, to its assembly
    assert len(list(parts.glob("*.done.json"))) == 40
    os.kill(first.pid, signal.SIGKILL)  # a dead holder's lock is released by the kernel
    first.communicate()
    result = score([archive], demo_model_dir, out, chunk_size=100, jobs=1, progress=False, resume=True)
    assert result.rows == 4_000 and result.resumed_chunks == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet"]
