"""Batch scoring mechanics: chunking, statuses of bad rows, the output's columns, checkpoints and resume checks."""

from __future__ import annotations

import gc
import json
import multiprocessing
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sanshi_ml import scoring
from sanshi_ml.artifacts import load_model, save_model
from sanshi_ml.cli import app
from sanshi_ml.core import text as text_module
from sanshi_ml.data.records import ColumnMap, RecordError
from sanshi_ml.scoring import (
    ScoringError,
    ScoringSpec,
    _start_workers,
    _stop_workers,
    expand_inputs,
    iter_chunks,
    output_schema,
    part_paths,
    score,
    score_chunk,
)
from sanshi_ml.suggest import Suggester
from tests.conftest import DEMO_CSV

COLUMNS = ColumnMap(text_cols=("标题", "诉求内容"), id_col="工单编号", time_col="受理时间")
GOOD = "小区电梯坏了一个多月，物业一直不修，老人上下楼很困难"


@pytest.fixture(scope="module")
def suggester(demo_model_dir) -> Suggester:
    return Suggester.from_loaded(load_model(demo_model_dir))


@pytest.fixture(scope="module")
def demo_sample(tmp_path_factory):
    """The first 60 demo records as CSV."""
    path = tmp_path_factory.mktemp("sample") / "sample.csv"
    pd.read_csv(DEMO_CSV, dtype=str).head(60).to_csv(path, index=False)
    return path


def test_chunks_are_deterministic_and_cover_every_row_once(demo_sample):
    first = [(c.index, c.row_offset, len(c.frame)) for c in iter_chunks([demo_sample], 25)]
    assert first == [(0, 0, 25), (1, 25, 25), (2, 50, 10)]
    assert first == [(c.index, c.row_offset, len(c.frame)) for c in iter_chunks([demo_sample], 25)]


def test_ids_default_to_row_numbers_across_chunks(tmp_path, suggester):
    frame = pd.DataFrame({"诉求内容": [GOOD] * 5})
    spec = ScoringSpec(ColumnMap(text_cols=("诉求内容",)))
    out = pd.concat([score_chunk(frame.iloc[i : i + 2], suggester, spec, "x.csv", i) for i in range(0, 5, 2)])
    assert out["id"].tolist() == ["row1", "row2", "row3", "row4", "row5"]


def test_bad_rows_get_a_status_and_empty_predictions_and_never_sink_the_chunk(suggester):
    frame = pd.DataFrame(
        {
            "工单编号": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "标题": ["电梯", None, "", 42, "噪音", "坏\ufffd码", "标题", "x"],
            "诉求内容": [GOOD, "", None, GOOD, "字" * 101, GOOD, ["not", "text"], "\ud800坏"],
            "受理时间": ["2024-01-05 08:00:00"] * 8,
        },
        dtype=object,
    )
    spec = ScoringSpec(COLUMNS, max_text_chars=100)
    out = score_chunk(frame, suggester, spec, "bad.jsonl")
    assert out["status"].tolist() == [
        "ok",
        "empty_text",
        "empty_text",
        "not_text",
        "too_long",
        "undecodable",
        "not_text",
        "undecodable",
    ]
    bad = out["status"] != "ok"
    for target in suggester.targets:
        assert out.loc[bad, target].isna().all() and out.loc[bad, f"{target}_confidence"].isna().all()
        assert out.loc[~bad, target].notna().all()
    assert out["id"].tolist() == list("abcdefgh") and (out["model_version"] == suggester.version).all()


