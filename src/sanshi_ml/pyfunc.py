"""The MLflow pyfunc flavour of a sanshi-ml model: what ``mlflow.pyfunc.load_model`` gives for a logged model.

Kept apart from :mod:`sanshi_ml.tracking` so that MLflow's entry point (``resources/mlflow_pyfunc_model.py``, run when
a logged model is loaded) imports only this wrapper, not the tracking and registry code.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from sanshi_ml.artifacts import load_model

SANSHI_ARTIFACT = "sanshi_model"  # the pyfunc model's artifact: a sanshi-ml model directory


class SanshiTriageModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around a sanshi-ml model directory.

    The directory is loaded with :func:`sanshi_ml.artifacts.load_model`, so every check of a model directory
    applies (the sha256 of the bytes read, the signature when a model key is set, the allow-list unpickler), and
    answers go through :class:`sanshi_ml.suggest.Suggester`, like the CLI, the server and batch scoring. Input: a
    frame with ``text`` and an optional ``title``; output: Suggester.score_frame's columns.
    """

    def load_context(self, context) -> None:
        from sanshi_ml.suggest import Suggester

        self.suggester = Suggester.from_loaded(load_model(context.artifacts[SANSHI_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from sanshi_ml.data.records import model_input as input_string  # the argument's name is MLflow's

        frame = pd.DataFrame(model_input)
        if "text" not in frame:
            raise ValueError("input needs a 'text' column (and optionally 'title')")
        titles = frame["title"] if "title" in frame else [None] * len(frame)
        texts = [
            input_string(t if isinstance(t, str) else None, x if isinstance(x, str) else "")
            for t, x in zip(titles, frame["text"])
        ]
        return self.suggester.score_frame(texts)
