"""Request and response models of the HTTP API.

The request limits (text length, batch size) and strict mode are settings, and they belong in the OpenAPI schema so
that ``/docs`` and generated clients know them; the request models are therefore built per application by
:func:`build_request_models`. Response models are fixed and shared.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from sanshi_ml.suggest import STATUS_OK, text_status

TITLE_MAX_CHARS = 1_000
ID_MAX_CHARS = 128
LABEL_MAX_CHARS = 100
MAX_TARGETS = 32

EXAMPLE_TITLE = "小区电梯坏了一个多月没人修"
EXAMPLE_TEXT = "A3区青青家园小区5栋的电梯坏了一个多月，物业一直说在等配件，老人上下楼非常困难，请尽快督促维修。"

# What each text_status means, for the error message a client sees.
TEXT_PROBLEMS = {
    "empty_text": "text is empty or only whitespace",
    "not_text": "text must be a string",
    "too_long": "text is longer than {limit} characters",
    "undecodable": "text holds undecodable characters (U+FFFD or lone surrogates); send it as valid UTF-8",
}


class TextProblem(ValueError):
    """A text that cannot be scored; ``kind`` is the text_status code."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        super().__init__(TEXT_PROBLEMS[kind].format(limit=limit))


def check_text(value: str, max_chars: int) -> str:
    """The one rule for texts, shared with batch scoring through ``text_status``; lone surrogates count as
    undecodable because nothing downstream (OpenCC, the database, JSON encoders) can handle them."""
    status = text_status(value, max_chars)
    if status == STATUS_OK:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            status = "undecodable"
    if status != STATUS_OK:
        raise TextProblem(status, max_chars)
    return value


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))")
TIMESTAMP_SCHEMA = {"type": "string", "format": "date-time", "examples": ["2024-03-05T08:30:00+08:00"]}


def parse_timestamp(value: object) -> datetime:
    """An RFC 3339 date-time with its offset (``2024-03-05T08:30:00+08:00``, ``…Z``), as the schema says.

    Pydantic's own parsing would also take numbers as Unix times and bare dates, which the schema does not allow.
    """
    if isinstance(value, datetime):
        return value
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected an RFC 3339 date-time with its offset, e.g. 2024-03-05T08:30:00+08:00")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, zulu, sign, off_h, off_m = (
        match.group(7),
        match.group(8),
        match.group(9),
        match.group(10),
        match.group(11),
    )
    try:
        offset = UTC if zulu else timezone((1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m)))
        micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
        # RFC 3339 allows a leap second (:60); Python's datetime does not, so it becomes :59.999999.
        if second == 60:
            second, micro = 59, 999_999
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=offset)
    except ValueError as error:
        raise ValueError(f"not a valid date-time: {error}") from None


def optional_timestamp(value: object) -> datetime | None:
    return None if value is None else parse_timestamp(value)


Timestamp = Annotated[
    datetime | None,
    BeforeValidator(optional_timestamp),
    WithJsonSchema({"anyOf": [TIMESTAMP_SCHEMA, {"type": "null"}]}),
]


def check_optional_text(value: str | None) -> str | None:
    """Titles, ids and labels: may be empty, but must be encodable."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds lone surrogates; send it as valid UTF-8") from None
    return value


# Line breaks and other control characters (C0, DEL, C1, U+2028/U+2029): never part of an id, a model version, a clerk
# id or a label, and the way a forged log line or a broken CSV row starts.
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ONE_LINE_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$"


def check_one_line(value: str | None) -> str | None:
    """An identifier or a label: encodable, on one line, with no control characters."""
    check_optional_text(value)
    if value is not None and _CONTROL_CHARS.search(value):
        raise ValueError("holds a line break or another control character")
    return value


# ------------------------------------------------------------------------------------------------------- requests


# In the schema (so generated clients and schemathesis know the rule) but checked by the validators, which give the
# precise error (empty_text, undecodable) instead of a bare pattern mismatch: at least one non-space character, and
# no U+FFFD (the mark an earlier decoding failure leaves).
TEXT_PATTERN = "^[^\\uFFFD]*\\S[^\\uFFFD]*$"
# A label: at least one non-space character, on one line.
LABEL_PATTERN = (
    "^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]*[^\\s\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]"
    "[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$"
)


@dataclass(frozen=True)
class RequestModels:
    """The request models of one application (their limits come from its settings)."""

    SuggestRequest: type[BaseModel]
    BatchRequest: type[BaseModel]
    FeedbackRequest: type[BaseModel]
    SuggestedLabel: type[BaseModel]


def as_mapping(value: BaseModel | dict | None) -> dict:
    """Labels or suggestions as ``{target: value}``, whichever model carried them."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True)
    return dict(value)


