"""sanshi-ml: triage suggestions with confidence for 12345 hotline records."""

from pathlib import Path

__version__ = "0.1.0"


def resource(name: str) -> Path:
    """A file shipped in the package's ``resources/`` (the 责任清单, word lists, the MLflow entry point)."""
    return Path(__file__).with_name("resources") / name
