"""Server settings, read from ``SANSHI_*`` environment variables.

Deployment choices (which model, which database, the API key, who may ask for suggestions) come from the environment
so that one image serves any model; the request limits default to ``params.yaml``'s ``serve`` section when the server is
started with :meth:`Settings.load` (as ``sanshi-ml serve`` does), so the CLI's ``predict`` and the server agree.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sanshi_ml.config import MAX_BATCH, MAX_TEXT_CHARS, TOP_K

ENV_PREFIX = "SANSHI_"
DEFAULT_DATABASE_URL = "sqlite:///feedback.db"


class Settings(BaseSettings):
    """Everything the server needs to start; every field can be set as ``SANSHI_<FIELD>``."""

    # Other SANSHI_* variables (SANSHI_REQUIRE_POSTGRES, SANSHI_SHARED_DATA, …) belong to the tests and the CLI.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    model_dir: Path | None = Field(None, description="a model directory written by `sanshi-ml train`")
    model_uri: str | None = Field(None, description="an MLflow registry URI, e.g. models:/sanshi-triage@champion")
    tracking_uri: str | None = Field(
        None, description="MLflow store holding the registry (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    policy_path: str | None = Field(
        None, description="a 三事分流责任清单 YAML; None uses the one recorded with the model"
    )
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL of the feedback store (sqlite:///file.db or postgresql://user@host/db)",
    )
    api_key: SecretStr | None = Field(
        None,
        description="key for feedback and export (header X-API-Key); unset means those endpoints refuse every request",
    )
    open_suggestions: bool = Field(True, description="suggestions need no key; False puts them behind the key too")
    strict: bool = Field(True, description="reject request fields the API does not know instead of ignoring them")
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1, description="longest text accepted, in characters")
    max_batch: int = Field(MAX_BATCH, ge=1, le=10_000, description="most records in one batch request")
    top_k: int = Field(TOP_K, ge=1, le=20, description="labels listed per target unless the request asks otherwise")
    max_body_bytes: int | None = Field(None, ge=1, description="largest request body; None: enough for a full batch")
    batch_records: int = Field(64, ge=1, description="most records the micro-batcher hands the model in one call")
    batch_chars: int = Field(
        64_000,
        ge=1,
        description="most characters the micro-batcher hands the model in one "
        "call; a larger batch request is cut into calls of this size, and single suggestions "
        "are answered between them",
    )
    inline_chars: int = Field(
        16_000,
        ge=0,
        description="a model call of at most this many characters (a few "
        "milliseconds) runs on the event loop; longer ones run in the model thread. 0: every "
        "call in the thread",
    )
    host: str = Field("127.0.0.1", description="the interface the server listens on (sanshi-ml serve --host)")
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Host header values the server answers (comma-separated; '*.example.org' matches "
        "subdomains, '*' any). Default: localhost, 127.0.0.1, [::1] and the bind host (for "
        "0.0.0.0 or ::, this machine's host name)",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a client has to send a whole request body; "
        "a slower one gets 408 and the connection is closed",
    )
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    limit_concurrency: int | None = Field(
        None,
        ge=1,
        description="most connections and tasks at once per worker; beyond it uvicorn answers 503 (default: no limit)",
    )
    store_check_seconds: float = Field(
        5.0,
        ge=0,
        description="how long /ready reuses a successful check of the "
        "feedback store (a write read back) before it checks again",
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if value is not None:
            value = [part for part in value if part]
            for pattern in value:
                if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                    raise ValueError(f"{pattern!r}: a wildcard host must look like '*.example.org' (or be '*')")
        return value or None

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
    def trusted_hosts(self) -> list[str]:
        """The Host header values answered: ``allowed_hosts``, or localhost and the bind host."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        hosts = ["localhost", "127.0.0.1", "[::1]"]
        if self.host in ("0.0.0.0", "::", ""):
            hosts.append(socket.gethostname())  # listening everywhere: the machine's own name; others need the setting
        else:
            hosts.append(f"[{self.host}]" if ":" in self.host else self.host)
        return list(dict.fromkeys(host.lower() for host in hosts))

    @property
    def model_source(self) -> str:
        """Where the model comes from, as shown by /v1/model."""
        return self.model_uri or str(self.model_dir)

    @classmethod
    def load(cls, params_file: str | Path | None = None, **explicit) -> Settings:
        """Explicit values, then ``SANSHI_*`` variables, then params.yaml's ``serve`` section, then defaults."""
        from sanshi_ml.config import load_params

        params = load_params(params_file)
        from_params = {
            name: value
            for name, value in params.serve.model_dump().items()
            if name in cls.model_fields and f"{ENV_PREFIX}{name.upper()}" not in os.environ
        }
        if params.policy.path and f"{ENV_PREFIX}POLICY_PATH" not in os.environ:
            from_params["policy_path"] = params.policy.path
        if params.tracking.uri and f"{ENV_PREFIX}TRACKING_URI" not in os.environ:
            from_params["tracking_uri"] = params.tracking.uri
        given = {name: value for name, value in explicit.items() if value is not None}
        model_chosen = {"model_dir", "model_uri"} & set(given) or any(
            f"{ENV_PREFIX}{name.upper()}" in os.environ for name in ("model_dir", "model_uri")
        )
        if not model_chosen:
            from_params["model_dir"] = params.train.model_dir  # the model `sanshi-ml train` writes by default
        return cls(**{**from_params, **given})
