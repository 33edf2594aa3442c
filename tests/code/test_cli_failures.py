"""Failures that must be one line on stderr and exit status 2, never a traceback: an export with a header and no
records, an output location that cannot be written (checked before the work), a disk that fills up while writing,
and a report asked of a file that is not a scored archive."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sanshi_ml.cli import app
from tests.conftest import DEMO_CSV, REPO

runner = CliRunner()
SANSHI_ML = str(Path(sys.executable).with_name("sanshi-ml"))


def one_line_error(result, *fragments: str) -> str:
    """The command failed with exit status 2 and printed one error line holding every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def header_only(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("header") / "header_only.csv"
    path.write_text(DEMO_CSV.read_text(encoding="utf-8").split("\n", 1)[0] + "\n", encoding="utf-8")
    return path


def _can_write(directory: Path) -> bool:
    try:
        tempfile.NamedTemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def unwritable(directory: Path):
    """A directory nothing can be created in: read-only permissions, or for root (whom they do not stop) the
    immutable attribute."""
    directory.mkdir()
    directory.chmod(0o555)
    immutable = False
    try:
        if _can_write(directory):
            immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
            if not immutable or _can_write(directory):
                pytest.skip("cannot make a directory unwritable here (root, and no chattr on this file system)")
        yield directory
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


# ------------------------------------------------------------------------------------------- a header, no records


def test_train_on_a_header_only_file_is_one_line(header_only, tmp_path):
    one_line_error(
        invoke("train", header_only, "--model-dir", tmp_path / "m", "--no-track"), "header_only.csv", "no records"
    )
    assert not (tmp_path / "m").exists()


def test_evaluate_on_a_header_only_file_is_one_line(header_only, demo_model_dir, tmp_path):
    one_line_error(
        invoke("evaluate", header_only, "--model-dir", demo_model_dir, "--out", tmp_path / "ev"),
        "header_only.csv",
        "no records",
    )
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_score_on_a_header_only_file_is_one_line(header_only, demo_model_dir, tmp_path):
    out = tmp_path / "scored.parquet"
    one_line_error(
        invoke("score", header_only, "--model-dir", demo_model_dir, "--out", out, "--no-progress"),
        "header_only.csv",
        "no records to score",
    )
    assert not out.exists() and not list(tmp_path.iterdir())  # no parts, no lock file left behind


def test_prepare_on_a_header_only_file_is_one_line(header_only, tmp_path):
    one_line_error(invoke("prepare", header_only, "--out", tmp_path / "prep"), "header_only.csv", "no records")
    assert not (tmp_path / "prep" / "records.parquet").exists()


# ---------------------------------------------------------------------------------- outputs that cannot be written


def test_train_checks_the_model_directory_before_fitting(tmp_path):
    with unwritable(tmp_path / "ro") as ro:
        result = invoke("train", DEMO_CSV, "--model-dir", ro / "model", "--no-track")
    one_line_error(result, str(ro / "model"), "cannot write the model")
    assert "fitting" not in result.output  # refused before the work, not at the save


def test_score_checks_the_output_directory_before_scoring(demo_model_dir, tmp_path):
    with unwritable(tmp_path / "ro") as ro:
        result = invoke(
            "score", DEMO_CSV, "--model-dir", demo_model_dir, "--out", ro / "scored.parquet", "--no-progress"
        )
    one_line_error(result, str(ro), "cannot write the scored output")


@pytest.mark.parametrize("command", ["prepare", "evaluate", "report"])
def test_prepare_evaluate_and_report_check_their_output_directory(command, demo_model_dir, tmp_path):
    scored = tmp_path / "scored.parquet"
    if command == "report":
        invoke("score", DEMO_CSV, "--model-dir", demo_model_dir, "--out", scored, "--no-progress", "--jobs", "1")
    args = {
        "prepare": ["prepare", DEMO_CSV],
        "evaluate": ["evaluate", DEMO_CSV, "--model-dir", demo_model_dir],
        "report": ["report", scored],
    }[command]
    with unwritable(tmp_path / "ro") as ro:
        result = invoke(*args, "--out", ro / "out")
    one_line_error(result, str(ro / "out"), "cannot write")


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    "limit, where",
    [
        (4_000, "scored.parquet.parts/00000"),  # parts of 100 rows: ~15 kB
        (20_000, "scored.parquet: cannot write the scored output"),
    ],
)  # ~35 kB
def test_a_full_disk_while_scoring_is_one_line_naming_the_file(demo_model_dir, tmp_path, limit, where):
    """A file-size limit makes every write past it fail as a full disk does (Python ignores SIGXFSZ, so the write
    gets EFBIG): a part in a worker, or the assembled output in the scoring process."""
    out = tmp_path / "scored.parquet"
    result = subprocess.run(
        [
            SANSHI_ML,
            "score",
            str(DEMO_CSV),
            "--model-dir",
            str(demo_model_dir),
            "--out",
            str(out),
            "--no-progress",
            "--chunk-size",
            "100",
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        preexec_fn=_limit_file_size(limit),
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert where in errors[0] and "File too large" in errors[0], errors[0]
    assert not out.exists() and not out.with_name(f".{out.name}.lock").exists()


def test_a_full_disk_while_training_is_one_line_naming_the_model_directory(tmp_path):
    model_dir = tmp_path / "model"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/never-used.db"}
    result = subprocess.run(
        [SANSHI_ML, "train", str(DEMO_CSV), "--model-dir", str(model_dir), "--no-track"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
        preexec_fn=_limit_file_size(20_000),
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(model_dir) in errors[0] and "File too large" in errors[0], errors[0]


# ----------------------------------------------------------------------------------- report on what it cannot read


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.parquet", b""),
        ("empty.csv", b""),
        ("garbage.parquet", bytes(range(256)) * 8),
        ("garbage.csv", bytes(range(128, 256)) * 8),
        ("truncated.parquet", None),
    ],
)
def test_report_on_an_empty_or_garbage_file_is_one_line(name, content, demo_model_dir, tmp_path):
    path = tmp_path / name
    if content is None:  # a real scored archive, cut in the middle
        whole = tmp_path / "whole.parquet"
        invoke("score", DEMO_CSV, "--model-dir", demo_model_dir, "--out", whole, "--no-progress", "--jobs", "1")
        data = whole.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    one_line_error(invoke("report", path, "--out", tmp_path / "report"), name, "not a scored archive")


def test_report_on_a_csv_that_is_no_scored_archive_names_the_file(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(path, index=False)
    one_line_error(invoke("report", path, "--out", tmp_path / "report"), "other.csv", "not a scored archive")
