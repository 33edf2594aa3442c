"""Suggestions: the model's predictions with the triage policy applied.

This is the one place where probabilities become what a clerk or an archive sees: chosen label, confidence,
``needs_review``, top-k, the conformal prediction set (``plausible``), reason terms, and the 三事 class's colour,
handling mode and time limit. The CLI's ``predict``, the server and batch scoring all call it, so one record gets the
same answer everywhere.

What sends a field to review is ``policy.review_rule`` (recorded with the model): ``threshold`` (its confidence is
below the target's review threshold), ``set`` (its prediction set is not exactly the suggested label: several are
plausible, or none is) or ``both`` (either); a policy conflict always does, for the 三事 and unit fields. A model
trained before prediction sets existed has none, and falls back to the threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sanshi_ml.artifacts import LoadedModel
from sanshi_ml.core.model import TargetPredictions, TriageModel
from sanshi_ml.core.policy import TriagePolicy
from sanshi_ml.data.records import model_input

log = logging.getLogger(__name__)

STATUS_OK = "ok"
REVIEW_LOW_CONFIDENCE = "low_confidence"
REVIEW_POLICY_CONFLICT = "policy_conflict"
REVIEW_AMBIGUOUS = "ambiguous"  # the prediction set holds several labels, or none
REVIEW_RULES = ("threshold", "set", "both")


def text_status(value: object, max_chars: int) -> str:
    """Why a cell cannot be scored, or ``ok``: ``empty_text``, ``not_text``, ``too_long`` or ``undecodable``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "empty_text"
    if not isinstance(value, str):
        return "not_text"
    if not value.strip():
        return "empty_text"
    if len(value) > max_chars:
        return "too_long"
    if "\ufffd" in value:
        return "undecodable"
    return STATUS_OK


@dataclass
class Batch:
    """Predictions for a batch, with the policy's verdicts."""

    predictions: dict[str, TargetPredictions]
    policy_conflict: np.ndarray
    policy_targets: frozenset[str] = frozenset()  # the targets a policy conflict sends to review
    review_rule: str = "threshold"

    def low_confidence(self, target: str) -> np.ndarray | None:
        """Rows whose confidence is below the threshold, if the rule (or a model without sets) looks at it."""
        pred = self.predictions[target]
        if self.review_rule == "set" and pred.conformal is not None:
            return None
        return pred.needs_review

    def ambiguous(self, target: str, plausible: np.ndarray | None = None) -> np.ndarray | None:
        """Rows whose prediction set is not exactly the suggested label (several labels or none are plausible, or
        joint decoding chose a label outside the set), if the rule looks at sets and the model has them
        (``plausible``: the target's set matrix, if already computed)."""
        pred = self.predictions[target]
        if self.review_rule == "threshold" or pred.conformal is None:
            return None
        plausible = pred.plausible if plausible is None else plausible
        return (plausible.sum(axis=1) != 1) | ~plausible[np.arange(len(plausible)), pred.index]

    def needs_review(self, target: str) -> np.ndarray:
        flags = [f for f in (self.low_confidence(target), self.ambiguous(target)) if f is not None]
        flagged = flags[0] | flags[1] if len(flags) == 2 else flags[0]
        return flagged | self.policy_conflict if target in self.policy_targets else flagged


