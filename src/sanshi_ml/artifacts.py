"""Saving and loading a model directory: ``model.joblib`` plus ``metadata.json``, checked before anything is built.

A joblib file is a pickle, and a pickle names the functions that rebuild it, so loading an arbitrary one runs code.
Every loader (:func:`load_model` for the CLI, evaluation, scoring, the server and the MLflow pyfunc model, and
:func:`model_from_bytes` for Dask workers) therefore goes through the same checks, in this order:

1. every file the metadata names is a plain file name inside the model directory (:func:`contained_file`);
2. the model file is read once into memory, and the sha256 compared with the metadata's is that of these bytes:
   the bytes that are hashed are the bytes that are unpickled, whatever happens to the file meanwhile;
3. with a model key configured (``SANSHI_MODEL_KEY_FILE`` or ``SANSHI_MODEL_KEY``), the metadata's HMAC-SHA256
   signature of that sha256 (and of the 责任清单's) must be the key's: an artifact written by someone without the
   key is refused, however consistent its sha256. Without a key, ``SANSHI_REQUIRE_SIGNED=1`` refuses every load;
   otherwise the artifact loads unchecked for authenticity, with a warning;
4. the pickle is read by an unpickler that can name only the classes and functions a sanshi-ml model is made of
   (:data:`TRUSTED_GLOBALS`): ``os.system``, ``builtins.eval`` or anything else is refused before it is called;
5. the object must be a :class:`TriageModel`, trained with this scikit-learn.

The 责任清单 recorded with the model is checked when it is read (:func:`recorded_policy`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath, PureWindowsPath

import joblib
from joblib.numpy_pickle import NumpyUnpickler

from sanshi_ml import __version__
from sanshi_ml.core.model import TriageModel
from sanshi_ml.data.outputs import atomic_file, atomic_write_bytes

log = logging.getLogger(__name__)

MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1  # unchanged by signatures and the restricted unpickler: older directories load as they are
TRACKED_LIBRARIES = ("scikit-learn", "numpy", "scipy", "pandas", "joblib", "rjieba", "jieba", "opencc")
# A pickle from another release of these may load wrongly or not at all.
STRICT_LIBRARIES = ("scikit-learn",)

KEY_ENV = "SANSHI_MODEL_KEY"
KEY_FILE_ENV = "SANSHI_MODEL_KEY_FILE"
REQUIRE_SIGNED_ENV = "SANSHI_REQUIRE_SIGNED"
MIN_KEY_BYTES = 16
SIGNATURE_ALGORITHM = "hmac-sha256"

# Everything a sanshi-ml model's pickle names, for every setting of TextConfig, FeaturesConfig and TrainConfig
# (each classifier and calibration method, the confidence map on and off, pre-segmented training), as recorded
# from models trained with each; tests/code/test_artifacts.py checks the estimators they use. A class added to the
# model must be added here, or its models are refused. An unpickler that can reach only these builds objects of
# these classes (state set by their own __setstate__) and calls these functions, none of which runs code it is
# handed. joblib 1.6+ routes the object arrays nested in its pickles (string labels) through the same check.
TRUSTED_GLOBALS = frozenset(
    {
        "functools.partial",  # the vectorisers' analyzers: partial(word_ngrams | char_ngrams, n_max=…)
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.float32",
        "numpy.float64",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",  # the same, as numpy < 2 names them
        "sanshi_ml.core.calibration.ConfidenceMap",
        "sanshi_ml.core.calibration.ConformalSets",
        "sanshi_ml.core.decoding.LinkedTargets",
        "sanshi_ml.core.features.char_ngrams",
        "sanshi_ml.core.features.word_ngrams",
        "sanshi_ml.core.model.TargetHead",
        "sanshi_ml.core.model.TriageModel",
        "sanshi_ml.core.model._PackedStrings",
        "sanshi_ml.core.text.Segmenter",
        "sklearn.calibration.CalibratedClassifierCV",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.calibration._TemperatureScaling",
        "sklearn.isotonic.IsotonicRegression",
        "sklearn.feature_extraction.text.TfidfTransformer",
        "sklearn.feature_extraction.text.TfidfVectorizer",
        "sklearn.pipeline.FeatureUnion",
        "sklearn.svm._classes.LinearSVC",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.linear_model._stochastic_gradient.SGDClassifier",
        "sklearn.linear_model._sgd_fast.ModifiedHuber",
    }
)


class ArtifactError(RuntimeError):
    """A model directory that is missing, incomplete, tampered with or from an incompatible setup."""


@dataclass
class LoadedModel:
    model: TriageModel
    metadata: dict
    path: Path

    @property
    def version(self) -> str:
        """Short id of this artifact: the first 12 hex digits of its sha256."""
        return self.metadata["artifact"]["sha256"][:12]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "sanshi-ml": __version__}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current commit (with '+dirty' if the tree has changes), or None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------------------- signatures


def model_key(model_dir: str | Path | None = None) -> bytes | None:
    """The signing key: the contents of the file ``$SANSHI_MODEL_KEY_FILE`` names, else ``$SANSHI_MODEL_KEY``;
    None when neither is set. A key kept inside the model directory would travel with what it vouches for, and
    is refused."""
    key_file, key_text = os.environ.get(KEY_FILE_ENV), os.environ.get(KEY_ENV)
    if key_file:
        path = Path(key_file)
        if model_dir is not None and path.resolve().is_relative_to(Path(model_dir).resolve()):
            raise ArtifactError(
                f"{KEY_FILE_ENV}={key_file} lies in the model directory it would vouch for; keep the key elsewhere"
            )
        try:
            key = path.read_bytes().strip()
        except OSError as error:
            raise ArtifactError(f"{KEY_FILE_ENV}={key_file}: cannot read the model key ({error.strerror})") from None
    elif key_text:
        key = key_text.strip().encode("utf-8")
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        source = KEY_FILE_ENV if key_file else KEY_ENV
        raise ArtifactError(
            f"{source}: the model key has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return key


def _key_id(key: bytes) -> str:
    """A name for a key that does not give it away, so a refusal can say "signed with another key"."""
    return hashlib.sha256(b"sanshi-ml model key id\n" + key).hexdigest()[:12]


def _signed_message(metadata: dict) -> bytes:
    """What a signature vouches for: the model file (by its sha256, name and size) and the 责任清单 it was trained
    with (by its sha256). Metadata written later (evaluation figures, the MLflow run) is not covered."""
    artifact = metadata.get("artifact") or {}
    content = {
        "artifact": {k: artifact.get(k) for k in ("file", "sha256", "bytes")},
        "policy_sha256": (metadata.get("policy") or {}).get("sha256"),
    }
    return b"sanshi-ml model signature v1\n" + json.dumps(content, sort_keys=True).encode("utf-8")


def signature(metadata: dict, key: bytes) -> dict:
    """The metadata's ``signature`` entry for ``key``."""
    return {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": _key_id(key),
        "value": hmac.new(key, _signed_message(metadata), hashlib.sha256).hexdigest(),
    }


