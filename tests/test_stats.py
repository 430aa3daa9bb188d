"""Wilcoxon against the reference and Holm's correction, on values worked out by hand."""

import math

import pytest

from meshseg.benchmark.stats import compare, holm, paired_wilcoxon


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> made monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    got = holm([0.02, math.nan, 0.04])
    assert got[0] == pytest.approx(0.04) and math.isnan(got[1]) and got[2] == pytest.approx(0.04)


def scores(differences):
    reference = {f"s{i}": 0.5 for i in range(len(differences))}
    return {f"s{i}": 0.5 + d for i, d in enumerate(differences)}, reference


def test_wilcoxon_exact_p_by_hand():
    # n = 6, distinct |d|: all 2^6 sign patterns equally likely under H0
    worse, reference = scores([-0.01, -0.02, -0.03, -0.04, -0.05, -0.06])
    assert paired_wilcoxon(worse, reference) == (6, pytest.approx(2 / 64))  # W+ = 0
    one_up, _ = scores([0.01, -0.02, -0.03, -0.04, -0.05, -0.06])
    assert paired_wilcoxon(one_up, reference) == (6, pytest.approx(2 * 2 / 64))  # W+ <= 1


def test_pairs_only_shared_finite_subjects_and_degenerate_cases():
    model, reference = scores([-0.01, -0.02, -0.03, -0.04, -0.05, -0.06])
    model["extra"] = 0.1
    reference["s0"] = math.nan
    assert paired_wilcoxon(model, reference) == (5, pytest.approx(2 / 32))
    model["s1"] = math.inf
    assert paired_wilcoxon(model, reference) == (4, pytest.approx(2 / 16))
    assert paired_wilcoxon(reference, reference)[1] == 1.0
    n, p = paired_wilcoxon({"a": 1.0}, {"b": 1.0})
    assert n == 0 and math.isnan(p)


def test_compare_corrects_over_models_and_stars():
    worse, reference = scores([-0.01, -0.02, -0.03, -0.04, -0.05, -0.06, -0.07, -0.08])
    mixed, _ = scores([0.01, -0.02, 0.03, -0.04, 0.05, -0.06, 0.07, -0.08])
    result = compare({"ref": reference, "worse": worse, "mixed": mixed}, "ref")
    assert set(result) == {"worse", "mixed"}
    assert result["worse"].p == pytest.approx(2 / 256)
    assert result["worse"].p_holm == pytest.approx(2 * 2 / 256)
    assert result["worse"].star == "*" and result["mixed"].star == ""
