"""Segmentation metrics of the paper (DICE, AVD, MCC), as pure functions of two masks.

Edge cases are defined, not left to division by zero:
- both masks empty: Dice 1, AVD 0, MCC 1 (perfect agreement on "no lesion");
- truth empty, prediction not: Dice 0, AVD inf (relative to a zero volume), MCC 0;
- prediction empty, truth not: Dice 0, AVD 1, MCC 0.
"""

from __future__ import annotations

import math

import numpy as np


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives) over voxels."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P & T| / (|P| + |T|); 1 when both are empty."""
    tp, fp, fn, _ = confusion(pred, truth)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def avd(pred: np.ndarray, truth: np.ndarray) -> float:
    """Average volume difference |V_pred - V_true| / V_true; 0 when both are empty."""
    v_pred, v_true = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if v_true == 0:
        return 0.0 if v_pred == 0 else math.inf
    return abs(v_pred - v_true) / v_true


def mcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Matthews correlation coefficient over voxels; 1 when both are empty, 0 when one is."""
    tp, fp, fn, tn = confusion(pred, truth)
    if tp + fp + fn == 0:
        return 1.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator
