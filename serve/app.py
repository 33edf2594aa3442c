"""The intake server: suggestions with confidence for clerks, a web page, and corrections kept for retraining.

``create_app(settings)`` builds the FastAPI application. The model is loaded in ``lifespan`` (in a background thread,
so ``/health`` answers at once and ``/ready`` says 503 until the model is in), from a model directory or from an
MLflow registry URI. Every suggestion goes through :class:`sanshi_ml.suggest.Suggester`, the same code batch scoring
uses, so one record gets the same answer everywhere.

Every error is a JSON body ``{"error", "message", "detail": [{"field", "type", "message"}], "total"}`` naming the
field; bad input is a 4xx, never a 500 or a traceback, and error bodies never echo the input (it may hold personal
data). ``detail`` lists the first :data:`MAX_ERROR_ITEMS` problems and ``total`` counts them all.

No single request can stall the server: the model runs in its own thread (the micro-batcher cuts big batches into
calls of bounded size, and single suggestions go between them), a request body is read within a size limit and a
time limit before anything parses it, JSON is parsed off the event loop when it is large, and its shape (depth,
fields per object, values in all) is bounded before validation. See docs/serving.md, "What is protected, and how".
"""

# No `from __future__ import annotations` here: the request models are built per application inside create_app, and
# FastAPI must see the real classes in the endpoint signatures, not strings it cannot resolve.

import asyncio
import email.message
import gc
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette._utils import parse_host_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from serve.batcher import MicroBatcher
from serve.export import ExportLayout, csv_chunks
from serve.logs import describe_exception, install_escaping
from serve.schemas import (
    ID_MAX_CHARS,
    LABEL_MAX_CHARS,
    MAX_TARGETS,
    TIMESTAMP_SCHEMA,
    TITLE_MAX_CHARS,
    BatchResponse,
    ErrorBody,
    FeedbackStored,
    Health,
    ModelInfo,
    Readiness,
    Suggestion,
    TextProblem,
    as_mapping,
    build_request_models,
    optional_timestamp,
)
from serve.settings import Settings
from serve.store import UNAVAILABLE, FeedbackEntry, FeedbackStore, StoreError, StoreHealth, StoreUnavailable

log = logging.getLogger("serve")

STATIC_DIR = Path(__file__).with_name("static")
# Swagger UI and ReDoc as the fastapi-offline package ships them: /docs works on an intranet without internet access.
DOCS_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
API_KEY_HEADER = "X-API-Key"
JSON = "application/json"
MAX_ERROR_ITEMS = 10  # an error body lists this many problems, and counts the rest
PROBE_PATHS = frozenset({"/health", "/ready"})

# The shape a request body may have, checked before validation: a valid request is far inside these bounds, and an
# invalid one cannot make validation (or its error list) grow with it.
MAX_JSON_DEPTH = 8
MAX_OBJECT_FIELDS = 64
JSON_PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed in a worker thread, off the event loop
LARGE_BODY_PARSES = 2  # at most this many large bodies are parsed (and held as Python objects) at once

# Security headers. The clerk page and its script are plain files: nothing inline, nothing from elsewhere, never in
# a frame. Swagger UI and ReDoc set inline styles (and ReDoc runs a worker from a blob), so /docs and /redoc have
# their own policy; neither runs an inline script.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", PAGE_CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
WARMUP_RECORDS = [
    ("电梯坏了", "A3区青青家园小区5栋的电梯坏了一个多月，物业一直不修，老人上下楼很困难。"),
    ("噪音扰民", "楼上邻居每天深夜拖动家具，噪音太大，沟通无果，请社区协调。"),
    (None, "我的手机号是13812345678，身份证430102199001011234，公司拖欠三个月工资不发。"),
    ("建議延長末班車", "<p>地鐵末班車太早，希望週末延長到十一點半&nbsp;。</p>"),
    ("ＡＢＣ路段积水", "１２３路公交站附近下雨就积水，车辆无法通行，email: someone@example.com"),
    ("咨询社保", "请问灵活就业人员如何缴纳养老保险，需要哪些材料？"),
]


