"""`sanshi-ml serve` as a real process: uvicorn with two workers that build their app from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.system.serve_support import (
    API_KEY,
    ServeProcess,
    fill_disk,
    free_port,
    read_only_file,
    small_disk,
)

KEY = {"X-API-Key": API_KEY}
# What a resident wrote and what must never reach a log: a name, an address and a 15-digit 身份证 number.
PLANTED = ("王小明", "幸福路88号3单元502室", "430102900101123")


def answer(text: str, **extra) -> dict:
    return {"text": text, "model_version": "store-test", "labels": {"sanshi": "共事"}, **extra}


def db_files(db: Path) -> list[Path]:
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]


SANSHI_ML = Path(sys.executable).with_name("sanshi-ml")


@pytest.mark.slow  # two worker processes each import everything and load the model: about 11 s
def test_serve_starts_workers_that_answer_and_store_feedback(demo_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "SANSHI_API_KEY": API_KEY}
    env.pop("SANSHI_MODEL_URI", None)
    server = subprocess.Popen(
        [
            str(SANSHI_ML),
            "serve",
            "--model-dir",
            str(demo_model_dir),
            "--port",
            str(port),
            "--workers",
            "2",
            "--database-url",
            f"sqlite:///{tmp_path / 'feedback.db'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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
        stored = httpx.post(
            url + "/v1/feedback",
            headers={"X-API-Key": API_KEY},
            json={
                "text": "小区电梯坏了，物业不修",
                "model_version": answer["model_version"],
                "labels": {"sanshi": "共事"},
            },
        )
        assert stored.status_code == 201
        assert (tmp_path / "feedback.db").exists()
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode("utf-8", "replace")
    assert "Traceback" not in output
    assert f"serving {demo_model_dir} on http://127.0.0.1:{port} (2 workers)" in output
    # No model key is configured here: the server says so once at start-up (other commands load quietly).
    assert output.count("the model is loaded without an authenticity check") == 1


def test_serve_with_a_missing_model_fails_in_one_line(tmp_path):
    result = subprocess.run(
        [str(SANSHI_ML), "serve", "--model-dir", str(tmp_path / "nothing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "model directory not found" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_two_model_sources(demo_model_dir):
    result = subprocess.run(
        [str(SANSHI_ML), "serve", "--model-dir", str(demo_model_dir), "--model-uri", "models:/sanshi-triage@champion"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "either model_dir" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_an_unusable_database_fails_in_one_line(demo_model_dir, tmp_path):
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [
            str(SANSHI_ML),
            "serve",
            "--model-dir",
            str(demo_model_dir),
            "--database-url",
            f"postgresql://sanshi:hunter2@127.0.0.1:{port}/feedback",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot create the feedback table" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_serve_refuses_to_start_on_a_read_only_database(demo_model_dir, tmp_path):
    from serve.store import FeedbackStore

    db = tmp_path / "feedback.db"
    FeedbackStore(f"sqlite:///{db}").close()
    port = free_port()
    with read_only_file(db):
        server = subprocess.Popen(
            [
                str(SANSHI_ML),
                "serve",
                "--model-dir",
                str(demo_model_dir),
                "--port",
                str(port),
                "--database-url",
                f"sqlite:///{db}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.terminate()
            _, stderr = server.communicate(timeout=30)
            raise AssertionError("the server started on a read-only database") from None
    assert server.returncode == 2
    assert "read_only" in stderr and "Traceback" not in stderr


@pytest.mark.slow  # a server process, a real tmpfs filled up
def test_a_full_disk_is_reported_and_refused_and_the_log_holds_nothing_the_resident_wrote(demo_model_dir, tmp_path):
    """A real server process on a real full file system: the failed write is a 503 naming 'full', and neither its
    log nor the database files hold the request's name, address or 15-digit ID number."""
    with small_disk(tmp_path / "disk") as disk:
        db = disk / "feedback.db"
        server = ServeProcess(
            ["--model-dir", str(demo_model_dir), "--database-url", f"sqlite:///{db}"],
            tmp_path / "server.log",
            env={"SANSHI_STORE_CHECK_SECONDS": "0"},
        )
        with server:
            server.wait_ready()
            stored = httpx.post(server.url + "/v1/feedback", headers=KEY, json=answer("磁盘写满之前"))
            assert stored.status_code == 201
            filler = fill_disk(disk)
            text = f"我叫{PLANTED[0]}，住在{PLANTED[1]}，身份证号{PLANTED[2]}。" + "楼道里的灯坏了很久，" * 1500
            refused = httpx.post(
                server.url + "/v1/feedback", headers=KEY, json=answer(text, title=f"{PLANTED[0]}的诉求", id=PLANTED[2])
            )
            assert refused.status_code == 503, refused.text[:500]
            assert refused.json()["detail"][0]["type"] == "full"
            ready = httpx.get(server.url + "/ready")
            assert ready.status_code == 503 and ready.json()["store"]["status"] == "full"

            filler.unlink()
            assert httpx.get(server.url + "/ready").status_code == 200
            assert httpx.post(server.url + "/v1/feedback", headers=KEY, json=answer("腾出空间之后")).status_code == 201
            stored_bytes = b"".join(path.read_bytes() for path in db_files(db))
        log = server.output()
    assert "full" in log  # the failure is in the log …
    for planted in PLANTED:  # … and not a word of the request, there or in the database
        assert planted not in log, log[-3000:]
        assert planted.encode("utf-8") not in stored_bytes
    assert "Traceback" not in log
    assert "腾出空间之后".encode() in stored_bytes


