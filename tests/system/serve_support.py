"""Helpers and fixtures for the server tests: an app on the demo model, a throwaway PostgreSQL server, a live
uvicorn server on a free port. Test modules import the fixtures they use from here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

API_KEY = "test-key-0123456789"
PG_ROOTS = (Path("/usr/lib/postgresql"),)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client, timeout: float = 60.0) -> dict:
    """Poll /ready until the model is in (it loads in the background after startup)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/ready")
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 503, response.text
        if response.json()["status"] == "failed":
            raise AssertionError(f"model failed to load: {response.json()['error']}")
        time.sleep(0.05)
    raise AssertionError("model not ready in time")


def wait_settled(client, timeout: float = 60.0) -> dict:
    """Poll /ready until loading has finished, well or not; returns its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/ready").json()
        if body["status"] != "loading":
            return body
        time.sleep(0.05)
    raise AssertionError("model still loading")


def make_settings(model_dir: Path, database_url: str, **overrides):
    from serve.settings import Settings

    return Settings(**{"model_dir": model_dir, "database_url": database_url, "api_key": API_KEY, **overrides})


# ----------------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian puts it in /usr/lib/postgresql/<version>/bin)."""
    for root in PG_ROOTS:
        if root.is_dir():
            versions = sorted((p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                              key=lambda p: int(p.name) if p.name.isdigit() else 0, reverse=True)
            if versions:
                return versions[0] / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _require_postgres() -> Path:
    binaries = postgres_bin()
    if binaries is not None and (binaries / "pg_ctl").exists():
        return binaries
    reason = "PostgreSQL server binaries not found (scripts/system-deps.sh postgres installs them)"
    if os.environ.get("SANSHI_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free port, stopped and deleted at the end of the session.

    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` OS user (runuser).
    """
    binaries = _require_postgres()
    base = Path(tempfile.mkdtemp(prefix="sanshi-pg-"))
    data, log = base / "data", base / "server.log"
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root but there is no 'postgres' OS user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sanshi_feedback")
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or b"").decode("utf-8", "replace")
        if log.exists():
            detail += log.read_text(errors="replace")[-2000:]
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {detail}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/sanshi_feedback"
    finally:
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ a live server


class LiveServer:
    """A real uvicorn server in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise AssertionError("uvicorn stopped during startup")
            time.sleep(0.1)
        raise AssertionError("live server not ready in time")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