def test_undecodable_bytes_in_a_csv_mark_only_their_row(tmp_path, demo_model_dir):
    raw = (
        "工单编号,标题,诉求内容,受理时间\n1,电梯,{g},2024-01-05\n2,噪音,坏码\xff\xfe文本,2024-01-06\n"
        "3,路灯,{g},2024-02-01\n"
    )
    path = tmp_path / "broken.csv"
    path.write_bytes(raw.format(g=GOOD).encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe"))
    out = tmp_path / "scored.csv"
    score([path], demo_model_dir, out, jobs=1, progress=False)
    scored = pd.read_csv(out, dtype=str, encoding="utf-8-sig")
    assert scored["status"].tolist() == ["ok", "undecodable", "ok"]
    assert scored["sanshi"].isna().tolist() == [False, True, False]


def test_output_keeps_id_time_and_adds_every_target(tmp_path, demo_model_dir, suggester, demo_sample):
    out = tmp_path / "scored.parquet"
    result = score([demo_sample], demo_model_dir, out, chunk_size=25, jobs=1, progress=False, keep_cols=["承办单位"])
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(output_schema(suggester, ["承办单位"]))
    frame = table.to_pandas()
    source = pd.read_csv(demo_sample, dtype=str)
    assert frame["id"].tolist() == source["工单编号"].tolist()
    assert frame["承办单位"].tolist() == source["承办单位"].tolist()
    assert (frame["received_at"] == pd.to_datetime(source["受理时间"])).all()
    for target in ("category", "sanshi", "unit", "appeal"):
        assert {target, f"{target}_confidence", f"{target}_needs_review"} <= set(frame.columns)
    assert set(frame["sanshi_colour"].dropna()) <= {"red", "orange", "yellow"}
    assert result.rows == 60 and result.chunks == 3 and not (tmp_path / "scored.parquet.parts").exists()


def test_several_processes_give_the_same_output_as_one(tmp_path, demo_model_dir, demo_sample):
    one = score([demo_sample], demo_model_dir, tmp_path / "one.parquet", chunk_size=10, jobs=1, progress=False)
    two = score([demo_sample], demo_model_dir, tmp_path / "two.parquet", chunk_size=10, jobs=2, progress=False)
    assert two.jobs == 2
    assert pq.read_table(one.out).equals(pq.read_table(two.out))


def _unassigned_table_built() -> bool:
    return text_module._unassigned_chars.cache_info().currsize == 1


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(),
    reason="workers inherit the parent's table only when they are forked",
)
def test_forked_workers_inherit_the_unassigned_table_instead_of_each_building_it(tmp_path, demo_model_dir, suggester):
    text_module._unassigned_chars.cache_clear()
    executor = _start_workers(
        2, suggester, demo_model_dir, None, ScoringSpec(columns=COLUMNS), tmp_path, output_schema(suggester)
    )
    try:
        assert [executor.submit(_unassigned_table_built).result() for _ in range(4)] == [True] * 4
    finally:
        _stop_workers(executor, frozen_before=False)


def test_a_run_leaves_the_calling_process_as_it_found_it(tmp_path, demo_model_dir, demo_sample):
    """A notebook goes on after scoring: its garbage collector must work again (the freeze is for the forked
    workers only), and the model must not stay behind in the module, beside the next one the notebook loads."""
    gc.unfreeze()
    for jobs in (1, 2):
        score([demo_sample], demo_model_dir, tmp_path / f"{jobs}.parquet", chunk_size=20, jobs=jobs, progress=False)
        assert gc.get_freeze_count() == 0
        assert scoring._WORKER == {}


def test_a_batch_score_equals_the_suggester_answer_for_the_same_record(demo_model_dir, suggester):
    title, text = "楼上漏水", "楼上邻居家水管漏水，渗到我家天花板，协商多次没有结果"
    frame = pd.DataFrame({"工单编号": ["r1"], "标题": [title], "诉求内容": [text], "受理时间": ["2024-03-01"]})
    row = score_chunk(frame, suggester, ScoringSpec(COLUMNS)).iloc[0]
    [expected] = suggester.suggest([(title, text)])
    for target, field in expected["fields"].items():
        assert row[target] == field["label"]
        assert float(row[f"{target}_confidence"]) == pytest.approx(field["confidence"], rel=1e-6)
        assert bool(row[f"{target}_needs_review"]) == field["needs_review"]
    assert row["sanshi_colour"] == expected["fields"]["sanshi"]["sanshi"]["colour"]
    assert row["sanshi_handling_mode"] == expected["fields"]["sanshi"]["sanshi"]["handling_mode"]
    assert bool(row["policy_conflict"]) == expected["policy_conflict"]


