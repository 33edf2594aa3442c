"""What the server writes to its log: never a resident's words, never a line a client forged.

Two rules, applied in one place:

* **Values are escaped.** :class:`EscapingFilter` sits on the server's loggers (and uvicorn's) and rewrites every
  string argument of a log call so that a line break or any other control character (C0, DEL, C1, U+2028/U+2029)
  appears as ``\\n``, ``\\x1b``, ``\\u2028``…: whatever a client puts in a field, it cannot start a new log line.
* **Errors are described, not quoted.** :func:`describe_exception` names an exception by its type, the database's
  error code (SQLSTATE, SQLite's error name) and where it was raised, never by its message: a database error's message
  holds the statement's parameters (the text of the request) or PostgreSQL's ``Failing row contains (…)``.
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

# Everything that can end a line in a terminal, a log viewer or str.splitlines, and every other control character.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: object) -> str:
    """``value`` as text on one line: control characters and line separators written as escapes."""
    text = value if isinstance(value, str) else str(value)
    # A backslash is doubled only when something is escaped, so ordinary values read as they are.
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_char, text.replace("\\", "\\\\"))


class EscapingFilter(logging.Filter):
    """Escapes the arguments of every record (and a message that is not a plain format string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, dict):
                record.args = {key: _safe_arg(value) for key, value in record.args.items()}
            else:
                record.args = tuple(_safe_arg(value) for value in record.args)
        if not isinstance(record.msg, str) or _UNSAFE.search(record.msg):
            record.msg = escape(record.msg)
        return True


def _safe_arg(value: object) -> object:
    # Numbers keep their type so that %d and %.1f still work; anything else becomes escaped text.
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return escape(value)


# The loggers whose records can carry client-supplied values: the server's own, and uvicorn's.
ESCAPED_LOGGERS = ("serve", "serve.store", "serve.batcher", "serve.app", "uvicorn", "uvicorn.error", "uvicorn.access")


def install_escaping(names: tuple[str, ...] = ESCAPED_LOGGERS) -> None:
    """Put one :class:`EscapingFilter` on each named logger (a logger's filters do not apply to its children)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, EscapingFilter) for existing in logger.filters):
            logger.addFilter(EscapingFilter())


def describe_exception(error: BaseException) -> str:
    """Type, database error code and where it was raised, for this error and its causes; never a message."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        parts.append(_one_exception(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return " <- ".join(parts)


def _one_exception(error: BaseException) -> str:
    name = type(error).__qualname__
    code = database_code(error)
    where = ""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    if frames:
        # The innermost frame of the project's own code says most; fall back to the innermost frame.
        own = [f for f in frames if "/serve/" in f.filename or "/sanshi_ml/" in f.filename]
        frame = (own or frames)[-1]
        path = Path(frame.filename)
        where = f" at {path.parent.name}/{path.name}:{frame.lineno} in {frame.name}"
    return f"{name}{f' [{code}]' if code else ''}{where}"


def database_code(error: BaseException) -> str | None:
    """SQLSTATE (psycopg) or the SQLite error name of a DBAPI error, or of the one SQLAlchemy wraps."""
    orig = getattr(error, "orig", None) or error
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return f"SQLSTATE {sqlstate}"
    name = getattr(orig, "sqlite_errorname", None)
    return name or None
