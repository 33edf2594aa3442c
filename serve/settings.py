"""Server settings, read from ``SANSHI_*`` environment variables.

Deployment choices (which model, which database, the API key, who may ask for suggestions) come from the environment
so that one image serves any model; the request limits default to ``params.yaml``'s ``serve`` section when the server is
started with :meth:`Settings.load` (as ``sanshi-ml serve`` does), so the CLI's ``predict`` and the server agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SANSHI_"
DEFAULT_DATABASE_URL = "sqlite:///feedback.db"


class Settings(BaseSettings):
    """Everything the server needs to start; every field can be set as ``SANSHI_<FIELD>``."""

    # Other SANSHI_* variables (SANSHI_REQUIRE_POSTGRES, SANSHI_SHARED_DATA, …) belong to the tests and the CLI.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    model_dir: Path | None = Field(None, description="a model directory written by `sanshi-ml train`")
    model_uri: str | None = Field(None, description="an MLflow registry URI, e.g. models:/sanshi-triage@champion")
    tracking_uri: str | None = Field(None, description="MLflow store holding the registry (default: "
                                     "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    policy_path: str | None = Field(None, description="a 三事分流责任清单 YAML; None uses the one recorded with the model")
    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the feedback store "
                              "(sqlite:///file.db or postgresql://user@host/db)")
    api_key: SecretStr | None = Field(None, description="key for feedback and export (header X-API-Key); "
                                      "unset means those endpoints refuse every request")
    open_suggestions: bool = Field(True, description="suggestions need no key; False puts them behind the key too")
    strict: bool = Field(True, description="reject request fields the API does not know instead of ignoring them")
    max_text_chars: int = Field(20_000, ge=1, description="longest text accepted, in characters")
    max_batch: int = Field(256, ge=1, le=10_000, description="most records in one batch request")
    top_k: int = Field(3, ge=1, le=20, description="labels listed per target unless the request asks otherwise")
    max_body_bytes: int | None = Field(None, ge=1, description="largest request body; None: enough for a full batch")
    batch_records: int = Field(64, ge=1, description="most records the micro-batcher hands the model in one call")

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if self.model_dir is not None and self.model_uri is not None:
            raise ValueError("give either model_dir (SANSHI_MODEL_DIR) or model_uri (SANSHI_MODEL_URI), not both")
        return self

    @property
    def body_limit(self) -> int:
        """Bytes a full batch of maximal texts can take as JSON (a character escaped as \\uXXXX is 6 bytes)."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(1 << 20, self.max_batch * (self.max_text_chars + 1_000) * 6)

    @property
    def model_source(self) -> str:
        """Where the model comes from, as shown by /v1/model."""
        return self.model_uri or str(self.model_dir)

    @classmethod
    def load(cls, params_file: str | Path | None = None, **explicit) -> Settings:
        """Explicit values, then ``SANSHI_*`` variables, then params.yaml's ``serve`` section, then defaults."""
        from sanshi_ml.config import load_params

        params = load_params(params_file)
        from_params = {name: value for name, value in params.serve.model_dump().items()
                       if name in cls.model_fields and f"{ENV_PREFIX}{name.upper()}" not in os.environ}
        if params.policy.path and f"{ENV_PREFIX}POLICY_PATH" not in os.environ:
            from_params["policy_path"] = params.policy.path
        if params.tracking.uri and f"{ENV_PREFIX}TRACKING_URI" not in os.environ:
            from_params["tracking_uri"] = params.tracking.uri
        given = {name: value for name, value in explicit.items() if value is not None}
        model_chosen = {"model_dir", "model_uri"} & set(given) or any(
            f"{ENV_PREFIX}{name.upper()}" in os.environ for name in ("model_dir", "model_uri"))
        if not model_chosen:
            from_params["model_dir"] = params.train.model_dir  # the model `sanshi-ml train` writes by default
        return cls(**{**from_params, **given})