class Suggester:
    """A loaded model plus a 责任清单: turns texts into suggestions."""

    def __init__(
        self,
        model: TriageModel,
        policy: TriagePolicy,
        version: str = "unversioned",
        metadata: dict | None = None,
        review_rule: str | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.version = version
        self.metadata = metadata or {}
        self.sanshi_target = policy.sanshi_target if policy.sanshi_target in model.heads else None
        self.unit_target = policy.unit_target if policy.unit_target in model.heads else None
        # The rule recorded with the model (policy.review_rule at training) unless one is given.
        self.review_rule = review_rule or (self.metadata.get("policy") or {}).get("review_rule") or "threshold"
        if self.review_rule not in REVIEW_RULES:
            raise ValueError(f"review_rule must be one of {', '.join(REVIEW_RULES)}; got {self.review_rule!r}")
        without_sets = [name for name, head in model.heads.items() if getattr(head, "conformal", None) is None]
        if self.review_rule != "threshold" and without_sets:
            log.warning(
                "review rule %r: targets %s have no prediction sets (model trained before them); their "
                "review follows the confidence threshold",
                self.review_rule,
                without_sets,
            )

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, policy_path: str | None = None) -> Suggester:
        """Use the policy recorded with the model (refused if its file changed since training) unless another file
        is given (:func:`sanshi_ml.artifacts.recorded_policy`)."""
        from sanshi_ml.artifacts import recorded_policy

        return cls(loaded.model, recorded_policy(loaded, policy_path), loaded.version, loaded.metadata)

    @property
    def targets(self) -> list[str]:
        return self.model.targets

    def predict(self, texts: Sequence[str]) -> tuple[Batch, object]:
        """Predictions and policy conflicts for raw model texts; also returns the feature matrix."""
        predictions, X = self.model.predict(texts)
        if self.sanshi_target and self.unit_target:
            conflict = self.policy.contradictions(
                predictions[self.sanshi_target].labels, predictions[self.unit_target].labels
            )
        else:
            conflict = np.zeros(len(texts), dtype=bool)
        bound = frozenset(t for t in (self.sanshi_target, self.unit_target) if t)
        return Batch(predictions, conflict, bound, self.review_rule), X

    # ------------------------------------------------------------------------------------------------ one by one

    def suggest(self, records: Sequence[tuple[str | None, str]], top_k: int = 3, explain: bool = True) -> list[dict]:
        """Full suggestions for (title, text) pairs: everything a clerk's screen shows."""
        texts = [model_input(title, text) for title, text in records]
        batch, X = self.predict(texts)
        reasons = {
            t: self.model.reason_terms(X, t, batch.predictions[t].index) if explain else None for t in self.targets
        }
        plausible = {t: batch.predictions[t].plausible for t in self.targets}
        low = {t: batch.low_confidence(t) for t in self.targets}
        ambiguous = {t: batch.ambiguous(t, plausible[t]) for t in self.targets}
        out = []
        for row in range(len(texts)):
            fields = {}
            for target in self.targets:
                pred = batch.predictions[target]
                confidence = float(pred.confidence[row])
                review_reasons = []
                if low[target] is not None and low[target][row]:
                    review_reasons.append(REVIEW_LOW_CONFIDENCE)
                if ambiguous[target] is not None and ambiguous[target][row]:
                    review_reasons.append(REVIEW_AMBIGUOUS)
                if batch.policy_conflict[row] and target in batch.policy_targets:
                    review_reasons.append(REVIEW_POLICY_CONFLICT)
                item = {
                    "label": str(pred.labels[row]),
                    "confidence": confidence,
                    "threshold": pred.threshold,
                    "needs_review": bool(review_reasons),
                    "review_reasons": review_reasons,
                    "top_k": [{"label": label, "probability": p} for label, p in pred.top_k(row, top_k)],
                    "plausible": pred.plausible_labels(row, plausible[target]),
                    "reasons": reasons[target][row] if reasons[target] is not None else [],
                }
                if target == self.sanshi_target:
                    item["sanshi"] = self.sanshi_fields(item["label"])
                fields[target] = item
            out.append(
                {
                    "fields": fields,
                    "needs_review": any(f["needs_review"] for f in fields.values()),
                    "policy_conflict": bool(batch.policy_conflict[row]),
                    "model_version": self.version,
                }
            )
        return out

    def sanshi_fields(self, label: str) -> dict | None:
        info = self.policy.class_info(label)
        if info is None:
            return None
        return {
            "colour": info.colour,
            "colour_hex": info.colour_hex,
            "handling_mode": info.handling_mode,
            "handled_by": info.handled_by,
            "time_limit_days": info.time_limit_days,
        }

    # ------------------------------------------------------------------------------------------------ as columns

    def score_frame(self, texts: Sequence[str]) -> pd.DataFrame:
        """Columnar suggestions for batch scoring: ``T``, ``T_confidence``, ``T_needs_review`` per target."""
        batch, _ = self.predict(texts)
        columns: dict[str, object] = {}
        for target in self.targets:
            pred = batch.predictions[target]
            columns[target] = pred.labels
            columns[f"{target}_confidence"] = pred.confidence.astype(np.float32)
            columns[f"{target}_needs_review"] = batch.needs_review(target)
            if target == self.sanshi_target:
                info = {name: self.policy.class_info(name) for name in pred.classes}
                columns[f"{target}_colour"] = [info[label].colour if info[label] else None for label in pred.labels]
                columns[f"{target}_handling_mode"] = [
                    info[label].handling_mode if info[label] else None for label in pred.labels
                ]
        columns["policy_conflict"] = batch.policy_conflict
        return pd.DataFrame(columns)
