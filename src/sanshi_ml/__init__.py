"""sanshi-ml: triage suggestions with confidence for 12345 hotline records."""

__version__ = "0.1.0"