class ApiError(Exception):
    """An error answered as JSON with a status code, naming the field it is about."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        field: str = "request",
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.field, self.kind, self.headers = field, kind or error, headers


def error_response(
    status: int,
    error: str,
    message: str,
    detail: list[dict] | None = None,
    headers: dict[str, str] | None = None,
    total: int | None = None,
) -> Response:
    detail = detail or []
    body = {
        "error": error,
        "message": message,
        "detail": detail[:MAX_ERROR_ITEMS],
        "total": len(detail) if total is None else total,
    }
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def json_response(payload: Any, status: int = 200) -> Response:
    """orjson straight to bytes: the payload is built to match the response model, so FastAPI's second pass of
    validation and encoding is skipped on the hot path (schemathesis checks the bodies against the schema)."""
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON)


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with a JSON 413.

    FastAPI's own ``max_body_size`` answers in plain text (and replaces any JSON error when Content-Length is over
    the limit), so the limit is kept here instead: a declared length is checked before anything is read, and a
    chunked body is counted as it arrives.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                message = f"the request body is larger than {self.limit} bytes"
                response = error_response(
                    413,
                    "body_too_large",
                    f"body: {message}",
                    [{"field": "body", "type": "body_too_large", "message": message}],
                )
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


class HostGuard(TrustedHostMiddleware):
    """Starlette's TrustedHostMiddleware (the same patterns), answering with this API's JSON error body.

    A page on localhost can be reached by any web site through DNS rebinding unless the Host header is checked.
    The probes answer whatever the Host: load balancers and orchestrators address them by IP, and they tell
    nothing a page could use.
    """

    async def __call__(self, scope, receive, send) -> None:
        if self.allow_any or scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        host_header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
        parsed = parse_host_header(host_header)
        host = parsed.host.lower() if parsed is not None else None
        if host is not None and any(
            host == pattern or (pattern.startswith("*") and host.endswith(pattern[1:]))
            for pattern in self.allowed_hosts
        ):
            await self.app(scope, receive, send)
            return
        message = "this server does not answer for this host name (set SANSHI_ALLOWED_HOSTS)"
        await error_response(
            400, "invalid_host", f"Host: {message}", [{"field": "Host", "type": "invalid_host", "message": message}]
        )(scope, receive, send)


class SecurityHeaders:
    """Adds the security headers to every response that does not set its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [item for item in SECURITY_HEADERS if item[0] not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CatchAll:
    """The last net: an error no handler took becomes a JSON 500, logged by type and place only.

    Starlette's own last handler re-raises the error after answering, so that the server logs it: with its message,
    which for a database error quotes the request's text. Here it stops.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return
        except Exception as error:  # noqa: BLE001 - the point of this middleware
            log.error("unhandled error in %s %s: %s", scope.get("method"), scope.get("path"), describe_exception(error))
            if not started:
                await error_response(500, "internal_error", "the server failed to answer; the error is logged")(
                    scope, receive, send
                )


def is_json_content(request: Request) -> bool:
    """FastAPI's rule: a body is parsed as JSON only under a JSON content type (never without one)."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def check_json_shape(value: Any, max_values: int) -> None:
    """Raise ApiError(422) if the parsed body is deeper, wider or larger than any valid request can be."""
    count = 0
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        count += 1
        if count > max_values:
            raise too_many_values(max_values)
        if isinstance(node, dict):
            if depth >= MAX_JSON_DEPTH:
                raise ApiError(
                    422,
                    "validation_error",
                    f"nested deeper than {MAX_JSON_DEPTH} levels",
                    field=".".join(map(str, path)) or "body",
                    kind="too_deep",
                )
            if len(node) > MAX_OBJECT_FIELDS:
                raise ApiError(
                    422,
                    "validation_error",
                    f"an object may hold at most {MAX_OBJECT_FIELDS} fields",
                    field=".".join(map(str, path)) or "body",
                    kind="too_many_fields",
                )
            stack.extend((item, (*path, key), depth + 1) for key, item in node.items())
        elif isinstance(node, list):
            if depth >= MAX_JSON_DEPTH:
                raise ApiError(
                    422,
                    "validation_error",
                    f"nested deeper than {MAX_JSON_DEPTH} levels",
                    field=".".join(map(str, path)) or "body",
                    kind="too_deep",
                )
            stack.extend((item, (*path, index), depth + 1) for index, item in enumerate(node))


def prescan_json(body: bytes, max_values: int) -> None:
    """Refuse a body with more values, or deeper nesting, than any valid request has, *before* it is parsed.

    Parsing is what costs: ``json.loads`` builds every value while it holds the interpreter lock, so a 10 MB body of
    a million tiny fields held every thread, the event loop included, for half a second and more. This scan costs
    about a third of a parse of the same bytes and builds one small object per string: the body is split at its
    quotes, a quote after an odd number of backslashes is part of a string, the others delimit the strings (one per
    key or string value), and the structural characters between strings are counted. In UTF-8 none of those bytes
    can occur inside a multi-byte character, so the counts are exact.
    """
    if body[:4].count(0):  # UTF-16 or UTF-32, which JSON allows: scan it as UTF-8
        body = body.decode(json.detect_encoding(body), "surrogatepass").encode("utf-8", "surrogatepass")
    # Quotes escaped inside texts count here too; a valid request holds far fewer than this.
    if body.count(b'"') > 64 * max_values:
        raise too_many_values(max_values)
    parts = body.split(b'"')
    outside: list[bytes] = []
    strings = 0
    in_string = False
    for part in parts[:-1]:  # each part is followed by a quote
        if not in_string:
            outside.append(part)
            in_string = True
            strings += 1
        elif not part.endswith(b"\\") or (len(part) - len(part.rstrip(b"\\"))) % 2 == 0:
            in_string = False  # an unescaped quote: the string ends
    if not in_string:
        outside.append(parts[-1])
    if strings > max_values:
        raise too_many_values(max_values)
    between = b"".join(outside)  # numbers, literals and structure
    if between.count(b",") + between.count(b"{") + between.count(b"[") > max_values:
        raise too_many_values(max_values)
    depth = 0
    for bracket in between.translate(None, delete=_NOT_BRACKETS):
        depth += 1 if bracket in (0x5B, 0x7B) else -1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                422, "validation_error", f"nested deeper than {MAX_JSON_DEPTH} levels", field="body", kind="too_deep"
            )


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_many_values(max_values: int) -> ApiError:
    return ApiError(
        422, "validation_error", f"the body holds more than {max_values} values", field="body", kind="too_many_values"
    )


