"""The intake server: suggestions with confidence for clerks, a web page, and corrections kept for retraining.

``create_app(settings)`` builds the FastAPI application. The model is loaded in ``lifespan`` (in a background thread,
so ``/health`` answers at once and ``/ready`` says 503 until the model is in), from a model directory or from an
MLflow registry URI. Every suggestion goes through :class:`sanshi_ml.suggest.Suggester`, the same code batch scoring
uses, so one record gets the same answer everywhere.

Every error is a JSON body ``{"error", "message", "detail": [{"field", "type", "message"}]}`` naming the field; bad
input is a 4xx, never a 500 or a traceback, and error bodies never echo the input (it may hold personal data).
"""

# No `from __future__ import annotations` here: the request models are built per application inside create_app, and
# FastAPI must see the real classes in the endpoint signatures, not strings it cannot resolve.

import asyncio
import gc
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batcher import MicroBatcher
from serve.export import ExportLayout, csv_chunks
from serve.schemas import (
    BatchResponse,
    ErrorBody,
    FeedbackStored,
    Health,
    ModelInfo,
    Readiness,
    Suggestion,
    TIMESTAMP_SCHEMA,
    TextProblem,
    as_mapping,
    build_request_models,
    optional_timestamp,
)
from serve.settings import Settings
from serve.store import FeedbackEntry, FeedbackStore

log = logging.getLogger("serve")

