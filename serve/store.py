"""The feedback store: clerks' answers to suggestions, kept through SQLAlchemy for the next training.

One row per answer: the request (title and text), the model version and its suggestion, the clerk's labels and the
time. Personal data is masked (:func:`clean`) *before* a row is built, so phone numbers, ID numbers and e-mail
addresses never reach the database. A SQLite file is the default; a PostgreSQL URL (psycopg 3) works the same way.

**Stored or refused.** A write that did not reach the database is an error (:class:`StoreUnavailable`, answered 503),
never a success: a SQLite file is opened read-write but never created after start-up, and its identity (device and
inode) is checked before and after every write, so a file deleted or replaced under the server is noticed instead of
written into (an unlinked inode, gone at the next restart) or silently recreated empty. :meth:`FeedbackStore.check`
writes a probe row and reads it back; the server runs it before it says it is ready, and again from ``/ready``.
Database errors are logged by type and error code only (the engine hides statement parameters too), because their
messages carry the request's text.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, delete, event, func, insert, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sanshi_ml.core.text import mask_pii
from serve.logs import database_code, describe_exception

log = logging.getLogger("serve.store")

# C0 controls other than tab and newlines: PostgreSQL refuses NUL in text, and none of them belong in a request.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t]{2,}")
# Characters personal data is written with. Any character whose NFKC form is one of these (full-width digits,
# letters and @, the ideographic space, circled or mathematical digits, …) is folded to it before masking.
_PII_ALPHABET = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz@.+-_%() ")


@lru_cache(maxsize=1)
def _fold_table() -> dict[int, str]:
    table = {}
    for code in range(0x80, 0x20000):
        folded = unicodedata.normalize("NFKC", chr(code))
        if len(folded) == 1 and folded in _PII_ALPHABET:
            table[code] = folded
    return table


class StoreError(RuntimeError):
    """A database URL that cannot be used; the message never shows the password."""


# Why a store cannot be used, as /ready and the 503 answers name it.
DELETED, READ_ONLY, FULL, UNREACHABLE, UNAVAILABLE = "deleted", "read_only", "full", "unreachable", "unavailable"
MIN_FREE_BYTES = 1 << 20  # a SQLite disk with less room than this is reported full before a write fails on it


class StoreUnavailable(StoreError):
    """The store cannot take (or give) feedback now; ``reason`` is one of deleted, read_only, full, unreachable,
    unavailable. The message says what to do and never quotes the database's own message (it can hold the data)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StoreHealth:
    """The outcome of :meth:`FeedbackStore.check`: ``reason`` is None when the store took a write and gave it back."""

    reason: str | None
    message: str = "ok"

    @property
    def ok(self) -> bool:
        return self.reason is None


def clean(value: str | None) -> str:
    """Mask personal data (phone, 身份证 and licence-plate numbers, e-mail addresses) and drop control characters.

    The masking is :func:`sanshi_ml.core.text.mask_pii`, the model's own. Unlike the model's full NFKC normalisation,
    only the characters personal data is written with are folded to ASCII first (so a full-width phone number is
    caught too), and everything else — Chinese punctuation, line breaks — is kept as the clerk saw it.
    """
    if not value:
        return ""
    text = _CONTROL.sub(" ", value).translate(_fold_table())
    return _SPACES.sub(" ", mask_pii(text)).strip()


def engine_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Base(DeclarativeBase):
    pass


class FeedbackRow(Base):
    """One clerk's answer to one suggestion."""

    __tablename__ = "sanshi_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    record_id: Mapped[str | None] = mapped_column(String(128))
    title: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    # Wall-clock time as the hotline records it (受理时间 in exports is naive local time), not UTC.
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=False))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    suggestion: Mapped[dict] = mapped_column(JSON)  # target -> {"label", "confidence"}
    labels: Mapped[dict] = mapped_column(JSON)  # target -> the clerk's label
    corrected: Mapped[list] = mapped_column(JSON)  # targets where the clerk's label differs from the suggestion
    clerk: Mapped[str | None] = mapped_column(String(64))


class ProbeRow(Base):
    """A row written, read back and deleted by :meth:`FeedbackStore.check`: proof that the store takes writes."""

    __tablename__ = "sanshi_store_probe"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    written_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass
class FeedbackEntry:
    """An answer as it arrives, before masking."""

    text: str
    model_version: str
    labels: dict[str, str]
    suggestion: dict[str, dict] = field(default_factory=dict)
    title: str | None = None
    record_id: str | None = None
    received_at: datetime | None = None
    clerk: str | None = None

    def to_row(self, now: datetime) -> FeedbackRow:
        """The row to store: every free-text value masked, corrections worked out."""
        labels = {target: clean(label) for target, label in self.labels.items()}
        suggestion = {
            target: {"label": clean(item.get("label")), "confidence": item.get("confidence")}
            for target, item in self.suggestion.items()
        }
        corrected = sorted(t for t, label in labels.items() if suggestion.get(t, {}).get("label") != label)
        received = self.received_at or now.astimezone()  # the server's local time, like the hotline's clock
        return FeedbackRow(
            created_at=now,
            record_id=clean(self.record_id) or None,
            title=clean(self.title),
            text=clean(self.text),
            received_at=received.replace(tzinfo=None),
            model_version=clean(self.model_version),
            suggestion=suggestion,
            labels=labels,
            corrected=corrected,
            clerk=clean(self.clerk) or None,
        )


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything this store writes is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _as_utc(value: datetime | None) -> datetime | None:
    """A filter bound in UTC; a naive bound is taken as UTC."""
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