def parse_json_body(body: bytes, max_values: int) -> Any:
    """The body's shape bounded before parsing (a large body), then ``json.loads`` as FastAPI calls it (the same
    errors), then the exact shape check (fields per object, and the path of a problem)."""
    if len(body) > JSON_PARSE_INLINE_BYTES:
        prescan_json(body, max_values)
    value = json.loads(body)
    check_json_shape(value, max_values)
    return value


class GuardedRoute(APIRoute):
    """A route that reads its request body itself, before FastAPI parses and validates it.

    The body is read within ``body_limit`` bytes (413 as soon as it is exceeded, whatever Content-Length said) and
    within the settings' ``body_timeout`` seconds (408 and the connection closed: a client trickling a body cannot
    hold a connection and a task for ever). JSON is parsed here, in a worker thread when the body is large, and its
    shape is checked; FastAPI then validates the parsed value without parsing it again.
    """

    body_limit: int | None = None  # set per route by create_app
    guard_settings: Settings | None = None
    large_parses: asyncio.Semaphore | None = None

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            settings = self.guard_settings
            if settings is not None and request.method in ("POST", "PUT", "PATCH"):
                await self._read_body(request, self.body_limit or settings.body_limit, settings)
            return await handler(request)

        return guarded

    async def _read_body(self, request: Request, limit: int, settings: Settings) -> None:
        for name, value in request.scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise BodyTooLarge()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(settings.body_timeout):
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the request body did not arrive within {settings.body_timeout:g} seconds",
                field="body",
                kind="request_timeout",
                headers={"Connection": "close"},
            ) from None
        body = b"".join(chunks)
        request._body = body  # what request.body() returns from now on
        if not body or not is_json_content(request):
            return
        max_values = 16 * settings.max_batch + 1024
        try:
            if len(body) <= JSON_PARSE_INLINE_BYTES or self.large_parses is None:
                parsed = parse_json_body(body, max_values)
            else:
                async with self.large_parses:
                    parsed = await asyncio.to_thread(parse_json_body, body, max_values)
        except json.JSONDecodeError as error:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", error.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": error.msg},
                    }
                ]
            ) from None
        except (ApiError, HTTPException):
            raise
        except Exception as error:  # not UTF-8 (or another encoding JSON allows): FastAPI's 400, same cause
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from error
        request._json = parsed  # FastAPI validates this instead of parsing the body again


# ------------------------------------------------------------------------------------------------- server state


