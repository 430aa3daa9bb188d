"""Significance of each model against a reference model, as in the paper's Table 1.

Per-subject scores of two models are paired by subject and compared with the two-sided
Wilcoxon signed-rank test; the p-values of all models against the reference are then
Holm-corrected together, and a model is marked where the corrected p is below ALPHA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """One model against the reference: paired subjects, raw and Holm-corrected p."""

    n: int
    p: float
    p_holm: float

    @property
    def star(self) -> str:
        """"*" where the corrected p is below ALPHA, else ""."""
        return "*" if self.p_holm < ALPHA else ""


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order (NaN stays NaN).

    Written here because scipy has no Holm correction (statsmodels does, but is a large
    dependency for four lines): the i-th smallest of m p-values is multiplied by m - i
    (i from 0), made non-decreasing in that order, and capped at 1.
    """
    p = np.asarray(pvalues, float)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    adjusted = p.copy()
    scaled = (len(order) - np.arange(len(order))) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def paired_wilcoxon(scores: Mapping[str, float], reference: Mapping[str, float]) -> tuple[
        int, float]:
    """(paired subjects, two-sided Wilcoxon signed-rank p) over subjects both scored.

    Subjects with a NaN or infinite score on either side (HD95 or AVD with an empty mask)
    are left out. Identical scores give p = 1
    (no evidence of a difference; scipy would return NaN); no pairs give NaN.
    """
    subjects = sorted(s for s in scores.keys() & reference.keys()
                      if math.isfinite(scores[s]) and math.isfinite(reference[s]))
    a = np.array([scores[s] for s in subjects])
    b = np.array([reference[s] for s in subjects])
    if not subjects:
        return 0, math.nan
    if np.all(a == b):
        return len(subjects), 1.0
    return len(subjects), float(wilcoxon(a, b).pvalue)


def compare(scores: Mapping[str, Mapping[str, float]], reference: str) -> dict[str, Comparison]:
    """Each model other than `reference` against it, Holm-corrected over those models.

    Args:
        scores: model name -> subject -> score (e.g. DICE).
    """
    others = [m for m in scores if m != reference]
    tests = [paired_wilcoxon(scores[m], scores[reference]) for m in others]
    corrected = holm([p for _, p in tests])
    return {m: Comparison(n, p, q) for m, (n, p), q in zip(others, tests, corrected)}