T = TypeVar("T")


class FeedbackStore:
    """Feedback rows in a SQLite file or a PostgreSQL database; tables are created on first use."""

    def __init__(self, url: str, connect_timeout: int = 5) -> None:
        try:
            parsed = make_url(engine_url(url))
        except ArgumentError as error:
            raise StoreError(f"database URL cannot be parsed: {error}") from None
        self.url = parsed.render_as_string(hide_password=True)
        self.backend = parsed.get_backend_name()
        self.path: Path | None = None  # a SQLite file whose identity is checked around every write
        self._identity: tuple[int, int] | None = None
        options: dict = {"pool_pre_ping": True, "hide_parameters": True}
        if self.backend == "sqlite" and parsed.database not in (None, "", ":memory:") and "uri" not in parsed.query:
            self.path = Path(parsed.database).resolve()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _create_sqlite_file(self.path, self.url)
            # From here on the file is opened read-write and never created: a deleted file is an error, not a new
            # empty database.
            parsed = parsed.set(
                database=f"file:{quote(str(self.path))}", query={**parsed.query, "mode": "rw", "uri": "true"}
            )
        elif self.backend == "postgresql" and parsed.get_driver_name() == "psycopg":
            # A database that does not answer must not hold a clerk's request (or /ready) for minutes.
            defaults = {
                "connect_timeout": connect_timeout,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 15_000,
            }
            options["connect_args"] = {k: v for k, v in defaults.items() if k not in parsed.query}
        try:
            self.engine: Engine = create_engine(parsed, **options)
        except (ArgumentError, NoSuchModuleError) as error:
            raise StoreError(f"{self.url}: {error}") from None
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_tables()
        if self.path is not None:
            self._identity = _file_identity(self.path)
        _fold_table()  # built once here (about 0.1 s) rather than inside the first clerk's request

    def _create_tables(self, attempts: int = 5) -> None:
        """Create the table if missing. Worker processes starting together race between "does it exist?" and
        "CREATE TABLE"; the loser sees "already exists" and simply checks again."""
        for attempt in range(attempts):
            try:
                Base.metadata.create_all(self.engine)
                return
            except DBAPIError as error:
                if error.connection_invalidated or attempt == attempts - 1:
                    self.engine.dispose()
                    reason, message = classify(error)
                    raise StoreUnavailable(reason, f"{self.url}: cannot create the feedback table: {message}") from None
                time.sleep(0.05 * (attempt + 1))

    # ---------------------------------------------------------------------------------------- the file's identity

    def check_file(self) -> None:
        """Raise :class:`StoreUnavailable` if the SQLite file is gone or is no longer the one opened at start-up."""
        if self.path is None:
            return
        try:
            identity = _file_identity(self.path)
        except FileNotFoundError:
            raise StoreUnavailable(
                DELETED,
                f"{self.url}: the database file was deleted while the server ran; restore it and restart the server",
            ) from None
        except OSError as error:
            raise StoreUnavailable(
                UNAVAILABLE, f"{self.url}: the database file cannot be checked ({error.strerror})"
            ) from None
        if identity != self._identity:
            raise StoreUnavailable(
                DELETED,
                f"{self.url}: the database file was deleted or replaced while the "
                "server ran; restart the server to use the file now there",
            )

    def _guarded(self, action: Callable[[], T], what: str) -> T:
        """Run ``action`` with the file checked before and after; database errors become StoreUnavailable."""
        self.check_file()
        try:
            result = action()
        except SQLAlchemyError as error:
            reason, message = classify(error)
            log.error("%s failed (%s): %s", what, reason, describe_exception(error))
            raise StoreUnavailable(reason, f"{self.url}: {message}") from None
        self.check_file()
        return result

    # --------------------------------------------------------------------------------------------- reads and writes

    def add(self, entry: FeedbackEntry) -> FeedbackRow:
        """Mask and store one answer; returns the stored row (with its id), or raises :class:`StoreUnavailable`.

        The row is acknowledged only after the commit, and (SQLite) only if the file committed to is still the one
        the server opened. A connection lost before the commit is retried once on a new one (nothing was written);
        a commit that fails is never retried (it may or may not have landed) and is reported as unavailable.
        """
        now = datetime.now(UTC)

        def write() -> FeedbackRow:
            for attempt in range(2):
                row = entry.to_row(now)
                with Session(self.engine, expire_on_commit=False) as session:
                    session.add(row)
                    try:
                        session.flush()
                    except DBAPIError as error:
                        session.rollback()
                        if error.connection_invalidated and attempt == 0:
                            log.warning(
                                "feedback write: connection lost before commit (%s); retrying on a new one",
                                describe_exception(error),
                            )
                            continue
                        raise
                    session.commit()
                    return row
            raise AssertionError("unreachable")

        row = self._guarded(write, "feedback write")
        log.info("feedback %d stored: model %s, corrected %s", row.id, row.model_version, row.corrected or "none")
        return row

    def count(self) -> int:
        def read() -> int:
            with Session(self.engine) as session:
                return session.scalar(select(func.count()).select_from(FeedbackRow)) or 0

        return self._guarded(read, "feedback count")

    def rows(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
        chunk: int = 1_000,
    ) -> Iterator[FeedbackRow]:
        """Stored rows in the order they arrived, streamed ``chunk`` at a time so an export never loads them all."""
        since, until = _as_utc(since), _as_utc(until)
        last_id = 0
        while True:
            query = select(FeedbackRow).where(FeedbackRow.id > last_id).order_by(FeedbackRow.id).limit(chunk)
            if since is not None:
                query = query.where(FeedbackRow.created_at >= since)
            if until is not None:
                query = query.where(FeedbackRow.created_at < until)
            if model_version is not None:
                query = query.where(FeedbackRow.model_version == model_version)

            def read(query=query) -> list[FeedbackRow]:
                with Session(self.engine) as session:
                    batch = list(session.scalars(query))
                    session.expunge_all()
                return batch

            batch = self._guarded(read, "feedback export")
            for row in batch:
                row.created_at = _utc(row.created_at)
                yield row
            if len(batch) < chunk:
                return
            last_id = batch[-1].id

    def check(self) -> StoreHealth:
        """Is the store usable? A probe row is written, read back on another connection, and deleted; a SQLite
        file must still be the one opened at start-up and have room left. Never raises."""
        try:
            self.check_file()
            if self.path is not None:
                stats = os.statvfs(self.path.parent)
                if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
                    return StoreHealth(
                        FULL, f"{self.url}: the disk holding the database has less than {MIN_FREE_BYTES >> 20} MiB free"
                    )
            token = secrets.token_hex(16)

            def probe() -> str | None:
                with self.engine.begin() as connection:
                    connection.execute(insert(ProbeRow).values(token=token, written_at=datetime.now(UTC)))
                with self.engine.connect() as connection:
                    found = connection.scalar(select(ProbeRow.token).where(ProbeRow.token == token))
                with self.engine.begin() as connection:
                    connection.execute(delete(ProbeRow).where(ProbeRow.token == token))
                return found

            found = self._guarded(probe, "store check")
        except StoreUnavailable as error:
            return StoreHealth(error.reason, str(error))
        except OSError as error:
            return StoreHealth(UNAVAILABLE, f"{self.url}: {error.strerror}")
        if found != token:
            return StoreHealth(UNAVAILABLE, f"{self.url}: a probe row was written but could not be read back")
        return StoreHealth(None)

    def close(self) -> None:
        self.engine.dispose()