class ServerState:
    """What the application holds between requests: the model (once loaded), the batcher and the store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.suggester = None
        self.model_info: dict | None = None
        self.model_info_bytes: bytes = b""
        self.layout: ExportLayout | None = None
        self.batcher: MicroBatcher | None = None
        self.store: FeedbackStore | None = None
        self.store_health: StoreHealth | None = None  # not checked yet
        self.store_checked_at = float("-inf")
        self.store_lock = threading.Lock()
        self.download_dir: Path | None = None  # a model fetched from the MLflow registry, removed at shutdown

    def load_model(self) -> None:
        """Load, integrity-check and warm up the model (runs in a thread)."""
        from sanshi_ml.artifacts import load_model
        from sanshi_ml.suggest import Suggester

        settings = self.settings
        started = time.perf_counter()
        if settings.model_uri:
            from sanshi_ml.config import Params
            from sanshi_ml.tracking import load_registered_model_dir

            params = Params()
            params.tracking.uri = settings.tracking_uri
            self.download_dir = Path(tempfile.mkdtemp(prefix="sanshi-serve-model-"))
            model_dir = Path(load_registered_model_dir(settings.model_uri, dst=self.download_dir, params=params))
        elif settings.model_dir is not None:
            model_dir = Path(settings.model_dir)
        else:
            raise RuntimeError("no model configured: set SANSHI_MODEL_DIR or SANSHI_MODEL_URI")
        loaded = load_model(model_dir)
        suggester = Suggester.from_loaded(loaded, settings.policy_path)
        # The first calls build the segmenter's dictionary, the reason-term weights and other lazy caches (a first
        # 32-record batch took 140 ms instead of 13 ms); pay for them before going ready, at every batch size.
        suggester.suggest(WARMUP_RECORDS[:1], top_k=1)
        repeats = -(-settings.batch_records // len(WARMUP_RECORDS))
        suggester.suggest((WARMUP_RECORDS * repeats)[: settings.batch_records], top_k=settings.top_k)
        # The model is hundreds of thousands of long-lived objects; a full garbage collection walked them all and
        # stalled the server for 100-130 ms every second or so under load. Frozen, they are never walked again.
        gc.collect()
        gc.freeze()
        self.model_info = model_info(suggester, loaded.metadata, model_dir, settings)
        self.model_info_bytes = orjson.dumps(self.model_info)
        self.layout = ExportLayout.from_metadata(loaded.metadata, suggester.targets)
        self.suggester = suggester
        self.status = "ready"
        log.info("model %s (%s) ready in %.1fs", loaded.version, settings.model_source, time.perf_counter() - started)

    def suggest_records(self, records, top_k: int) -> list[dict]:
        return self.suggester.suggest(records, top_k=top_k)

    # ------------------------------------------------------------------------------------------ the feedback store

    def check_store(self, force: bool = False) -> StoreHealth:
        """The store's health (runs in a worker thread). A successful check is reused for ``store_check_seconds``,
        but a SQLite file's identity is checked every time (a stat); a failed check is repeated at the next call."""
        with self.store_lock:
            now = time.monotonic()
            if self.store is None:
                try:
                    self.store = FeedbackStore(self.settings.database_url)
                except StoreUnavailable as error:
                    return self.note_store(StoreHealth(error.reason, str(error)))
                except StoreError as error:
                    return self.note_store(StoreHealth(UNAVAILABLE, str(error)))
                force = True
            fresh = now - self.store_checked_at < self.settings.store_check_seconds
            if self.store_health is not None and self.store_health.ok and fresh and not force:
                try:
                    self.store.check_file()
                    return self.store_health
                except StoreUnavailable as error:
                    return self.note_store(StoreHealth(error.reason, str(error)))
            health = self.store.check()
            self.store_checked_at = time.monotonic()
            return self.note_store(health)

    def note_store(self, health: StoreHealth) -> StoreHealth:
        """Remember what the last check or write found; /ready reports it."""
        previous = self.store_health
        if previous is None or health.reason != previous.reason:
            if health.ok:
                log.info(
                    "feedback store %s: %s",
                    "usable again" if previous else "usable",
                    self.store.url if self.store else "the database",
                )
            else:
                log.error("feedback store unusable (%s): %s", health.reason, health.message)
        if not health.ok:
            self.store_checked_at = float("-inf")  # the next /ready checks again
        self.store_health = health
        return health

    def require_store(self) -> FeedbackStore:
        if self.store is None:
            health = self.check_store()
            if self.store is None:
                raise store_error(StoreUnavailable(health.reason or UNAVAILABLE, health.message))
        return self.store

    def require_model(self):
        if self.suggester is None:
            message = (
                "the model failed to load; see /ready"
                if self.status == "failed"
                else "the model is still loading; retry when /ready answers 200"
            )
            raise ApiError(503, "not_ready", message, field="model", headers={"Retry-After": "2"})
        return self.suggester


def store_error(error: StoreUnavailable) -> ApiError:
    """A store that cannot take the write: 503 naming the reason (deleted, read_only, full, unreachable, …)."""
    return ApiError(
        503,
        "store_unavailable",
        f"feedback was not stored: {error}",
        field="store",
        kind=error.reason,
        headers={"Retry-After": "5"},
    )


