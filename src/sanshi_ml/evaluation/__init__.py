"""Measuring a model: metrics, plots and the out-of-fold estimate."""