def check_label(value: str | None) -> str | None:
    if value is not None:
        check_one_line(value)
        if not value.strip():
            raise ValueError("label is empty or only whitespace")
    return value


def build_request_models(
    max_text_chars: int, max_batch: int, strict: bool, targets: Sequence[str] | None = None
) -> RequestModels:
    """Request models with this server's limits; ``strict`` rejects unknown fields instead of ignoring them.

    With the model's ``targets`` known when the app is built (a model directory's metadata), the feedback labels are
    an object with one optional property per target, so the schema says which targets exist; otherwise (a registry
    model, downloaded later) they are a free mapping checked against the model once it is loaded.
    """
    extra = "forbid" if strict else "ignore"
    # Strict types: a number is not a text, ``true`` is not a confidence, "0.5" is not a number.
    config = ConfigDict(extra=extra, strict=True, str_max_length=max(max_text_chars, TITLE_MAX_CHARS))

    def text_field(description: str, example: str):
        return Field(
            min_length=1,
            max_length=max_text_chars,
            description=description,
            examples=[example],
            json_schema_extra={"pattern": TEXT_PATTERN},
        )

    class _Base(BaseModel):
        model_config = config

    class SuggestRequest(_Base):
        """One request as a clerk typed it."""

        model_config = ConfigDict(
            **config,
            json_schema_extra={"examples": [{"id": "D2024000123", "title": EXAMPLE_TITLE, "text": EXAMPLE_TEXT}]},
        )

        text: str = text_field(f"the request's text (诉求内容), 1 to {max_text_chars} characters", EXAMPLE_TEXT)
        title: str | None = Field(
            None, max_length=TITLE_MAX_CHARS, description="the request's title (标题)", examples=[EXAMPLE_TITLE]
        )
        id: str | None = Field(
            None,
            max_length=ID_MAX_CHARS,
            description="the record's id (工单编号), echoed back",
            examples=["D2024000123"],
            json_schema_extra={"pattern": ONE_LINE_PATTERN},
        )

        @field_validator("text")
        @classmethod
        def _text(cls, value: str) -> str:
            return check_text(value, max_text_chars)

        @field_validator("title")
        @classmethod
        def _encodable(cls, value: str | None) -> str | None:
            return check_optional_text(value)

        @field_validator("id")
        @classmethod
        def _one_line(cls, value: str | None) -> str | None:
            return check_one_line(value)

    class BatchRequest(_Base):
        """Several requests in one call, answered in the same order."""

        model_config = ConfigDict(
            **config,
            json_schema_extra={
                "examples": [
                    {
                        "records": [
                            {"id": "D1", "title": EXAMPLE_TITLE, "text": EXAMPLE_TEXT},
                            {"id": "D2", "text": "楼上邻居每天深夜拖动家具，噪音太大，沟通无果"},
                        ]
                    }
                ]
            },
        )

        records: list[SuggestRequest] = Field(
            min_length=1, max_length=max_batch, description=f"1 to {max_batch} records"
        )

    label_field = {"min_length": 1, "max_length": LABEL_MAX_CHARS, "json_schema_extra": {"pattern": LABEL_PATTERN}}

    class SuggestedLabel(_Base):
        label: str = Field(**label_field)
        confidence: float | None = Field(None, ge=0, le=1)

        @field_validator("label")
        @classmethod
        def _label(cls, value: str) -> str:
            return check_label(value)

    labels_type: Any
    suggestion_type: Any
    if targets:
        # Unknown targets are refused even in lenient mode: silently dropping a clerk's label would lose it.
        names = {f"target_{i}": target for i, target in enumerate(targets)}

        def _non_blank(cls, value: str | None) -> str | None:
            return check_label(value)

        def _at_least_one(self):
            if not self.model_dump(exclude_none=True):
                raise ValueError("give at least one target's label")
            return self

        labels_type = create_model(
            "Labels",
            __config__=ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1}),
            __doc__="The clerk's label per target; targets left out stay unlabelled.",
            __validators__={
                "non_blank": field_validator(*names)(classmethod(_non_blank)),
                "at_least_one": model_validator(mode="after")(_at_least_one),
            },
            **{field: (str, Field(None, alias=target, **label_field)) for field, target in names.items()},
        )
        suggestion_type = create_model(
            "SuggestedLabels",
            __config__=ConfigDict(extra="forbid", strict=True),
            __doc__="What the model suggested, per target (from /v1/suggest).",
            **{field: (SuggestedLabel, Field(None, alias=target)) for field, target in names.items()},
        )
        labels_field = Field(description="the clerk's final label per target; targets left out stay unlabelled")
        suggestion_field = Field(default=None, description="what the model suggested, per target")
    else:
        labels_type, suggestion_type = dict[str, str], dict[str, SuggestedLabel]
        labels_field = Field(
            min_length=1,
            max_length=MAX_TARGETS,
            description="the clerk's final label per target; targets left out stay unlabelled",
        )
        suggestion_field = Field(
            default_factory=dict,
            max_length=MAX_TARGETS,
            description="what the model suggested, per target (from /v1/suggest)",
        )

    class FeedbackRequest(_Base):
        """The clerk's answer to a suggestion: the labels accepted or corrected, with the request they belong to."""

        model_config = ConfigDict(
            **config,
            json_schema_extra={
                "examples": [
                    {
                        "id": "D2024000123",
                        "title": EXAMPLE_TITLE,
                        "text": EXAMPLE_TEXT,
                        "model_version": "0a1b2c3d4e5f",
                        "suggestion": {
                            "category": {"label": "城乡建设", "confidence": 0.91},
                            "sanshi": {"label": "共事", "confidence": 0.88},
                        },
                        "labels": {
                            "category": "城乡建设",
                            "sanshi": "共事",
                            "unit": "住房和城乡建设局",
                            "appeal": "投诉",
                        },
                        "clerk": "clerk-07",
                    }
                ]
            },
        )

        text: str = text_field("the request's text, as it was suggested on", EXAMPLE_TEXT)
        title: str | None = Field(None, max_length=TITLE_MAX_CHARS, examples=[EXAMPLE_TITLE])
        id: str | None = Field(
            None,
            max_length=ID_MAX_CHARS,
            description="the record's id (工单编号)",
            json_schema_extra={"pattern": ONE_LINE_PATTERN},
        )
        received_at: Timestamp = Field(
            None,
            description="when the request was received (受理时间), RFC 3339 with "
            "offset; stored as that wall-clock time. Default: now",
        )
        model_version: str = Field(
            min_length=1,
            max_length=64,
            description="model_version of the suggestion",
            json_schema_extra={"pattern": ONE_LINE_PATTERN},
        )
        suggestion: suggestion_type = suggestion_field
        labels: labels_type = labels_field
        clerk: str | None = Field(
            None,
            max_length=64,
            description="who answered (an id, not a name)",
            json_schema_extra={"pattern": ONE_LINE_PATTERN},
        )

        @field_validator("text")
        @classmethod
        def _text(cls, value: str) -> str:
            return check_text(value, max_text_chars)

        @field_validator("labels", mode="after")
        @classmethod
        def _labels(cls, value):
            if isinstance(value, dict):
                for target, label in value.items():
                    check_one_line(target)
                    if label is not None:
                        check_one_line(label)
                    if label is not None and not label.strip():
                        raise ValueError(f"label for '{target}' is empty")
                    if len(label) > LABEL_MAX_CHARS:
                        raise ValueError(f"label for '{target}' is longer than {LABEL_MAX_CHARS} characters")
            return value

        @field_validator("title")
        @classmethod
        def _encodable(cls, value: str | None) -> str | None:
            return check_optional_text(value)

        @field_validator("id", "model_version", "clerk")
        @classmethod
        def _one_line(cls, value: str | None) -> str | None:
            return check_one_line(value)

    for model in (SuggestRequest, BatchRequest, SuggestedLabel, FeedbackRequest):
        model.model_rebuild()
    return RequestModels(SuggestRequest, BatchRequest, FeedbackRequest, SuggestedLabel)


