"""The paper's two figures as PNG files: score box plots, and accuracy against size.

matplotlib is imported inside the functions (it is slow to import and only these need it)
and drawn through its Agg canvas directly, never through pyplot, so no display, backend
choice or global figure state is involved; the pixels are written by `meshseg.io.save_png`
like the QC pictures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshseg.io import save_png

DICE_LIMITS = (0.0, 1.0)  # DICE lives in 0..1; a fixed axis keeps figures comparable


@dataclass(frozen=True)
class ModelPoint:
    """One model in the size plot: its parameter count and the median and IQR of its scores."""

    parameters: int
    median: float
    q1: float
    q3: float


def box_plot(groups: Mapping[str, Sequence[float]], path: Path, *, ylabel: str = "DICE",
             rank: bool = True, marks: Mapping[str, str] | None = None,
             title: str | None = None, limits: tuple[float, float] | None = DICE_LIMITS) -> None:
    """Box plot of each group's scores (NaN left out), best median first when `rank`.

    `marks` puts a short text (e.g. "*" for a significant difference) above a group's box.
    `limits` fixes the score axis (DICE's 0..1 by default; None fits the data).
    """
    from matplotlib.figure import Figure

    values = {name: [v for v in scores if np.isfinite(v)] for name, scores in groups.items()}
    names = list(values)
    if rank:
        names.sort(key=lambda n: -np.median(values[n]) if values[n] else np.inf)
    figure = Figure(figsize=(max(4.0, 0.8 * len(names) + 1.5), 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.boxplot([values[n] for n in names], tick_labels=names)
    for x, name in enumerate(names, start=1):
        if marks and marks.get(name) and values[name]:
            axes.annotate(marks[name], (x, max(values[name])), xytext=(0, 4),
                          textcoords="offset points", ha="center", fontsize=14)
    axes.margins(y=0.1)
    axes.tick_params(axis="x", labelrotation=30)
    axes.set_ylabel(ylabel)
    _finish(axes, title, limits)
    save_png(_pixels(figure), path)


def pareto_front(points: Mapping[str, ModelPoint]) -> list[str]:
    """Models no other model beats on both size and median (fewer or equal parameters and a
    higher or equal median, one of them strictly), smallest first."""
    front = [name for name, p in points.items()
             if not any(o.parameters <= p.parameters and o.median >= p.median
                        and (o.parameters, o.median) != (p.parameters, p.median)
                        for o in points.values())]
    return sorted(front, key=lambda n: points[n].parameters)


def size_plot(points: Mapping[str, ModelPoint], path: Path, *, ylabel: str = "median DICE",
              title: str | None = None,
              limits: tuple[float, float] | None = DICE_LIMITS) -> None:
    """Median score with IQR bars against 1 / parameters (log axis), Pareto frontier drawn."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, p in points.items():
        axes.errorbar(1 / p.parameters, p.median, yerr=[[p.median - p.q1], [p.q3 - p.median]],
                      fmt="o", capsize=3)
        axes.annotate(name, (1 / p.parameters, p.median), xytext=(5, 5),
                      textcoords="offset points", fontsize=8)
    front = pareto_front(points)
    axes.plot([1 / points[n].parameters for n in front], [points[n].median for n in front],
              "--o", color="grey", markerfacecolor="none", markersize=12,
              label="Pareto frontier")  # rings, so a frontier of one model shows too
    axes.set_xscale("log")
    axes.margins(x=0.15, y=0.1)  # room for the names
    axes.set_xlabel("1 / parameters")
    axes.set_ylabel(ylabel)
    axes.legend(loc="lower left")
    _finish(axes, title, limits)
    save_png(_pixels(figure), path)


def _finish(axes, title: str | None, limits: tuple[float, float] | None) -> None:
    """The score axis's limits, and a title wrapped to the figure's width (a one-model plot is
    narrower than a long title)."""
    if limits is not None:
        axes.set_ylim(*limits)
    axes.set_title(title or "", wrap=True)


def _pixels(figure, dpi: int = 150):
    """The figure drawn at `dpi` through its Agg canvas, as a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