def _require_signed() -> bool:
    return os.environ.get(REQUIRE_SIGNED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_WARNED_UNSIGNED: set[str] = set()  # one note per model directory and process
UNSIGNED_NOTE = (
    f"loaded without an authenticity check (no model key configured: set {KEY_FILE_ENV} or {KEY_ENV}, "
    f"and {REQUIRE_SIGNED_ENV}=1 to refuse unsigned models); its sha256 and the unpickler's allow-list "
    "still apply"
)


def check_signature(metadata: dict, model_dir: Path, require_signed: bool | None = None) -> None:
    """Refuse an artifact whose signature is not the configured key's (or, required, any artifact without one)."""
    key = model_key(model_dir)
    require = _require_signed() if require_signed is None else require_signed
    recorded = metadata.get("signature")
    if key is None:
        if require:
            raise ArtifactError(
                f"{model_dir}: signed models are required ({REQUIRE_SIGNED_ENV}) but no model key "
                f"is configured to check them; set {KEY_FILE_ENV} or {KEY_ENV}"
            )
        # The usual case on an analyst's machine, so not a warning on every command; the server, where a
        # planted model would matter most, warns at start-up (see `sanshi-ml serve`).
        if str(model_dir) not in _WARNED_UNSIGNED:
            _WARNED_UNSIGNED.add(str(model_dir))
            log.debug("%s: %s", model_dir, UNSIGNED_NOTE)
        return
    if not isinstance(recorded, dict) or recorded.get("algorithm") != SIGNATURE_ALGORITHM:
        raise ArtifactError(
            f"{model_dir}: the model is not signed, and a model key is configured; retrain it with "
            "the key set, or, if you know where it comes from, sign it: "
            f"`python -m sanshi_ml.artifacts sign {model_dir}`"
        )
    expected = signature(metadata, key)
    if not hmac.compare_digest(str(recorded.get("value", "")), expected["value"]):
        other = recorded.get("key_id") not in (None, expected["key_id"])
        raise ArtifactError(
            f"{model_dir}: signature check failed: "
            + (
                "the model was signed with another key (key id "
                f"{recorded.get('key_id')}, this one is {expected['key_id']})"
                if other
                else "the model file or the metadata was changed after the model was signed"
            )
            + ". Refusing to load it."
        )


def sign_model(model_dir: str | Path) -> dict:
    """Sign an existing model directory with the configured key, after checking its sha256 (and unpickling it
    through the allow-list, so nothing unknown is vouched for); returns the new metadata."""
    model_dir = Path(model_dir)
    key = model_key(model_dir)
    if key is None:
        raise ArtifactError(f"no model key configured: set {KEY_FILE_ENV} or {KEY_ENV}")
    metadata = read_metadata(model_dir)
    data = _read_artifact(model_dir, metadata)
    model_from_bytes(data, metadata["artifact"]["sha256"], source=str(model_dir))
    metadata["signature"] = signature(metadata, key)
    _write_metadata(model_dir, metadata)
    return metadata


# --------------------------------------------------------------------------------------------------- reading safely


# Where the classes and functions older pickles name live now: (module, name) as an older sanshi-ml pickled it ->
# (module, name) today. Every move of a pickled class adds its old name here, so older model files keep loading.
MOVED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (f"sanshi_ml.{old}", name): (f"sanshi_ml.core.{old}", name)
        for old, names in {
            "calibration": ("ConfidenceMap", "ConformalSets"),
            "decoding": ("LinkedTargets",),
            "features": ("char_ngrams", "word_ngrams"),
            "model": ("TargetHead", "TriageModel", "_PackedStrings"),
            "text": ("Segmenter",),
        }.items()
        for name in names
    },
}