def classify(error: BaseException) -> tuple[str, str]:
    """(reason, message) for a database error. The message names the error code, never the database's own text,
    which can quote the statement's data (PostgreSQL's "Failing row contains (…)")."""
    orig = getattr(error, "orig", None) or error
    name = getattr(orig, "sqlite_errorname", None) or ""
    state = getattr(orig, "sqlstate", None) or ""
    code = database_code(error)
    suffix = f" ({code})" if code else f" ({type(orig).__name__})"
    if name.startswith("SQLITE_READONLY") or state == "25006":
        return READ_ONLY, "the database is read-only" + suffix
    if name == "SQLITE_FULL" or state in ("53100", "53200", "54000"):
        return FULL, "the database or the disk holding it is full" + suffix
    if name.startswith("SQLITE_CANTOPEN"):
        return DELETED, "the database file cannot be opened: it was deleted, or its folder is not accessible" + suffix
    if (
        state.startswith("08")
        or state in ("57P01", "57P02", "57P03")
        or getattr(error, "connection_invalidated", False)
        or (type(orig).__name__ == "OperationalError" and not name and not state)
    ):
        return UNREACHABLE, "the database server cannot be reached" + suffix
    return UNAVAILABLE, "the database refused the operation" + suffix


def _file_identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _create_sqlite_file(path: Path, url: str) -> None:
    """Create an empty SQLite file if there is none (only at start-up)."""
    if path.exists():
        return
    try:
        sqlite3.connect(f"file:{quote(str(path))}?mode=rwc", uri=True).close()
    except sqlite3.Error as error:
        raise StoreUnavailable(
            UNAVAILABLE,
            f"{url}: cannot create the database file ({getattr(error, 'sqlite_errorname', type(error).__name__)})",
        ) from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets an export read while another worker process writes; the busy timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")  # first, so that switching to WAL waits for another process too
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk (the WAL synced) before it is acknowledged
    cursor.close()