# ---------------------------------------------------------------------------------- no single request stalls it


class Prober:
    """Asks /health and a one-record suggestion, one after the other, from its own thread, and keeps the latencies
    (seconds): what a load balancer and a clerk see while something else is going on."""

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.health: list[float] = []
        self.suggest: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                for kind, call in (
                    ("health", lambda: client.get("/health")),
                    ("suggest", lambda: client.post("/v1/suggest", json={"text": "小区路灯坏了"})),
                ):
                    started = time.perf_counter()
                    response = call()
                    getattr(self, kind).append(time.perf_counter() - started)
                    if response.status_code != 200:
                        self.failures.append(f"{kind}: {response.status_code}")
                time.sleep(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        time.sleep(0.3)  # a few answers before the load starts
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def live_process(demo_model_dir, tmp_path_factory):
    """One `sanshi-ml serve` process for the tests below; slow bodies time out after a second there."""
    root = tmp_path_factory.mktemp("serve_limits")
    server = ServeProcess(
        ["--model-dir", str(demo_model_dir), "--database-url", f"sqlite:///{root / 'f.db'}"],
        root / "server.log",
        env={"SANSHI_BODY_TIMEOUT": "1"},
    )
    with server:
        server.wait_ready()
        yield server


@pytest.mark.slow
def test_a_hostile_10mb_batch_gets_a_small_answer_and_does_not_stall_the_server(live_process):
    """256 records with 4,000 unknown fields each (10 MB): was a 114 MB 422 and an 8 s stall of /health."""
    record = {"text": "电梯坏了", **{f"field_{n:04d}": 1 for n in range(4_000)}}
    body = json.dumps({"records": [record] * 256}).encode()
    assert len(body) > 9_000_000
    with Prober(live_process.url) as prober:
        started = time.perf_counter()
        response = httpx.post(
            live_process.url + "/v1/suggest/batch",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        elapsed = time.perf_counter() - started
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 10_000
    assert response.json()["detail"][0]["type"] == "too_many_values"
    assert not prober.failures and prober.health
    assert max(prober.health) < 0.5, (max(prober.health), elapsed)
    assert max(prober.suggest) < 0.5, (max(prober.suggest), elapsed)


@pytest.mark.slow
def test_a_maximal_batch_does_not_stall_health_or_single_suggestions(live_process):
    """256 records of 20,000 characters: the model works on it for seconds, in its own thread and in pieces, while
    /health and a clerk's single suggestion keep answering."""
    import csv

    from tests.conftest import DEMO_CSV

    with open(DEMO_CSV, encoding="utf-8") as handle:
        texts = [row["诉求内容"] for row in csv.DictReader(handle)]
    long_texts = []
    for start in range(256):
        text, n = "", start
        while len(text) < 20_000:
            text += texts[n % len(texts)]
            n += 1
        long_texts.append(text[:20_000])
    body = {"records": [{"id": str(n), "text": text} for n, text in enumerate(long_texts)]}
    with Prober(live_process.url) as prober:
        started = time.perf_counter()
        response = httpx.post(live_process.url + "/v1/suggest/batch", json=body, timeout=300)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["suggestions"]] == [str(n) for n in range(256)]
    assert not prober.failures and len(prober.health) >= 3
    assert max(prober.health) < 0.3, (sorted(prober.health)[-5:], elapsed)
    assert max(prober.suggest) < 0.5, (sorted(prober.suggest)[-5:], elapsed)


def test_a_client_that_sends_its_body_too_slowly_is_cut_off(live_process):
    """A body trickled byte by byte (slowloris) gets 408 once the body timeout is over, and the connection closes."""
    import socket

    with socket.create_connection(("127.0.0.1", live_process.port), timeout=15) as sock:
        sock.sendall(
            b"POST /v1/suggest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"text": "'
        )
        started = time.perf_counter()
        received = b""
        sock.settimeout(0.2)
        while time.perf_counter() - started < 15:  # one byte every 0.2 s, for at most 15 s
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break  # the server closed the connection
            received += chunk
        elapsed = time.perf_counter() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"request_timeout" in received
    assert elapsed < 5
    assert httpx.get(live_process.url + "/health").status_code == 200


def test_the_limit_tests_left_no_traceback_in_the_log(live_process):
    assert "Traceback" not in live_process.output()