def model_info(suggester, metadata: dict, model_dir: Path, settings: Settings) -> dict:
    """What /v1/model shows: enough to know which model answered and how far to trust it."""
    described = suggester.model.describe()
    columns = metadata.get("columns") or {}
    target_columns = columns.get("targets") or {}
    metrics = metadata.get("metrics") or {}
    if settings.model_uri:
        name = settings.model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    else:
        name = model_dir.name
    targets = {}
    for target, info in described.items():
        head_metrics = metrics.get(target) or {}
        targets[target] = {
            "column": target_columns.get(target),
            "labels": list(info["labels"]),
            "threshold": float(info["threshold"]),
            "n_train": int(info["n_train"]),
            "metrics": {k: (float(v) if isinstance(v, (int, float)) else None) for k, v in head_metrics.items()},
        }
    policy = suggester.policy
    return {
        "name": name,
        "version": suggester.version,
        "source": settings.model_source,
        "created_at": metadata.get("created_at"),
        "git_commit": metadata.get("git_commit"),
        "data_sha256": (metadata.get("data") or {}).get("sha256"),
        "n_train": (metadata.get("data") or {}).get("n_train"),
        # where the targets' metrics come from: out_of_fold for every model trained on all its rows
        "metrics_source": metadata.get("metrics_source") or ("held_out_split" if metrics else None),
        "targets": targets,
        "sanshi_target": suggester.sanshi_target,
        "sanshi_classes": {label: suggester.sanshi_fields(label) for label in policy.classes},
        "policy": {
            "name": policy.name,
            "version": policy.version,
            "sha256": policy.sha256,
            "review_rule": suggester.review_rule,
        },
        "columns": columns,
        "limits": {"max_text_chars": settings.max_text_chars, "max_batch": settings.max_batch, "top_k": settings.top_k},
    }


# ----------------------------------------------------------------------------------------------- error handling


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "header", "path", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _describe_validation(errors: list[dict]) -> tuple[int, str, list[dict]]:
    """FastAPI/pydantic errors as (status, code, items); the input values are never included."""
    items = []
    status, code = 422, "validation_error"
    for error in errors:
        kind = error.get("type", "invalid")
        loc = tuple(error.get("loc", ()))
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "not valid JSON")
            position = loc[1] if len(loc) > 1 else None
            where = f" at character {position}" if isinstance(position, int) else ""
            items.append(
                {
                    "field": "body",
                    "type": "invalid_json",
                    "message": f"the request body is not valid JSON: {reason}{where}",
                }
            )
            status, code = 400, "invalid_json"
            continue
        field = _field(loc)
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, TextProblem):
            kind, message = cause.kind, str(cause)
        elif kind == "missing":
            message = "a JSON body is required" if field == "body" else "this field is required"
        elif kind == "extra_forbidden" and len(loc) == 3 and loc[1] in ("labels", "suggestion"):
            kind, message = "unknown_target", "not a target of this model (see /v1/model)"
        elif kind == "extra_forbidden":
            kind, message = "unknown_field", "unknown field (the server runs in strict mode)"
        elif kind == "model_attributes_type" and field == "body":
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        items.append({"field": field, "type": kind, "message": message})
    return status, code, items


def _summary(items: list[dict], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = "; ".join(f"{item['field']}: {item['message']}" for item in items[:3])
    return shown + (f"; and {total - 3} more" if total > 3 else "")


HTTP_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        # Only the first few are described; the body's shape check bounds how many there can be at all.
        status, code, items = _describe_validation(list(errors[:MAX_ERROR_ITEMS]))
        return error_response(status, code, _summary(items, len(errors)), items, total=len(errors))

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> Response:
        return error_response(
            exc.status,
            exc.error,
            f"{exc.field}: {exc.message}",
            [{"field": exc.field, "type": exc.kind, "message": exc.message}],
            exc.headers,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = HTTP_ERRORS.get(exc.status_code, "http_error")
        field, message = "request", str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):
            code, field = "invalid_utf8", "body"
            message = f"the request body is not valid UTF-8 (byte {exc.__cause__.start})"
        elif exc.status_code == 400:
            field, message = "body", "the request body cannot be read as JSON"
        elif exc.status_code == 404:
            field, message = "path", f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            field, message = "method", f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 413:
            field, message = "body", "the request body is larger than this server accepts"
        return error_response(
            exc.status_code,
            code,
            f"{field}: {message}",
            [{"field": field, "type": code, "message": message}],
            getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Reached only by an error outside CatchAll (in an outer middleware). Logged by type and place: an error's
        # message can quote the request.
        log.error("unhandled error in %s %s: %s", request.method, request.url.path, describe_exception(exc))
        return error_response(500, "internal_error", "the server failed to answer; the error is logged")


# ------------------------------------------------------------------------------------------------------- the app


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorBody, "description": "the body is not valid JSON or not valid UTF-8"},
    422: {"model": ErrorBody, "description": "a field is missing, of the wrong type, out of bounds or unknown"},
    503: {"model": ErrorBody, "description": "the model is not loaded yet"},
    "default": {"model": ErrorBody, "description": "any other error, with the same body"},
}
KEYED_RESPONSES = {401: {"model": ErrorBody, "description": "missing or wrong API key"}, **ERROR_RESPONSES}
STORE_RESPONSES = {
    **KEYED_RESPONSES,
    503: {
        "model": ErrorBody,
        "description": "the model is not loaded yet, or the "
        "feedback store cannot take the write (error.detail[0].type: deleted, "
        "read_only, full, unreachable, unavailable); nothing was stored",
    },
}