def test_resume_refuses_another_model_or_changed_input(tmp_path, demo_model_dir, demo_sample):
    sample = tmp_path / "in.csv"
    shutil.copy(demo_sample, sample)
    out = tmp_path / "scored.parquet"
    score([sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False, keep_parts=True)
    parts = tmp_path / "scored.parquet.parts"
    assert json.loads((parts / "run.json").read_text())["fingerprint"]["chunk_size"] == 20
    # A crash before the last chunk was checkpointed: its marker is gone.
    part_paths(parts, 2)[1].unlink()
    with pytest.raises(ScoringError, match="unfinished run"):
        score([sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False)
    with pytest.raises(ScoringError, match="the chunk size"):
        score([sample], demo_model_dir, out, chunk_size=30, jobs=1, progress=False, resume=True)
    loaded = load_model(demo_model_dir)
    loaded.model.heads["sanshi"].threshold = 0.5  # another model: same shape, different artifact
    save_model(loaded.model, tmp_path / "other_model", extra={"columns": loaded.metadata["columns"]})
    with pytest.raises(ScoringError, match="the model"):
        score([sample], tmp_path / "other_model", out, chunk_size=20, jobs=1, progress=False, resume=True)
    sample.write_text(sample.read_text(encoding="utf-8") + "X9,追加,新增的记录,2024-12-31,,,,\n", encoding="utf-8")
    with pytest.raises(ScoringError, match="the input files"):
        score([sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False, resume=True)


def test_resume_refuses_another_policy(tmp_path, demo_model_dir, demo_sample):
    out = tmp_path / "scored.parquet"
    score([demo_sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False, keep_parts=True)
    from sanshi_ml.core.policy import DEFAULT_POLICY_FILE

    edited = tmp_path / "policy.yaml"
    edited.write_text(
        DEFAULT_POLICY_FILE.read_text(encoding="utf-8").replace('version: "', 'version: "x'), encoding="utf-8"
    )
    with pytest.raises(ScoringError, match="the 三事 policy"):
        score(
            [demo_sample],
            demo_model_dir,
            out,
            chunk_size=20,
            jobs=1,
            progress=False,
            resume=True,
            policy_path=str(edited),
        )


def test_resume_skips_checkpointed_chunks_and_redoes_the_rest(tmp_path, demo_model_dir, demo_sample):
    out = tmp_path / "scored.parquet"
    full = score([demo_sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False, keep_parts=True)
    expected = pq.read_table(out)
    parts = tmp_path / "scored.parquet.parts"
    part_paths(parts, 1)[1].unlink()  # chunk 1 was written but never checkpointed
    part_paths(parts, 2)[0].unlink()  # chunk 2 never written
    out.unlink()
    resumed = score([demo_sample], demo_model_dir, out, chunk_size=20, jobs=1, progress=False, resume=True)
    assert resumed.resumed_chunks == 1 and resumed.rows == full.rows == 60
    assert pq.read_table(out).equals(expected)


def test_inputs_expand_globs_and_refuse_duplicates(tmp_path, demo_sample):
    for name in ("b.csv", "a.csv"):
        shutil.copy(demo_sample, tmp_path / name)
    assert [p.name for p in expand_inputs([str(tmp_path / "*.csv")])] == ["a.csv", "b.csv"]
    with pytest.raises(RecordError, match="no files match"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(RecordError, match="given twice"):
        expand_inputs([tmp_path / "a.csv", str(tmp_path / "a.csv")])


def test_several_inputs_without_ids_get_file_prefixed_row_ids(tmp_path, demo_model_dir):
    for name in ("jan.csv", "feb.csv"):
        pd.DataFrame({"内容": [GOOD, "路灯不亮"]}).to_csv(tmp_path / name, index=False)
    out = tmp_path / "scored.parquet"
    score(
        [tmp_path / "jan.csv", tmp_path / "feb.csv"],
        demo_model_dir,
        out,
        jobs=1,
        progress=False,
        columns=ColumnMap(text_cols=("内容",)),
    )
    assert pd.read_parquet(out)["id"].tolist() == ["jan.csv:row1", "jan.csv:row2", "feb.csv:row1", "feb.csv:row2"]


def test_parquet_and_jsonl_inputs_score_like_csv(tmp_path, demo_model_dir, demo_sample):
    frame = pd.read_csv(demo_sample, dtype=str)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "in.parquet", row_group_size=7)
    frame.to_json(tmp_path / "in.jsonl", orient="records", lines=True, force_ascii=False)
    tables = [
        pq.read_table(
            score(
                [tmp_path / name], demo_model_dir, tmp_path / f"{name}.parquet", chunk_size=16, jobs=1, progress=False
            ).out
        )
        for name in ("in.parquet", "in.jsonl")
    ]
    csv_table = pq.read_table(
        score([demo_sample], demo_model_dir, tmp_path / "csv.parquet", jobs=1, progress=False).out
    )
    for table in tables:
        assert table.drop(["received_at"]).equals(csv_table.drop(["received_at"]))


runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_cli_names_a_missing_file_and_a_missing_column(tmp_path, demo_model_dir, demo_sample):
    line = _one_line_error(
        runner.invoke(
            app,
            [
                "score",
                str(tmp_path / "nope.csv"),
                "--model-dir",
                str(demo_model_dir),
                "--out",
                str(tmp_path / "o.parquet"),
            ],
        )
    )
    assert "nope.csv" in line and "not found" in line
    line = _one_line_error(
        runner.invoke(
            app,
            [
                "score",
                str(demo_sample),
                "--model-dir",
                str(demo_model_dir),
                "--out",
                str(tmp_path / "o.parquet"),
                "--text-cols",
                "标题,正文",
            ],
        )
    )
    assert "'正文'" in line and "sample.csv" in line
    line = _one_line_error(
        runner.invoke(
            app, ["score", str(demo_sample), "--model-dir", str(demo_model_dir), "--out", str(tmp_path / "o.xlsx")]
        )
    )
    assert ".parquet or .csv" in line
    line = _one_line_error(
        runner.invoke(
            app,
            [
                "score",
                str(demo_sample),
                "--model-dir",
                str(demo_model_dir),
                "--out",
                str(tmp_path / "o.parquet"),
                "--resume",
            ],
        )
    )
    assert "nothing to resume" in line


def test_cli_scores_with_the_models_columns_and_reports(tmp_path, demo_model_dir, demo_sample):
    out = tmp_path / "scored.csv"
    result = runner.invoke(
        app,
        [
            "score",
            str(demo_sample),
            "--model-dir",
            str(demo_model_dir),
            "--out",
            str(out),
            "--jobs",
            "1",
            "--chunk-size",
            "16",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "60 records" in result.output and len(pd.read_csv(out, encoding="utf-8-sig")) == 60
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "counts_sanshi.csv").exists()


def test_received_times_with_zones_keep_their_wall_clock(suggester):
    frame = pd.DataFrame(
        {
            "工单编号": ["a", "b"],
            "标题": ["x", "y"],
            "诉求内容": [GOOD, GOOD],
            "受理时间": ["2024-03-05T08:30:00+08:00", "not a time"],
        }
    )
    out = score_chunk(frame, suggester, ScoringSpec(COLUMNS))
    assert out["received_at"].iloc[0] == pd.Timestamp("2024-03-05 08:30:00") and pd.isna(out["received_at"].iloc[1])
    assert np.all(out["status"] == "ok")


def test_dask_options_are_checked_before_a_cluster_starts(tmp_path, demo_model_dir, demo_sample):
    with pytest.raises(ScoringError, match="--resume is for local runs"):
        score([demo_sample], demo_model_dir, tmp_path / "o.parquet", dask="local:2", resume=True, progress=False)
    with pytest.raises(ScoringError, match="expected local:N"):
        score([demo_sample], demo_model_dir, tmp_path / "o.parquet", dask="local:many", progress=False)