STATIC_DIR = Path(__file__).with_name("static")
API_KEY_HEADER = "X-API-Key"
JSON = "application/json"
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

    def __init__(self, status: int, error: str, message: str, field: str = "request", kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.field, self.kind, self.headers = field, kind or error, headers


def error_response(status: int, error: str, message: str, detail: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = {"error": error, "message": message, "detail": detail or []}
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
                response = error_response(413, "body_too_large", f"body: {message}",
                                          [{"field": "body", "type": "body_too_large", "message": message}])
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
        suggester.suggest((WARMUP_RECORDS * repeats)[:settings.batch_records], top_k=settings.top_k)
        # The model is hundreds of thousands of long-lived objects; a full garbage collection walked them all and
        # stalled the server for 100-130 ms every second or so under load. Frozen, they are never walked again.
        gc.collect()
        gc.freeze()
        self.model_info = model_info(suggester, loaded.metadata, model_dir, settings)
        self.model_info_bytes = orjson.dumps(self.model_info)
        self.layout = ExportLayout.from_metadata(loaded.metadata, suggester.targets)
        self.suggester = suggester
        self.status = "ready"
        log.info("model %s (%s) ready in %.1fs", loaded.version, settings.model_source,
                 time.perf_counter() - started)

    def suggest_records(self, records, top_k: int) -> list[dict]:
        return self.suggester.suggest(records, top_k=top_k)

    def require_model(self):
        if self.suggester is None:
            message = ("the model failed to load; see /ready" if self.status == "failed"
                       else "the model is still loading; retry when /ready answers 200")
            raise ApiError(503, "not_ready", message, field="model", headers={"Retry-After": "2"})
        return self.suggester


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
        "policy": {"name": policy.name, "version": policy.version, "sha256": policy.sha256,
                   "review_rule": suggester.review_rule},
        "columns": columns,
        "limits": {"max_text_chars": settings.max_text_chars, "max_batch": settings.max_batch,
                   "top_k": settings.top_k},
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
            items.append({"field": "body", "type": "invalid_json",
                          "message": f"the request body is not valid JSON: {reason}{where}"})
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


def _summary(items: list[dict]) -> str:
    shown = "; ".join(f"{item['field']}: {item['message']}" for item in items[:3])
    return shown + (f"; and {len(items) - 3} more" if len(items) > 3 else "")


HTTP_ERRORS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        status, code, items = _describe_validation(list(exc.errors()))
        return error_response(status, code, _summary(items), items)

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.error, f"{exc.field}: {exc.message}",
                              [{"field": exc.field, "type": exc.kind, "message": exc.message}], exc.headers)

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
        return error_response(exc.status_code, code, f"{field}: {message}",
                              [{"field": field, "type": code, "message": message}], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", "the server failed to answer; the error is logged")


# ------------------------------------------------------------------------------------------------------- the app


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorBody, "description": "the body is not valid JSON or not valid UTF-8"},
    422: {"model": ErrorBody, "description": "a field is missing, of the wrong type, out of bounds or unknown"},
    503: {"model": ErrorBody, "description": "the model is not loaded yet"},
    "default": {"model": ErrorBody, "description": "any other error, with the same body"},
}
KEYED_RESPONSES = {401: {"model": ErrorBody, "description": "missing or wrong API key"}, **ERROR_RESPONSES}


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
    models = build_request_models(settings.max_text_chars, settings.max_batch, settings.strict,
                                  targets=known_targets(settings))
    SuggestRequest, BatchRequest, FeedbackRequest = models.SuggestRequest, models.BatchRequest, models.FeedbackRequest

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.store = FeedbackStore(settings.database_url)
        state.batcher = MicroBatcher(state.suggest_records, settings.batch_records)
        state.batcher.start()

        async def load() -> None:
            try:
                await asyncio.to_thread(state.load_model)
            except Exception as error:  # reported by /ready; the process stays up so the reason can be read
                state.status, state.error = "failed", f"{type(error).__name__}: {error}"
                log.error("model not loaded: %s", state.error)

        loader = asyncio.create_task(load(), name="sanshi-model-loader")
        try:
            yield
        finally:
            loader.cancel()
            await state.batcher.stop()
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
                raise ApiError(422, "validation_error", "unknown query parameter (the server runs in strict mode)",
                               field=name or "query", kind="unknown_field")

    app = FastAPI(
        dependencies=[Depends(reject_unknown_query)] if settings.strict else None,
        title="sanshi-ml intake server",
        summary="三事分流 triage suggestions for 12345 hotline records, with confidence, for intake clerks",
        description="Suggests the category, the 三事 class (with its colour, handling mode and time limit), the "
                    "handling unit and the appeal type of a request, each with a calibrated confidence, the words "
                    "that drove it and whether a person must review it. Clerks' answers are stored for retraining.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    app.state.sanshi = state
    install_error_handlers(app)

    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="the server's key (SANSHI_API_KEY)")

    def require_key(key: Annotated[str | None, Security(key_header)] = None) -> None:
        expected = settings.api_key.get_secret_value() if settings.api_key else None
        if not expected:
            raise ApiError(401, "unauthorized", "this server has no API key configured (set SANSHI_API_KEY), so "
                           "keyed endpoints are closed", field=API_KEY_HEADER)
        if not key:
            raise ApiError(401, "unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header",
                           field=API_KEY_HEADER)
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

    @app.get("/health", response_model=Health, tags=["probes"], responses={"default": ERROR_RESPONSES["default"]})
    async def health() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @app.get("/ready", response_model=Readiness, tags=["probes"],
             responses={503: {"model": Readiness, "description": "the model is loading or failed to load"},
                        "default": ERROR_RESPONSES["default"]})
    async def ready() -> Response:
        """Readiness: 200 once the model is loaded and warmed up, 503 before (or if loading failed)."""
        if state.status == "ready":
            return json_response({"status": "ready", "model_version": state.suggester.version})
        return json_response({"status": state.status, "error": state.error}, status=503)

    # ------------------------------------------------------------------------------------------------ the model

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], responses=ERROR_RESPONSES)
    async def model() -> Response:
        """Name, version, targets and their labels, thresholds, training time, data hash, headline metrics."""
        state.require_model()
        return Response(state.model_info_bytes, media_type=JSON)

    @app.post("/v1/suggest", response_model=Suggestion, tags=["suggestions"], dependencies=suggest_guard,
              responses=suggest_responses)
    async def suggest(body: SuggestRequest, top_k: TopK = None) -> Response:
        """Suggestions for one request: per target the label, its confidence, the top-k labels, whether a person
        must review it, and the words that drove it; the 三事 class also carries its colour and handling."""
        state.require_model()
        [result] = await state.batcher.submit([(body.title, body.text)], top_k or settings.top_k)
        return json_response({"id": body.id, **result})

    @app.post("/v1/suggest/batch", response_model=BatchResponse, tags=["suggestions"], dependencies=suggest_guard,
              responses=suggest_responses)
    async def suggest_batch(body: BatchRequest, top_k: TopK = None) -> Response:
        """Suggestions for a batch of requests (up to the server's max_batch), in the order sent."""
        suggester = state.require_model()
        results = await state.batcher.submit([(r.title, r.text) for r in body.records], top_k or settings.top_k)
        suggestions = [{"id": record.id, **result} for record, result in zip(body.records, results)]
        return json_response({"model_version": suggester.version, "suggestions": suggestions})

    # --------------------------------------------------------------------------------------------------- feedback

    @app.post("/v1/feedback", response_model=FeedbackStored, status_code=201, tags=["feedback"],
              dependencies=keyed, responses=KEYED_RESPONSES)
    def feedback(body: FeedbackRequest) -> Response:
        """Store a clerk's accepted or corrected labels (personal data masked first)."""
        suggester = state.require_model()
        targets = set(suggester.targets)
        labels, suggested = as_mapping(body.labels), as_mapping(body.suggestion)
        for part, mapping in (("labels", labels), ("suggestion", suggested)):
            for target in mapping:
                if target not in targets:
                    raise ApiError(422, "validation_error", f"unknown target; this model has "
                                   f"{', '.join(suggester.targets)}", field=f"{part}.{target}", kind="unknown_target")
        row = state.store.add(FeedbackEntry(
            text=body.text, title=body.title, record_id=body.id, received_at=body.received_at,
            model_version=body.model_version, labels=labels, clerk=body.clerk,
            suggestion={t: as_mapping(item) for t, item in suggested.items()}))
        return json_response({"feedback_id": row.id, "stored_at": row.created_at.isoformat(),
                              "model_version": row.model_version, "corrected": row.corrected,
                              "accepted": sorted(set(row.labels) - set(row.corrected))}, status=201)

    @app.get("/v1/feedback/export", tags=["feedback"], dependencies=keyed,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "CSV with the model's training columns"}, **KEYED_RESPONSES})
    def export(since: Annotated[str | None, Query(description="only feedback stored at or after (RFC 3339)",
                                                  json_schema_extra=TIMESTAMP_SCHEMA)] = None,
               until: Annotated[str | None, Query(description="only feedback stored before (RFC 3339)",
                                                  json_schema_extra=TIMESTAMP_SCHEMA)] = None,
               model_version: Annotated[str | None, Query(max_length=64)] = None) -> StreamingResponse:
        """The stored answers as CSV with the serving model's training columns, ready for `sanshi-ml train`."""
        bounds = {}
        for name, value in (("since", since), ("until", until)):
            try:
                bounds[name] = optional_timestamp(value)
            except ValueError as error:
                raise ApiError(422, "validation_error", str(error), field=name, kind="datetime_parsing") from None
        suggester = state.require_model()
        layout = state.layout
        model = suggester.model

        def segment(text: str) -> str:
            return " ".join(model.segmenter.raw_cut(model.normalize(text)))

        rows = state.store.rows(since=bounds["since"], until=bounds["until"], model_version=model_version)
        return StreamingResponse(csv_chunks(layout, rows, segment if layout.segmented_col else None),
                                 media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": 'attachment; filename="feedback.csv"'})

    return app
