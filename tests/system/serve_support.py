"""Helpers and fixtures for the server tests: an app on the demo model, a throwaway PostgreSQL server, a live
uvicorn server on a free port. Test modules import the fixtures they use from here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


# TestClient sends "Host: testserver"; the live servers are reached as 127.0.0.1.
TEST_HOSTS = ["testserver", "127.0.0.1", "localhost"]


def make_settings(model_dir: Path, database_url: str, **overrides):
    from serve.settings import Settings

    return Settings(
        **{
            "model_dir": model_dir,
            "database_url": database_url,
            "api_key": API_KEY,
            "allowed_hosts": TEST_HOSTS,
            **overrides,
        }
    )


# ----------------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian puts it in /usr/lib/postgresql/<version>/bin)."""
    for root in PG_ROOTS:
        if root.is_dir():
            versions = sorted(
                (p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                key=lambda p: int(p.name) if p.name.isdigit() else 0,
                reverse=True,
            )
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


class PostgresServer:
    """A throwaway PostgreSQL server: initdb into a temporary directory, pg_ctl on a free port. It can be stopped and
    started again (same data, same port), to test what the feedback store does while its database is away."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.base = Path(tempfile.mkdtemp(prefix="sanshi-pg-"))
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root but there is no 'postgres' OS user to run the server as")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/sanshi_feedback"

    def run(self, *cmd: str) -> None:
        subprocess.run([*self.prefix, *cmd], check=True, capture_output=True, timeout=120)

    def create(self) -> None:
        self.run(
            str(self.binaries / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.start()
        self.run(
            str(self.binaries / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "sanshi_feedback",
        )

    def start(self) -> None:
        self.run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [*self.prefix, str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            capture_output=True,
            timeout=60,
        )

    def execute(self, *statements: str) -> None:
        """Run statements as the superuser on the maintenance database (autocommit)."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            for statement in statements:
                connection.execute(statement)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on a free port, stopped and deleted at the end of the session.

    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` OS user (runuser).
    """
    server = PostgresServer(_require_postgres())
    try:
        server.create()
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or b"").decode("utf-8", "replace")
        if server.log.exists():
            detail += server.log.read_text(errors="replace")[-2000:]
        shutil.rmtree(server.base, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {detail}")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    return postgres_server.url


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


# ------------------------------------------------------------------------------------ a server as a real process


SANSHI_ML = Path(sys.executable).with_name("sanshi-ml")


class ServeProcess:
    """``sanshi-ml serve`` as a real process on a free port; its whole output (stdout and stderr, where uvicorn and
    the server log) goes to ``log_path``, so tests can search what the server wrote."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [str(SANSHI_ML), "serve", "--port", str(self.port), *args]
        self.env = {**os.environ, "SANSHI_API_KEY": API_KEY, **(env or {})}
        self.env.pop("SANSHI_MODEL_URI", None)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        from tests.conftest import REPO

        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.output()}"
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in time: {self.output()[-3000:]}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


# --------------------------------------------------------------------------------------- unusable storage, for real


@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for this process, for real. Root ignores permission bits, so as root the file is made
    immutable (chattr +i) instead; without either the test is skipped."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root on a file system without chattr +i: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real small file system (tmpfs) mounted at ``path``, to fill up; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system is full; returns the file (delete it to free the room)."""
    filler = directory / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0" * 512)
        except OSError:
            pass
    return filler
