"""The feedback store: clerks' answers to suggestions, kept through SQLAlchemy for the next training.

One row per answer: the request (title and text), the model version and its suggestion, the clerk's labels and the
time. Personal data is masked (:func:`clean`) *before* a row is built, so phone numbers, ID numbers and e-mail
addresses never reach the database. A SQLite file is the default; a PostgreSQL URL (psycopg 3) works the same way.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sanshi_ml.text import mask_pii

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


def clean(value: str | None) -> str:
    """Mask personal data (phone, 身份证 and licence-plate numbers, e-mail addresses) and drop control characters.

    The masking is :func:`sanshi_ml.text.mask_pii`, the model's own. Unlike the model's full NFKC normalisation,
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
            return "postgresql+psycopg://" + url[len(prefix):]
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
        suggestion = {target: {"label": clean(item.get("label")), "confidence": item.get("confidence")}
                      for target, item in self.suggestion.items()}
        corrected = sorted(t for t, label in labels.items() if suggestion.get(t, {}).get("label") != label)
        received = self.received_at or now.astimezone()  # the server's local time, like the hotline's clock
        return FeedbackRow(created_at=now, record_id=clean(self.record_id) or None, title=clean(self.title),
                           text=clean(self.text), received_at=received.replace(tzinfo=None),
                           model_version=clean(self.model_version),
                           suggestion=suggestion, labels=labels, corrected=corrected, clerk=clean(self.clerk) or None)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything this store writes is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _as_utc(value: datetime | None) -> datetime | None:
    """A filter bound in UTC; a naive bound is taken as UTC."""
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


class FeedbackStore:
    """Feedback rows in a SQLite file or a PostgreSQL database; tables are created on first use."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(engine_url(url))
        except ArgumentError as error:
            raise StoreError(f"database URL cannot be parsed: {error}") from None
        self.url = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(parsed, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError) as error:
            raise StoreError(f"{self.url}: {error}") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_tables()
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
                    raise StoreError(f"{self.url}: cannot create the feedback table: {error.orig}") from None
                time.sleep(0.05 * (attempt + 1))

    def add(self, entry: FeedbackEntry) -> FeedbackRow:
        """Mask and store one answer; returns the stored row (with its id)."""
        row = entry.to_row(datetime.now(timezone.utc))
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(row)
            session.commit()
        log.info("feedback %d stored: model %s, corrected %s", row.id, row.model_version, row.corrected or "none")
        return row

    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(FeedbackRow)) or 0

    def rows(self, since: datetime | None = None, until: datetime | None = None,
             model_version: str | None = None, chunk: int = 1_000) -> Iterator[FeedbackRow]:
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
            with Session(self.engine) as session:
                batch = list(session.scalars(query))
                session.expunge_all()
            for row in batch:
                row.created_at = _utc(row.created_at)
                yield row
            if len(batch) < chunk:
                return
            last_id = batch[-1].id

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets an export read while another worker process writes; the busy timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")  # first, so that switching to WAL waits for another process too
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