# ------------------------------------------------------------------------------------------------------ responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelProbability(_Out):
    label: str
    probability: float = Field(ge=0, le=1)


class SanshiInfo(_Out):
    """The 三事 class's handling, from the 三事分流责任清单."""

    colour: str = Field(examples=["orange"])
    colour_hex: str = Field(examples=["#f08c00"])
    handling_mode: str = Field(examples=["议事会 一事一议"])
    handled_by: str
    time_limit_days: int


class FieldSuggestion(_Out):
    label: str = Field(description="the suggested label", examples=["共事"])
    confidence: float = Field(
        ge=0,
        le=1,
        description="calibrated chance that the suggested label is right: its "
        "probability through the target's top-label calibration",
    )
    threshold: float = Field(description="confidence below which a person must review (above 1: always)")
    needs_review: bool
    review_reasons: list[Literal["low_confidence", "ambiguous", "policy_conflict"]] = Field(
        description="low_confidence: below the threshold; ambiguous: the prediction set is not just the label (several "
        "or none are plausible); policy_conflict: the 三事 class and the unit contradict the 责任清单"
    )
    top_k: list[LabelProbability] = Field(
        description="the most probable labels with the model's calibrated "
        "probability of each (the suggested label's can differ from "
        "its confidence, which is calibrated as a top label)"
    )
    plausible: list[str] | None = Field(
        None,
        description="the conformal prediction set, most probable first: the "
        "labels that hold the true one for the model's set level "
        "(90% by default) of requests; null for a model without "
        "sets",
    )
    reasons: list[str] = Field(description="the words that pushed most towards the label")
    sanshi: SanshiInfo | None = Field(None, description="only on the 三事 target")


