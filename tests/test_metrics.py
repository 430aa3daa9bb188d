"""Metrics against values worked out by hand, including the edge cases."""

import math

import numpy as np
import pytest
from scipy import ndimage

from meshseg import metrics
from meshseg.metrics import LesionCounts, avd, confusion, dice, hd95, lesion_counts, mcc


def masks():
    truth = np.zeros((4, 5), bool)
    truth[0, :4] = True  # 4 voxels
    pred = np.zeros((4, 5), bool)
    pred[0, 2:5] = True  # 3 voxels, 2 of them right
    return pred, truth


def test_hand_computed_values():
    pred, truth = masks()
    assert confusion(pred, truth) == (2, 1, 2, 15)
    assert dice(pred, truth) == pytest.approx(4 / 7)
    assert avd(pred, truth) == pytest.approx(1 / 4)
    assert mcc(pred, truth) == pytest.approx((2 * 15 - 1 * 2) / math.sqrt(3 * 4 * 16 * 17))


def test_edge_cases():
    empty = np.zeros((3, 3), bool)
    some = np.eye(3, dtype=bool)
    assert (dice(empty, empty), avd(empty, empty), mcc(empty, empty)) == (1.0, 0.0, 1.0)
    assert (dice(some, empty), avd(some, empty), mcc(some, empty)) == (0.0, math.inf, 0.0)
    assert (dice(empty, some), avd(empty, some), mcc(empty, some)) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        dice(empty, np.zeros((2, 2), bool))


def line(*runs: tuple[int, int], length: int = 40) -> np.ndarray:
    """A (1, 1, length) mask: every voxel is surface (its x and y neighbours are outside)."""
    mask = np.zeros((1, 1, length), bool)
    for start, stop in runs:
        mask[0, 0, start:stop] = True
    return mask


def test_hd95_by_hand():
    one, other = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    one[0, 0, 0], other[0, 2, 0] = True, True
    assert hd95(one, other, (1.0, 1.5, 1.0)) == pytest.approx(3.0)  # 2 voxels of 1.5 mm
    truth = line((0, 20))
    pred = line((0, 20), (30, 40))
    # pred -> truth: 20 zeros, then 11..20 mm; 95th percentile of 30 values: index 27.55
    # of the sorted distances, between 18 and 19 -> 18.55. truth -> pred: all 0.
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(18.55)
    assert hd95(truth, pred, (1.0, 1.0, 0.5)) == pytest.approx(18.55 / 2)


def test_hd95_of_shifted_cubes():
    truth, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    truth[2:5, 2:5, 2:5] = True
    pred[3:6, 2:5, 2:5] = True
    # each cube's surface is all of it but its centre; 10 of pred's 26 surface voxels are
    # 1 voxel from truth's surface (its far face and truth's centre), the rest on it
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert hd95(pred, truth, (2.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_hd95_crop_gives_the_whole_volume_answer():
    rng = np.random.default_rng(0)
    pred, truth = rng.random((30, 30, 30)) > 0.995, np.zeros((30, 30, 30), bool)
    truth[5:12, 20:29, 0:6] = True

    def whole(a, b, spacing):
        surf = [m & ~ndimage.binary_erosion(m) for m in (a, b)]
        d = [ndimage.distance_transform_edt(~surf[1 - i], sampling=spacing)[surf[i]]
             for i in range(2)]
        return max(np.percentile(d[0], 95), np.percentile(d[1], 95))

    assert hd95(pred, truth, (1.0, 2.0, 0.7)) == pytest.approx(whole(pred, truth, (1, 2, 0.7)))


def test_hd95_empty_cases():
    empty, some = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    some[1, 1, 1] = True
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(hd95(some, empty, (1, 1, 1)))
    assert math.isnan(hd95(empty, some, (1, 1, 1)))
    assert hd95(some, some, (1, 1, 1)) == 0.0


def test_lesion_counts_by_hand():
    truth, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # lesion A: corner neighbours are 26-connected
    truth[5, 5, 5] = True  # lesion B, missed
    truth[8, 0, 0] = truth[8, 1, 0] = True  # lesion C
    pred[1, 1, 1] = True  # finds A
    pred[8, 1, 0] = pred[9, 1, 0] = True  # finds C (one component partly outside it)
    pred[5, 0, 9] = True  # false positive
    pred[0, 9, 9] = pred[0, 9, 8] = True  # false positive
    assert lesion_counts(pred, truth) == LesionCounts(true=3, detected=2, missed=1,
                                                      false_positive=2)


def test_lesion_counts_edge_cases():
    empty, some = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    some[0, 0, 0] = some[4, 4, 4] = True
    assert lesion_counts(empty, empty) == LesionCounts(0, 0, 0, 0)
    assert lesion_counts(empty, some) == LesionCounts(2, 0, 2, 0)
    assert lesion_counts(some, empty) == LesionCounts(0, 0, 0, 2)
    assert lesion_counts(some, some) == LesionCounts(2, 2, 0, 0)


def test_identical_full_masks_score_mcc_one():
    """Issue 20 item 17: two identical all-ones masks agree perfectly (MCC was 0.0)."""
    full = np.ones((4, 4, 4), bool)
    some = full.copy()
    some[0] = False
    assert mcc(full, full) == 1.0
    assert mcc(some, full) == 0.0 and mcc(full, some) == 0.0


def test_lesions_labelled_in_their_box_are_labelled_as_on_the_whole_grid():
    rng = np.random.default_rng(5)
    mask = np.zeros((40, 50, 30), np.uint8)
    mask[10:30, 5:40, 8:20] = rng.random((20, 35, 12)) > 0.7
    labels, count = metrics.label_lesions(mask)
    expected, expected_count = ndimage.label(mask, structure=metrics.CONNECTIVITY)
    assert count == expected_count > 1
    np.testing.assert_array_equal(labels, expected)
    assert metrics.label_lesions(mask * 0)[1] == 0
