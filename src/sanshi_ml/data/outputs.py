"""Where commands write: output locations checked before the work, files replaced atomically, write errors named by
their path, and the lock that keeps two scoring runs off one output.

A command that would only find out at the end that it cannot write (a read-only directory, a model directory on a
mount that refuses files) checks first with :func:`check_writable`, by creating and removing a small file there. A
disk that fills up, or a file-size limit, can only show while writing: :func:`writing` turns the ``OSError`` into
an :class:`OutputError` that names the file, which the command line prints as one line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sanshi_ml.data.readers import RecordError

LOCK_SUFFIX = ".lock"


class OutputError(RecordError):
    """An output location that cannot be written; the message names the path and why."""


def _reason(error: OSError) -> str:
    """The system's words for the error ("No space left on device", "File too large"); pyarrow's own message when
    it gives no error number."""
    if error.strerror:
        return error.strerror
    if error.errno:
        return os.strerror(error.errno)
    return str(error).strip() or type(error).__name__


def check_writable(directory: str | Path, what: str = "output") -> None:
    """Fail now, with the path, if files cannot be created in ``directory`` (or, if it does not exist yet, in the
    nearest existing directory above it, where it would be created)."""
    directory = Path(directory)
    probe_dir = directory
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise OutputError(f"{directory}: cannot write the {what} there: {probe_dir} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".sanshi-ml-probe-")
    except OSError as error:
        where = "" if probe_dir == directory else f" (in {probe_dir}, where it would be created)"
        raise OutputError(f"{directory}: cannot write the {what} there{where}: {_reason(error)}") from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def atomic_file(target: str | Path, temp_dir: str | Path | None = None) -> Iterator[Path]:
    """A temporary path to write ``target``'s new contents to. When the block ends, the file is flushed to disk and
    renamed onto ``target``, so a crash leaves the old file or the new one, never half of one; when it fails, the
    file is removed. ``temp_dir`` (on ``target``'s file system) holds the temporary file instead of ``target``'s
    directory: a run's own work directory, so that a kill leaves nothing beside its output."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=temp_dir or target.parent, prefix=f".{target.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` (disk full, file too large, permission) into an
    :class:`OutputError` that names it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        label = f" {what}" if what else ""
        raise OutputError(f"{path}: cannot write{label}: {_reason(error)}") from None


def lock_path(out: str | Path) -> Path:
    """The lock file of output ``out``: hidden, beside it, ``.NAME.lock``."""
    out = Path(out)
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(out: str | Path, command: str = "sanshi-ml score") -> Iterator[Path]:
    """Hold the lock of output ``out`` for the duration of the block, or refuse at once if another run holds it.

    An ``fcntl`` lock (filelock's UnixFileLock) on ``.NAME.lock`` beside the output: the kernel releases it when the
    holding process ends in any way, ``kill -9`` included, so a lock is never left stale. The file is removed when
    the block ends (a later waiter that had opened the removed file notices and opens the new one; filelock checks
    that the file it locked still has a name). After a kill it stays until the next run on that output ends.
    """
    from filelock import FileLock, Timeout

    path = lock_path(out)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _holder(path)
        raise OutputError(
            f"{out}: another {command} run{holder} is writing this output (it holds {path}); wait "
            "for it to finish, or stop it, then run again (with --resume to finish its work)"
        ) from None
    except OSError as error:
        raise OutputError(f"{path}: cannot create the lock of {out}: {_reason(error)}") from None
    try:
        _record_holder(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: nobody else can be using this file's name yet
        lock.release()


def _record_holder(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="ascii") as handle:  # the lock is on the file, not on its contents
            handle.write(f"{os.getpid()}\n")


def _holder(path: Path) -> str:
    """' (process N)' from the lock file, if the holder wrote its id there."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeError):
        return ""
    return f" (process {text})" if text.isdigit() else ""
