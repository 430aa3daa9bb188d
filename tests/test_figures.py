"""The figures: the Pareto frontier by hand, and both PNGs written."""

import math

from meshseg.benchmark.figures import ModelPoint, box_plot, pareto_front, size_plot

PNG = b"\x89PNG\r\n\x1a\n"


def points():
    return {"tiny": ModelPoint(5_000, 0.70, 0.5, 0.8),
            "small": ModelPoint(100_000, 0.80, 0.7, 0.9),
            "big": ModelPoint(1_000_000, 0.85, 0.8, 0.9),
            "bigger_worse": ModelPoint(9_000_000, 0.82, 0.7, 0.9),  # beaten by big
            "small_worse": ModelPoint(100_000, 0.75, 0.6, 0.8)}  # beaten by small (tie on size)


def test_pareto_front_by_hand():
    assert pareto_front(points()) == ["tiny", "small", "big"]
    assert pareto_front({"a": ModelPoint(10, 0.5, 0.4, 0.6)}) == ["a"]


def test_both_figures_are_written(tmp_path):
    box_plot({"a": [0.5, 0.6], "b": [0.8, math.nan], "empty": []}, tmp_path / "box.png",
             marks={"a": "*"})
    size_plot(points(), tmp_path / "size.png")
    for name in ("box.png", "size.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.png", "size.png"]  # no leftovers
