"""`sanshi-ml serve` as a real process: uvicorn with two workers that build their app from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.system.serve_support import API_KEY, free_port

SANSHI_ML = Path(sys.executable).with_name("sanshi-ml")


@pytest.mark.slow  # two worker processes each import everything and load the model: about 11 s
def test_serve_starts_workers_that_answer_and_store_feedback(demo_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "SANSHI_API_KEY": API_KEY}
    env.pop("SANSHI_MODEL_URI", None)
    server = subprocess.Popen(
        [str(SANSHI_ML), "serve", "--model-dir", str(demo_model_dir), "--port", str(port), "--workers", "2",
         "--database-url", f"sqlite:///{tmp_path / 'feedback.db'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        ready = 0
        while time.monotonic() < deadline and ready < 6:  # several answers: both workers are up
            try:
                ready = ready + 1 if httpx.get(url + "/ready", timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.1)
        assert ready >= 6
        answer = httpx.post(url + "/v1/suggest", json={"text": "小区电梯坏了，物业不修"}).json()
        assert answer["fields"]["sanshi"]["label"] in {"公事", "共事", "家事"}
        stored = httpx.post(url + "/v1/feedback", headers={"X-API-Key": API_KEY}, json={
            "text": "小区电梯坏了，物业不修", "model_version": answer["model_version"], "labels": {"sanshi": "共事"}})
        assert stored.status_code == 201
        assert (tmp_path / "feedback.db").exists()
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode("utf-8", "replace")
    assert "Traceback" not in output
    assert f"serving {demo_model_dir} on http://127.0.0.1:{port} (2 workers)" in output


def test_serve_with_a_missing_model_fails_in_one_line(tmp_path):
    result = subprocess.run([str(SANSHI_ML), "serve", "--model-dir", str(tmp_path / "nothing")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "model directory not found" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_two_model_sources(demo_model_dir):
    result = subprocess.run([str(SANSHI_ML), "serve", "--model-dir", str(demo_model_dir), "--model-uri",
                             "models:/sanshi-triage@champion"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "either model_dir" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_an_unusable_database_fails_in_one_line(demo_model_dir, tmp_path):
    port = free_port()  # nothing listens there
    result = subprocess.run([str(SANSHI_ML), "serve", "--model-dir", str(demo_model_dir), "--database-url",
                             f"postgresql://sanshi:hunter2@127.0.0.1:{port}/feedback"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot create the feedback table" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