def current_global(module: str, name: str) -> tuple[str, str]:
    """Where a class or function an older pickle names lives today (see :data:`MOVED_GLOBALS`)."""
    return MOVED_GLOBALS.get((module, name), (module, name))


class _AllowListUnpickler(NumpyUnpickler):
    """joblib's unpickler, able to name only :data:`TRUSTED_GLOBALS` (older names through :func:`current_global`)."""

    def find_class(self, module: str, name: str):
        module, name = current_global(module, name)
        if f"{module}.{name}" not in TRUSTED_GLOBALS:
            raise ArtifactError(
                f"the pickle names {module}.{name}, which a sanshi-ml model never holds; refusing "
                "to load it (unpickling it could run code)"
            )
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str):
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    with _validate_fileobject_and_memmap(io.BytesIO(data), source, None) as (fobj, _):
        return _AllowListUnpickler(source, fobj, ensure_native_byte_order=True).load()


def _check_sha256(data: bytes, expected: str, source: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ArtifactError(
            f"{source}: integrity check failed: sha256 is {actual[:16]}…, metadata expects "
            f"{str(expected)[:16]}…; the file was changed or does not belong to this metadata. "
            "Refusing to load it."
        )


def model_from_bytes(data: bytes, sha256: str, source: str = "model") -> TriageModel:
    """A TriageModel from the bytes of a model file, after checking them against ``sha256``: what the Dask
    workers unpickle through (:func:`load_model` checks the bytes it read the same way)."""
    _check_sha256(data, sha256, source)
    return _build(data, source)


def _build(data: bytes, source: str) -> TriageModel:
    """Unpickle checked bytes through the allow-list; the result must be a TriageModel."""
    try:
        model = _unpickle(data, source)
    except ArtifactError as error:
        raise ArtifactError(f"{source}: {error}") from None
    except Exception as error:
        raise ArtifactError(f"{source}: cannot be loaded: {error}") from error
    if not isinstance(model, TriageModel):
        raise ArtifactError(f"{source}: holds a {type(model).__name__}, not a sanshi-ml TriageModel")
    return model


def contained_file(model_dir: str | Path, name: object, what: str = "file") -> Path:
    """The path of a file the metadata names, which must be a plain file name: never an absolute path, a
    directory part or ``..``, so that a metadata file cannot point a loader outside its model directory."""
    model_dir = Path(model_dir)
    text = name if isinstance(name, str) else ""
    plain = (
        text
        and text not in (".", "..")
        and "\x00" not in text
        and len(PurePosixPath(text).parts) == 1
        and len(PureWindowsPath(text).parts) == 1
    )
    if not plain:
        raise ArtifactError(
            f"{model_dir / METADATA_FILE}: the {what} is given as {name!r}; only a file name inside "
            "the model directory is accepted. Refusing to load it."
        )
    return model_dir / text


def checked_file(model_dir: str | Path, record: dict, what: str = "file") -> Path:
    """A file the metadata lists beside the model (``{"file", "sha256"}``), inside the model directory and with the
    recorded sha256."""
    path = contained_file(model_dir, record.get("file"), what)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the model directory is incomplete (retrain it with `sanshi-ml train`)")
    if sha256_file(path) != record.get("sha256"):
        raise ArtifactError(
            f"{path}: integrity check failed (its sha256 differs from metadata.json); retrain the "
            "model or restore the file"
        )
    return path


def _read_artifact(model_dir: Path, metadata: dict) -> bytes:
    path = contained_file(model_dir, metadata["artifact"].get("file", MODEL_FILE), "model file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: model file missing") from None
    except OSError as error:
        raise ArtifactError(f"{path}: cannot be read ({error.strerror})") from None


# -------------------------------------------------------------------------------------------------- saving, loading


def _write_metadata(model_dir: Path, metadata: dict) -> None:
    atomic_write_bytes(
        model_dir / METADATA_FILE, json.dumps(metadata, ensure_ascii=False, indent=2, default=str).encode("utf-8")
    )


def save_model(model: TriageModel, model_dir: str | Path, extra: dict | None = None) -> dict:
    """Write the fitted model and its metadata (signed when a model key is configured); returns the metadata.

    ``extra`` carries what the caller knows: the data hash, the load report, metrics, params, the policy.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    key = model_key(model_dir)  # a key that cannot be used fails now, not after the model is written
    with atomic_file(model_dir / MODEL_FILE) as tmp:
        # lz4 at level 3: smaller than zlib level 3 and it decompresses several times faster (load 1.0 → 0.3 s
        # for a 500,000-feature model), which every scoring run and server start pays.
        joblib.dump(model, tmp, compress=("lz4", 3))
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    metadata = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": {"file": MODEL_FILE, "sha256": digest, "bytes": size},
        "git_commit": git_commit(),
        "libraries": library_versions(),
        "segmented_training": model.segmented_training,
        "targets": model.describe(),
        "text": model.text_config.model_dump(),
        "features": model.features_config.model_dump(),
        "train": model.train_config.model_dump(),
        **(extra or {}),
    }
    if key is not None:
        metadata["signature"] = signature(metadata, key)
    _write_metadata(model_dir, metadata)
    return metadata


def read_metadata(model_dir: str | Path) -> dict:
    """The metadata of a model directory, with an error naming what is missing or broken."""
    model_dir = Path(model_dir)
    meta_path = model_dir / METADATA_FILE
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model directory not found (train one with `sanshi-ml train`)")
    if not meta_path.exists():
        raise ArtifactError(f"{meta_path}: metadata missing; the directory is not a complete sanshi-ml model")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata["artifact"]["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{meta_path}: unreadable metadata ({error})") from None
    return metadata


def update_metadata(model_dir: str | Path, **fields) -> dict:
    """Add or replace top-level metadata fields (e.g. evaluation metrics) without touching the model file.

    A signature covers the model file and the 责任清单, not these fields, so it stays valid."""
    if {"artifact", "policy", "signature"} & set(fields):
        raise ValueError("update_metadata cannot change the artifact, the policy or the signature")
    metadata = read_metadata(model_dir)
    metadata.update(fields)
    _write_metadata(Path(model_dir), metadata)
    return metadata


def load_model(
    model_dir: str | Path, *, allow_version_mismatch: bool = False, require_signed: bool | None = None
) -> LoadedModel:
    """Load a model directory after the checks the module docstring lists (path, sha256 of the bytes read,
    signature, library versions), through the allow-list unpickler."""
    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    data = _read_artifact(model_dir, metadata)  # read once: these bytes are hashed, then unpickled
    model_path = model_dir / metadata["artifact"].get("file", MODEL_FILE)
    _check_sha256(data, metadata["artifact"]["sha256"], str(model_path))
    check_signature(metadata, model_dir, require_signed)
    current = library_versions()
    for name in STRICT_LIBRARIES:
        saved = metadata.get("libraries", {}).get(name)
        if saved and saved != current.get(name):
            message = (
                f"{model_dir}: trained with {name} {saved}, this environment has {current.get(name)}; "
                "retrain the model or install the same version"
            )
            if not allow_version_mismatch:
                raise ArtifactError(message)
            warnings.warn(message, stacklevel=2)
    model = _build(data, str(model_path))
    return LoadedModel(model=model, metadata=metadata, path=model_dir)


def recorded_policy(loaded: LoadedModel, policy_path: str | Path | None = None):
    """The 责任清单 to apply with a loaded model: the one recorded with it, refused if its file changed since
    training, or ``policy_path`` when the caller names one (logged when it is not the recorded one)."""
    from sanshi_ml.core.policy import load_policy

    recorded = loaded.metadata.get("policy") or {}
    targets = {
        "sanshi_target": recorded.get("sanshi_target", "sanshi"),
        "unit_target": recorded.get("unit_target", "unit"),
    }
    expected = recorded.get("sha256")
    if policy_path is not None:
        policy = load_policy(policy_path, **targets)
        if expected and policy.sha256 != expected:
            log.warning(
                "using the 责任清单 %s (sha256 %s…), not the one the model %s was trained with (%s, sha256 %s…)",
                policy_path,
                policy.sha256[:12],
                loaded.version,
                recorded.get("path") or "built-in",
                str(expected)[:12],
            )
        return policy
    policy = load_policy(recorded.get("path"), **targets)
    if expected and policy.sha256 != expected:
        where = recorded.get("path") or "the built-in 责任清单"
        message = (
            f"{where}: the 责任清单 changed since the model {loaded.version} was trained (sha256 "
            f"{policy.sha256[:12]}…, recorded {str(expected)[:12]}…)"
        )
        if recorded.get("path"):
            raise ArtifactError(
                f"{message}; restore it, retrain the model, or name the 责任清单 to use "
                "explicitly (--policy, policy_path)"
            )
        log.warning("%s; using the installed one", message)  # a sanshi-ml upgrade changed the built-in list
    return policy


def main(argv: list[str] | None = None) -> int:
    """``python -m sanshi_ml.artifacts sign|verify MODEL_DIR``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("sign", "verify"):
        print("usage: python -m sanshi_ml.artifacts sign|verify MODEL_DIR", file=sys.stderr)
        return 2
    try:
        if args[0] == "sign":
            metadata = sign_model(args[1])
            print(f"{args[1]}: signed with key {metadata['signature']['key_id']}")
        else:
            loaded = load_model(args[1])
            print(f"{args[1]}: model {loaded.version} passes every check")
    except ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