def known_targets(settings: Settings) -> list[str] | None:
    """The model's targets from its metadata (cheap: no unpickling), so the feedback schema can name them."""
    if settings.model_dir is None:
        return None
    from sanshi_ml.artifacts import ArtifactError, read_metadata

    try:
        return list(read_metadata(settings.model_dir).get("targets") or {}) or None
    except ArtifactError:
        return None  # the background load reports the problem through /ready


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application; with no settings, they are read from SANSHI_* variables and params.yaml."""
    settings = settings or Settings.load()
    state = ServerState(settings)
    models = build_request_models(
        settings.max_text_chars, settings.max_batch, settings.strict, targets=known_targets(settings)
    )
    SuggestRequest, BatchRequest, FeedbackRequest = models.SuggestRequest, models.BatchRequest, models.FeedbackRequest

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_escaping()  # after uvicorn has configured its loggers: no client value can start a log line
        route_class.large_parses = asyncio.Semaphore(LARGE_BODY_PARSES)
        state.batcher = MicroBatcher(
            state.suggest_records, settings.batch_records, settings.batch_chars, settings.inline_chars
        )
        state.batcher.start()
        loop = asyncio.get_running_loop()

        async def load() -> None:
            # The store is checked (a probe row written and read back) before the model is in, so /ready never
            # says 200 over a store that cannot take a write.
            await asyncio.to_thread(state.check_store, True)
            try:
                # In the model's own thread: the one that will run every suggestion.
                await loop.run_in_executor(state.batcher.executor, state.load_model)
            except Exception as error:  # reported by /ready; the process stays up so the reason can be read
                state.status, state.error = "failed", f"{type(error).__name__}: {error}"
                log.error("model not loaded: %s", state.error)

        loader = asyncio.create_task(load(), name="sanshi-model-loader")
        try:
            yield
        finally:
            loader.cancel()
            await state.batcher.stop()
            if state.store is not None:
                state.store.close()
            if state.download_dir is not None:
                shutil.rmtree(state.download_dir, ignore_errors=True)

    def reject_unknown_query(request: Request) -> None:
        """Strict mode: a query parameter the endpoint does not take is an error, as an unknown body field is."""
        if not request.query_params:
            return
        route = request.scope.get("route")
        known = {param.alias for param in route.dependant.query_params} if route is not None else set()
        for name in request.query_params:
            if name not in known:
                raise ApiError(
                    422,
                    "validation_error",
                    "unknown query parameter (the server runs in strict mode)",
                    field=name or "query",
                    kind="unknown_field",
                )

    app = FastAPI(
        dependencies=[Depends(reject_unknown_query)] if settings.strict else None,
        title="sanshi-ml intake server",
        summary="三事分流 triage suggestions for 12345 hotline records, with confidence, for intake clerks",
        description="Suggests the category, the 三事 class (with its colour, handling mode and time limit), the "
        "handling unit and the appeal type of a request, each with a calibrated confidence, the words "
        "that drove it and whether a person must review it. Clerks' answers are stored for retraining.",
        version="1",
        lifespan=lifespan,
        # The documentation pages are this app's own (below): served from the package, no CDN, no inline script.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    route_class = type("AppGuardedRoute", (GuardedRoute,), {"guard_settings": settings})
    app.router.route_class = route_class
    # Outermost last: hosts are checked first, every answer gets the security headers, and CatchAll sits right
    # around the routes so that no error reaches Starlette's last handler (which would log its message).
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HostGuard, allowed_hosts=settings.trusted_hosts, www_redirect=False)
    app.state.sanshi = state
    install_error_handlers(app)

    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's key (SANSHI_API_KEY)")

    def require_key(key: Annotated[str | None, Security(key_header)] = None) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if not expected:
            raise ApiError(
                401,
                "unauthorized",
                "this server has no API key configured (set SANSHI_API_KEY), so keyed endpoints are closed",
                field=API_KEY_HEADER,
            )
        if not key:
            raise ApiError(
                401, "unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header", field=API_KEY_HEADER
            )
        if not secrets.compare_digest(key.encode("utf-8"), expected.encode("utf-8")):
            raise ApiError(401, "unauthorized", "wrong API key", field=API_KEY_HEADER)

    keyed = [Depends(require_key)]
    suggest_guard = [] if settings.open_suggestions else keyed
    suggest_responses = ERROR_RESPONSES if settings.open_suggestions else KEYED_RESPONSES
    TopK = Annotated[int | None, Query(ge=1, le=20, description="labels listed per target (default: the server's)")]

    # ------------------------------------------------------------------------------------------ page and probes

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")

    def docs_page(request: Request, title: str, body: str) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        html = (
            f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f'<link rel="icon" href="{root}/docs-assets/favicon.png">\n'
            + body.replace("{root}", root).replace("{openapi}", f"{root}{app.openapi_url}")
            + "\n</html>\n"
        )
        return HTMLResponse(html, headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return docs_page(
            request,
            f"{app.title} - Swagger UI",
            (
                '<link rel="stylesheet" href="{root}/docs-assets/swagger-ui.css">\n</head>\n<body>\n'
                '<div id="swagger-ui" data-openapi-url="{openapi}"></div>\n'
                '<script src="{root}/docs-assets/swagger-ui-bundle.js"></script>\n'
                '<script src="{root}/static/swagger-init.js"></script>\n</body>'
            ),
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        # <redoc spec-url> is picked up by the standalone bundle itself: no script of our own.
        return docs_page(
            request,
            f"{app.title} - ReDoc",
            (
                '</head>\n<body>\n<redoc spec-url="{openapi}"></redoc>\n'
                '<script src="{root}/docs-assets/redoc.standalone.js"></script>\n</body>'
            ),
        )

    @app.get("/health", response_model=Health, tags=["probes"], responses={"default": ERROR_RESPONSES["default"]})
    async def health() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    async def readiness() -> Response:
        store = await asyncio.to_thread(state.check_store)
        store_state = {"status": "ok"} if store.ok else {"status": store.reason, "message": store.message}
        if state.status == "ready" and store.ok:
            return json_response({"status": "ready", "model_version": state.suggester.version, "store": store_state})
        if state.status == "ready":
            return json_response(
                {
                    "status": "store_unavailable",
                    "model_version": state.suggester.version,
                    "error": f"feedback store: {store.message}",
                    "store": store_state,
                },
                status=503,
            )
        return json_response({"status": state.status, "error": state.error, "store": store_state}, status=503)

    @app.get(
        "/ready",
        response_model=Readiness,
        tags=["probes"],
        responses={
            503: {
                "model": Readiness,
                "description": "the model is loading or failed to load, or the "
                "feedback store cannot take a write (deleted, "
                "read-only, full, unreachable)",
            },
            "default": ERROR_RESPONSES["default"],
        },
    )
    async def ready() -> Response:
        """Readiness: 200 once the model is loaded and warmed up and the feedback store has taken a write and
        given it back; 503 before, if loading failed, or while the store cannot be used (``store`` says why)."""
        return await readiness()

    # HEAD, as load balancers and uptime monitors send it (not in the schema: the same answers without a body).
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False)

    # ------------------------------------------------------------------------------------------------ the model

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], responses=ERROR_RESPONSES)
    async def model() -> Response:
        """Name, version, targets and their labels, thresholds, training time, data hash, headline metrics."""
        state.require_model()
        return Response(state.model_info_bytes, media_type=JSON)

    @app.post(
        "/v1/suggest",
        response_model=Suggestion,
        tags=["suggestions"],
        dependencies=suggest_guard,
        responses=suggest_responses,
    )
    async def suggest(body: SuggestRequest, top_k: TopK = None) -> Response:
        """Suggestions for one request: per target the label, its confidence, the top-k labels, whether a person
        must review it, and the words that drove it; the 三事 class also carries its colour and handling."""
        state.require_model()
        [result] = await state.batcher.submit([(body.title, body.text)], top_k or settings.top_k)
        return json_response({"id": body.id, **result})

    @app.post(
        "/v1/suggest/batch",
        response_model=BatchResponse,
        tags=["suggestions"],
        dependencies=suggest_guard,
        responses=suggest_responses,
    )
    async def suggest_batch(body: BatchRequest, top_k: TopK = None) -> Response:
        """Suggestions for a batch of requests (up to the server's max_batch), in the order sent."""
        suggester = state.require_model()
        results = await state.batcher.submit([(r.title, r.text) for r in body.records], top_k or settings.top_k)
        suggestions = [{"id": record.id, **result} for record, result in zip(body.records, results)]
        return json_response({"model_version": suggester.version, "suggestions": suggestions})

    # --------------------------------------------------------------------------------------------------- feedback

    @app.post(
        "/v1/feedback",
        response_model=FeedbackStored,
        status_code=201,
        tags=["feedback"],
        dependencies=keyed,
        responses=STORE_RESPONSES,
    )
    def feedback(body: FeedbackRequest) -> Response:
        """Store a clerk's accepted or corrected labels (personal data masked first). 201 means the answer is in
        the database; a store that cannot take it gets 503 and nothing is stored."""
        suggester = state.require_model()
        targets = set(suggester.targets)
        labels, suggested = as_mapping(body.labels), as_mapping(body.suggestion)
        for part, mapping in (("labels", labels), ("suggestion", suggested)):
            for target in mapping:
                if target not in targets:
                    raise ApiError(
                        422,
                        "validation_error",
                        f"unknown target; this model has {', '.join(suggester.targets)}",
                        field=f"{part}.{target}",
                        kind="unknown_target",
                    )
        store = state.require_store()
        try:
            row = store.add(
                FeedbackEntry(
                    text=body.text,
                    title=body.title,
                    record_id=body.id,
                    received_at=body.received_at,
                    model_version=body.model_version,
                    labels=labels,
                    clerk=body.clerk,
                    suggestion={t: as_mapping(item) for t, item in suggested.items()},
                )
            )
        except StoreUnavailable as error:
            state.note_store(StoreHealth(error.reason, str(error)))
            raise store_error(error) from None
        return json_response(
            {
                "feedback_id": row.id,
                "stored_at": row.created_at.isoformat(),
                "model_version": row.model_version,
                "corrected": row.corrected,
                "accepted": sorted(set(row.labels) - set(row.corrected)),
            },
            status=201,
        )

    @app.get(
        "/v1/feedback/export",
        tags=["feedback"],
        dependencies=keyed,
        responses={
            200: {
                "content": {"text/csv": {"schema": {"type": "string"}}},
                "description": "CSV with the model's training columns",
            },
            **STORE_RESPONSES,
        },
    )
    def export(
        since: Annotated[
            str | None,
            Query(description="only feedback stored at or after (RFC 3339)", json_schema_extra=TIMESTAMP_SCHEMA),
        ] = None,
        until: Annotated[
            str | None, Query(description="only feedback stored before (RFC 3339)", json_schema_extra=TIMESTAMP_SCHEMA)
        ] = None,
        model_version: Annotated[str | None, Query(max_length=64)] = None,
    ) -> StreamingResponse:
        """The stored answers as CSV with the serving model's training columns, ready for `sanshi-ml train`.
        Cells a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage return) are
        prefixed with a single quote."""
        bounds = {}
        for name, value in (("since", since), ("until", until)):
            try:
                bounds[name] = optional_timestamp(value)
            except ValueError as error:
                raise ApiError(422, "validation_error", str(error), field=name, kind="datetime_parsing") from None
        suggester = state.require_model()
        layout = state.layout
        model = suggester.model
        store = state.require_store()

        def segment(text: str) -> str:
            return " ".join(model.segmenter.raw_cut(model.normalize(text)))

        rows = store.rows(since=bounds["since"], until=bounds["until"], model_version=model_version)
        try:
            first = next(rows, None)  # an unusable store is a 503 here, before the 200 has been sent
        except StoreUnavailable as error:
            state.note_store(StoreHealth(error.reason, str(error)))
            raise store_error(error) from None

        def all_rows():
            if first is not None:
                yield first
                yield from rows

        return StreamingResponse(
            csv_chunks(layout, all_rows(), segment if layout.segmented_col else None),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="feedback.csv"'},
        )

    # Each route's body limit: a single record or a clerk's answer cannot be the size of a full batch.
    single = (settings.max_text_chars + TITLE_MAX_CHARS + ID_MAX_CHARS) * 6 + 4096
    feedback_limit = single + MAX_TARGETS * (LABEL_MAX_CHARS * 6 * 2 + 256) + 4096
    for route in app.routes:
        if isinstance(route, GuardedRoute):
            route.body_limit = {"/v1/suggest": single, "/v1/feedback": feedback_limit}.get(
                route.path, settings.body_limit
            )
    return app
