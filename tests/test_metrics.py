"""Metrics against values worked out by hand, including the edge cases."""

import math

import numpy as np
import pytest

from meshseg.metrics import avd, confusion, dice, mcc


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
