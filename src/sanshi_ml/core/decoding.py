"""Joint decoding of targets that constrain each other.

Some targets are not independent: a subcategory belongs to one category (二级分类 under 一级分类), and a handling
unit implies the 三事 class (a 社区居委会 handles 共事, 网格/人民调解 handles 家事). Each head predicts on its own, so
their argmaxes can disagree: a clerk would then see a subcategory that is not under the suggested category. Joint
decoding picks, per record, the allowed pair of labels with the highest product of the two heads' probabilities,
so the pair is always consistent and the heads' evidence is combined (a confident unit can correct a hesitant
三事 class). The allowed pairs are the ones seen together in the training labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LinkedTargets:
    """Two targets whose labels come in allowed pairs: ``allowed[i, j]`` for first's class i, second's class j."""

    first: str
    second: str
    allowed: np.ndarray  # bool, shape (len(first classes), len(second classes))

    @classmethod
    def from_pairs(
        cls,
        first: str,
        second: str,
        first_classes: Sequence[str],
        second_classes: Sequence[str],
        pairs: Iterable[tuple[str, str]],
    ) -> LinkedTargets:
        """The allowed matrix from label pairs (pairs with a label outside a head's classes are ignored)."""
        rows = {label: i for i, label in enumerate(first_classes)}
        cols = {label: j for j, label in enumerate(second_classes)}
        allowed = np.zeros((len(rows), len(cols)), dtype=bool)
        for a, b in pairs:
            if a in rows and b in cols:
                allowed[rows[a], cols[b]] = True
        # A class that was never seen with any partner stays free to pair with anything, so that decoding can
        # never leave a record without an answer.
        free_rows, free_cols = ~allowed.any(axis=1), ~allowed.any(axis=0)
        allowed[free_rows, :] = True
        allowed[:, free_cols] = True
        return cls(first, second, allowed)

    def decode(self, first_proba: np.ndarray, second_proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the indices (first, second) of the allowed pair with the largest product of probabilities."""
        k1, k2 = first_proba.shape[1], second_proba.shape[1]
        if (k1, k2) != self.allowed.shape:
            raise ValueError(
                f"linked targets {self.first}/{self.second}: probabilities have {k1} and {k2} "
                f"columns, the allowed pairs {self.allowed.shape}"
            )
        first_of, second_of = np.nonzero(self.allowed)  # only allowed pairs: memory n x pairs, not n x k1 x k2
        best = (first_proba[:, first_of] * second_proba[:, second_of]).argmax(axis=1)
        return first_of[best], second_of[best]

    def consistent(self, first_index: np.ndarray, second_index: np.ndarray) -> np.ndarray:
        """Whether each row's pair of class indices is allowed."""
        return self.allowed[first_index, second_index]
