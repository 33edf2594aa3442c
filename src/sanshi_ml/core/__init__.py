"""The model core: text, features, the triage model, calibration, decoding, the 责任清单."""
