"""Segmentation metrics as pure functions of two masks: the paper's DICE, AVD and MCC, the
95th-percentile Hausdorff distance, and lesion-wise detection counts.

Edge cases are defined, not left to division by zero:
- both masks empty: Dice 1, AVD 0, MCC 1, HD95 0 (perfect agreement on "no lesion");
- truth empty, prediction not: Dice 0, AVD inf (relative to a zero volume), MCC 0,
  HD95 NaN;
- prediction empty, truth not: Dice 0, AVD 1, MCC 0, HD95 NaN.
HD95 is NaN (undefined), not inf, when one surface is missing: there is no distance to
measure, and an inf would turn every mean it enters into inf. Summaries leave NaN out and
show how many values they used; the lesion counts still record the miss or false alarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 26-connected lesions, as brainchop counts them (predict's largest-lesion rule uses it too).
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# ARC's chronic lesion volumes (mL): smallest, the three quartile cut points, largest; from
# the voxel counts at 1 mm that Fedorov et al. 2025 stratify ARC by. eval reports scores per
# quartile, synth draws its lesion sizes from them.
ARC_QUARTILES_ML = (0.203, 33.619, 67.891, 128.314, 363.885)


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL of a voxel-to-mm affine (1 mL = 1000 mm^3)."""
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(26-connected lesion labels of a mask, as ndimage.label gives them; their count),
    labelled inside the mask's bounding box only: a stroke is a small part of a head, and
    labelling the whole scan was most of the work."""
    labels = np.zeros(np.shape(mask), np.int32)
    found = ndimage.find_objects((np.asarray(mask) > 0).astype(np.uint8))
    if not found:
        return labels, 0
    labels[found[0]], count = ndimage.label(np.asarray(mask)[found[0]] > 0,
                                            structure=CONNECTIVITY)
    return labels, int(count)


def largest_lesion(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected lesion of a mask, as a boolean mask (empty stays empty)."""
    labels, count = label_lesions(mask)
    if count < 2:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def largest_lesion_centre(mask: np.ndarray) -> np.ndarray | None:
    """Voxel coordinates of the centre of mass of the largest 26-connected lesion (None when
    there is none)."""
    largest = largest_lesion(mask)
    return np.argwhere(largest).mean(axis=0) if largest.any() else None


def largest_lesion_side(mask: np.ndarray, affine: np.ndarray) -> str:
    """"left", "right" or "" (no lesion): the side of the largest lesion, by the sign of its
    centroid's world x (RAS: x < 0 is the subject's left). Needs no registration, so it is
    only as good as the scan's own world origin (near mid-brain on scanner and standard
    grids)."""
    centroid = largest_lesion_centre(mask)
    if centroid is None:
        return ""
    x = (np.asarray(affine)[:3, :3] @ centroid + np.asarray(affine)[:3, 3])[0]
    return "left" if x < 0 else "right"


def _booleans(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean arrays of one shape."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    return pred, truth


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives) over voxels."""
    pred, truth = _booleans(pred, truth)
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
    """Matthews correlation coefficient over voxels; 1 when the masks agree on every voxel
    (both empty, or both full: the formula is 0/0 there), 0 when one is empty or full and
    the other is not."""
    tp, fp, fn, tn = confusion(pred, truth)
    if fp + fn == 0:
        return 1.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the masks' surfaces, in mm.

    A surface voxel is a mask voxel with a face neighbour outside the mask (or outside the
    array). Distances go from each surface voxel of one mask to the nearest surface voxel of
    the other, through Euclidean distance transforms scaled by the voxel spacing; the result
    is the larger of the two directed 95th percentiles (as MedPy and MONAI compute it).
    0 when both masks are empty, NaN when only one is (see the module docstring).
    """
    pred, truth = _booleans(pred, truth)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return math.nan
    box = _bounding_box(pred | truth)  # distances are exact inside a box holding both
    surfaces = [_surface(m[box]) for m in (pred, truth)]
    directed = [np.percentile(ndimage.distance_transform_edt(~to, sampling=spacing_mm)[frm], 95)
                for frm, to in (surfaces, surfaces[::-1])]
    return float(max(directed))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one face neighbour outside the mask."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box around the mask's voxels, one voxel wider where the array allows,
    so surfaces found inside the box are the surfaces of the whole array."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hit[0] - 1, 0), hit[-1] + 2))
    return tuple(box)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection: connected components (26-connected) of truth and prediction."""

    true: int  # components of the truth
    detected: int  # true components overlapping at least one predicted voxel
    missed: int  # true components no predicted voxel touches
    false_positive: int  # predicted components overlapping no true voxel


def lesion_counts(pred: np.ndarray, truth: np.ndarray) -> LesionCounts:
    """Count true lesions found and missed, and predicted lesions that are not lesions."""
    pred, truth = _booleans(pred, truth)
    true_labels, n_true = ndimage.label(truth, structure=CONNECTIVITY)
    pred_labels, n_pred = ndimage.label(pred, structure=CONNECTIVITY)
    detected = np.unique(true_labels[pred & truth]).size
    overlapping = np.unique(pred_labels[pred & truth]).size
    return LesionCounts(true=n_true, detected=detected, missed=n_true - detected,
                        false_positive=n_pred - overlapping)