class Suggestion(_Out):
    id: str | None = Field(None, description="the record's id, as sent")
    model_version: str
    needs_review: bool = Field(description="true if any field needs review")
    policy_conflict: bool = Field(description="the 三事 class and the unit contradict the 责任清单")
    fields: dict[str, FieldSuggestion] = Field(description="one suggestion per target")


class BatchResponse(_Out):
    model_version: str
    suggestions: list[Suggestion]


class TargetInfo(_Out):
    column: str | None = Field(description="the data column holding this target (e.g. 一级分类)")
    labels: list[str]
    threshold: float
    n_train: int
    metrics: dict[str, float | None] = Field(default_factory=dict)


class ModelInfo(_Out):
    name: str
    version: str = Field(description="first 12 hex digits of the artifact's sha256")
    source: str
    created_at: str | None
    git_commit: str | None
    data_sha256: str | None
    n_train: int | None
    metrics_source: str | None = Field(
        description="where the targets' metrics come from: out_of_fold (the saved "
        "model's out-of-fold estimate), or held_out_split for a model "
        "saved before models trained on every row"
    )
    targets: dict[str, TargetInfo]
    sanshi_target: str | None
    sanshi_classes: dict[str, SanshiInfo]
    policy: dict[str, Any]
    columns: dict[str, Any]
    limits: dict[str, int]


class FeedbackStored(_Out):
    feedback_id: int
    stored_at: datetime
    model_version: str
    accepted: list[str] = Field(description="targets where the clerk kept the suggested label")
    corrected: list[str] = Field(description="targets where the clerk chose another label")


class Health(_Out):
    status: Literal["ok"]


class StoreState(_Out):
    status: Literal["ok", "deleted", "read_only", "full", "unreachable", "unavailable"] = Field(
        description="ok, or why the feedback store cannot take a write now"
    )
    message: str | None = None


class Readiness(_Out):
    status: Literal["ready", "loading", "failed", "store_unavailable"] = Field(
        description="ready: the model is loaded and the feedback store took a write and gave it back; loading or "
        "failed: the model; store_unavailable: the model is ready but the store is not (see store)"
    )
    model_version: str | None = None
    error: str | None = None
    store: StoreState | None = None


class ErrorItem(_Out):
    field: str = Field(description="where the problem is: 'text', 'records.3.text', 'body', 'X-API-Key', …")
    type: str
    message: str


class ErrorBody(_Out):
    error: str = Field(description="a short code: validation_error, invalid_json, unauthorized, not_ready, …")
    message: str
    detail: list[ErrorItem] = Field(default_factory=list, description="the first problems found (at most 10)")
    total: int = Field(description="how many problems were found in all; detail lists the first of them")
