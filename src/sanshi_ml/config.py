"""Typed parameters, one section per pipeline stage, read from ``params.yaml``.

Every section forbids unknown keys, so a misspelled parameter fails loudly instead of being ignored.
Nothing here touches the file system at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS_FILE = "params.yaml"

# The limits every entry point shares: params.yaml's score and serve sections, the server's settings, and batch
# scoring called from Python all default to these.
MAX_TEXT_CHARS = 20_000  # longest text accepted, in characters
MAX_BATCH = 256  # most records in one batch request to the server
TOP_K = 3  # labels listed per target

DEFAULT_TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


class ConfigError(ValueError):
    """A parameter file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Section):
    """How the columns of an export map onto the record schema."""

    id_col: str | None = Field(None, description="record id column; None recognises 留言编号, 工单编号, id, …")
    text_cols: list[str] = Field(
        default_factory=lambda: ["标题", "诉求内容"],
        description="title first (if more than one), then the text; joined in order",
    )
    time_col: str | None = Field(None, description="received-time column; None recognises 留言时间, 受理时间, …")
    segmented_col: str | None = Field(None, description="pre-segmented text (tokens joined by spaces)")
    targets: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS), description="target name -> label column"
    )

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one target is needed (name: column)")
        return value


class DataConfig(_Section):
    path: str = "data/demo/records.csv"
    encoding: str | None = Field(
        None,
        description=(
            "text encoding of CSV exports; None: the byte-order mark, else detected (GB18030/GBK, UTF-8, UTF-16, Big5)"
        ),
    )
    sheet: str | int | None = Field(None, description="Excel: a sheet's name or 1-based position; None: the first")
    header_row: int | None = Field(
        None,
        ge=1,
        description=("1-based row of the column names (CSV and Excel); None: the first row holding the needed columns"),
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        import codecs

        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}; e.g. gb18030, utf-8, utf-16, big5") from None
        return value

    @field_validator("sheet")
    @classmethod
    def _sheet_position_from_one(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("a sheet's position counts from 1 (the first sheet)")
        return value


class SplitConfig(_Section):
    """An optional untouched holdout. The saved model always trains on every row; its figures are the out-of-fold
    estimate, and with a holdout also those of a model fitted without the holdout rows. Duplicates stay on one
    side."""

    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "share of rows set aside before training and measured by a model fitted on the rest; the saved model is "
            "then refitted on all rows. 0: no holdout"
        ),
    )
    seed: int = 42
    stratify_target: str | None = Field(None, description="target to stratify on; None = the first target")

    @model_validator(mode="before")
    @classmethod
    def _test_size_became_holdout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "test_size" in data:
            raise ValueError(
                "split.test_size is gone: the saved model now trains on every row. For an untouched "
                "holdout measured before the refit, set split.holdout (e.g. 0.2); remove test_size"
            )
        return data


class PrepareConfig(_Section):
    out_dir: str = "data/prepared"


class TextConfig(_Section):
    backend: Literal["rjieba", "jieba"] = "rjieba"
    user_dict: str | None = Field("builtin", description="'builtin', a path, or None")
    stopwords: str | None = Field("builtin", description="'builtin', a path (one word a line), or None")
    to_simplified: bool = True
    mask_pii: bool = True
    lowercase: bool = True


class FeaturesConfig(_Section):
    word_ngram_max: int = Field(2, ge=1, le=3)
    char_ngram_max: int = Field(2, ge=0, le=3, description="character n-grams inside each word; 0 turns them off")
    sublinear_tf: bool = True
    min_df: int = Field(1, ge=1)
    max_features: int | None = Field(None, ge=1)
    title_weight: float = Field(
        0.5,
        ge=0,
        le=5,
        description=(
            "weight of a second word and character block built from the title alone (titles name the matter in a "
            "few words); 0 turns it off. Data without titles (a pre-segmented column) never gets the block"
        ),
    )


class TrainConfig(_Section):
    model_dir: str = "models/demo"
    classifier: Literal["linear_svc", "logistic_regression", "sgd_modified_huber"] = Field(
        "linear_svc", description="the linear model of every head (each calibrated the same way)"
    )
    C: float = Field(0.7, gt=0)
    class_weight: Literal["balanced"] | None = "balanced"
    linked_targets: list[tuple[str, str]] = Field(
        default_factory=lambda: [("category", "subcategory"), ("sanshi", "unit")],
        description="pairs of targets decoded jointly: the pair of labels seen together in training with the "
        "highest product of probabilities (pairs naming a target the data lacks are skipped)",
    )
    calibration: Literal["sigmoid", "isotonic", "temperature"] = "sigmoid"
    calibration_cv: int = Field(
        5,
        ge=2,
        description=(
            "cross-fitting folds (repeated texts kept together): their out-of-fold predictions calibrate the final "
            "model and choose the temperature, prior correction, confidence map, review threshold and prediction sets; "
            "fewer when a label has fewer rows"
        ),
    )
    min_label_rows: int = Field(3, ge=2, description="labels with fewer training rows are left out (and reported)")
    target_accuracy: float = Field(0.95, gt=0, le=1, description="accuracy of predictions accepted without review")
    target_accuracy_by_target: dict[str, float] = Field(default_factory=dict)
    prior_correction: list[float] = Field(
        default_factory=lambda: [0.0],
        description="strengths tau of the prior correction tried on the out-of-fold predictions: the label chosen "
        "is the argmax of p(label) / prior(label)^tau, tau maximising the hold-out macro-F1 (probabilities "
        "and confidences stay calibrated); [0] turns it off",
    )
    prior_correction_by_target: dict[str, list[float]] = Field(
        default_factory=lambda: {"sanshi": [0.0, 0.25, 0.5, 0.75, 1.0]},
        description="per-target strengths, instead of prior_correction; by default only 三事, whose rare 共事 and 家事 "
        "are what triage is for (on other targets it can over-correct toward rare labels)",
    )
    recalibrate: Literal["none", "temperature"] = Field(
        "temperature",
        description="a second step on the calibrated probabilities: one temperature per target, fitted "
        "on the out-of-fold predictions; it never changes the predicted label",
    )
    confidence_calibration: Literal["none", "isotonic"] = Field(
        "isotonic",
        description="a last step on the confidence, the chosen label's probability: a monotone map to "
        "the chance that the label is right (top-label calibration), fitted on the "
        "out-of-fold predictions; it keeps the confidence ranking and never changes a label",
    )
    conformal_level: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="share of records whose conformal prediction set "
        "holds the true label; calibrated on the "
        "out-of-fold predictions",
    )
    n_jobs: int = Field(-1, description="parallel cross-fitting folds; -1 uses every core")
    reason_terms: int = Field(5, ge=0, le=50)

    @model_validator(mode="before")
    @classmethod
    def _older_settings_load(cls, data: Any) -> Any:
        # Settings written before `recalibrate` existed (a model's pickled config, its metadata) keep loading.
        if isinstance(data, dict) and data.get("calibration") == "isotonic" and "recalibrate" not in data:
            data = {**data, "recalibrate": "none"}
        # Before cross-fitting, one hold-out of this share chose the thresholds; its settings still load.
        if isinstance(data, dict) and "threshold_holdout" in data:
            data = {key: value for key, value in data.items() if key != "threshold_holdout"}
        return data

    @model_validator(mode="after")
    def _prior_correction_is_a_list_of_strengths(self) -> TrainConfig:
        for name, strengths in {"": self.prior_correction, **self.prior_correction_by_target}.items():
            if not strengths or any(not 0 <= tau <= 2 for tau in strengths):
                where = f"prior_correction_by_target.{name}" if name else "prior_correction"
                raise ValueError(f"{where}: give one or more strengths between 0 and 2, e.g. [0, 0.5, 1]")
        return self

    @model_validator(mode="after")
    def _links_join_two_targets(self) -> TrainConfig:
        for first, second in self.linked_targets:
            if first == second:
                raise ValueError(f"linked_targets: {first!r} cannot be linked to itself")
        return self

    @model_validator(mode="after")
    def _recalibration_needs_smooth_probabilities(self) -> TrainConfig:
        if self.recalibrate == "temperature" and self.calibration == "isotonic":
            # Isotonic calibration puts exact zeros and ones in the probabilities; a temperature on their logarithms
            # is meaningless there (measured: ECE 0.02 -> 0.16 on fj2).
            raise ValueError(
                "recalibrate 'temperature' cannot follow calibration 'isotonic'; set train.recalibrate to 'none'"
            )
        return self


class TuneConfig(_Section):
    target: str | None = Field(
        None, description="the target whose cross-validated macro-F1 ranks the settings; None: the first target"
    )
    cv: int = Field(3, ge=2, description="cross-validation folds per setting (duplicates kept together)")
    n_trials: int = Field(12, ge=1, description="settings tried; a smaller space is searched exhaustively")
    seed: int = 0
    space: dict[str, list[Any]] = Field(default_factory=dict, description="dotted parameter -> values to try")


class EvaluateConfig(_Section):
    out_dir: str = "reports/demo"
    cv: int = Field(0, ge=0, description="also K-fold cross-validation of the model's configuration; 0: none")
    reliability_bins: int = Field(10, ge=2, le=50)


class PolicyConfig(_Section):
    path: str | None = Field(None, description="a 三事分流责任清单 YAML; None uses the built-in default")
    sanshi_target: str = "sanshi"
    unit_target: str = "unit"
    review_rule: Literal["threshold", "set", "both"] = Field(
        "threshold",
        description="what sends a field to review: its confidence below the threshold, its conformal "
        "prediction set not holding exactly one label, or either",
    )


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "sanshi-ml"
    registered_model: str = "sanshi-triage"
    alias: str = "champion"


class ScoreConfig(_Section):
    chunk_size: int = Field(10_000, ge=1, description="records per chunk: the unit of parallel work and of resume")
    jobs: int = Field(0, ge=0, description="worker processes; 0 = every core")
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1)


class ReportConfig(_Section):
    top_units: int = Field(15, ge=1)


class ServeConfig(_Section):
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1)
    max_batch: int = Field(MAX_BATCH, ge=1)
    top_k: int = Field(TOP_K, ge=1, le=20)


class Params(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif isinstance(item.get("input"), dict):  # a rule across a section's keys: the message names them
            lines.append(f"{source}: {key}: {item['msg']}")
        else:
            lines.append(f"{source}: {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a raw mapping into :class:`Params`, naming every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_params(path: str | Path | None = None) -> Params:
    """Read ``params.yaml`` (or ``path``); a missing default file means built-in defaults."""
    if path is None:
        candidate = Path(DEFAULT_PARAMS_FILE)
        if not candidate.exists():
            return Params()
        path = candidate
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """Return a copy of ``params`` with dotted keys (``train.C``) replaced; unknown keys are rejected."""
    raw = params.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(raw, "command-line options")
