"""Nested cross-validation of several architectures: the paper's Table 1 on your data.

A results folder is built in stages, each resumable and each file written atomically:

    RESULTS/splits.json                         nested stratified splits (`meshseg.splits`)
    RESULTS/manifests/outer<k>/inner<j>/{train,val}.csv   each unit's pairs
    RESULTS/runs/<model>/outer<k>/inner<j>/restart<r>/   one `meshseg train` run per unit
    RESULTS/selection.csv                       best inner run per model and outer fold
    RESULTS/predictions/<model>/<scan>_lesion.nii.gz     hold-out predictions of that run
    RESULTS/predictions/<model>/outer<k>_checkpoint.txt  checkpoint of outer fold k's masks
    RESULTS/metrics/<model>.csv                 per-scan scores (`meshseg eval` columns)
    RESULTS/summary.md, summary.csv             Table 1: mean (std) over outer folds, stars
    RESULTS/figures/dice_box.png, dice_vs_size.png

A unit (model, outer fold, inner fold, restart) is one training run (`meshseg.cv_units`). A
unit already finished is skipped and an interrupted one resumed (`train.resume`), so
rerunning continues where a run stopped; selectors pick units, so that job arrays or several
GPUs can share the work. The report (this module: selection, hold-out predictions, scores,
Table 1, figures) needs every unit finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from meshseg.benchmark import evaluate, splits
from meshseg.benchmark.cv_units import (
    CvSettings,
    Unit,
    epochs,
    finished,
    metric_rows,
    prepare,
    scan_ids,
    select,
    status,
    train_unit,
    units,
)
from meshseg.errors import InputError
from meshseg.io import atomic_path, make_folder, write_csv
from meshseg.progress import track
from meshseg.training import train
from meshseg.training.data import Pair

logger = logging.getLogger(__name__)

SELECTION_FILE = "selection.csv"
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
BOX_FIGURE, SIZE_FIGURE = "dice_box.png", "dice_vs_size.png"
TABLE_METRICS = ("dice", "avd", "mcc")


# ---------------------------------------------------------------------------- driver


def run(settings: CvSettings, selectors: Sequence[dict[str, str]] = (),
        on_epoch: Callable[[Unit, dict], None] | None = None) -> list[Row] | None:
    """Train the selected units (all by default), then, when no selectors narrowed the work,
    select, predict, score and write the summary and figures. Returns Table 1's rows, or
    None when only some units were trained.

    Raises:
        InputError: bad data, splits or selectors; OutputError: RESULTS cannot be written;
            DeviceError: see `train.fit`.
    """
    if settings.reference_model not in settings.models:
        raise InputError(f"reference model {settings.reference_model} is not among the "
                         f"models ({', '.join(settings.models)})")
    pairs, chosen = prepare(settings)
    todo = select(units(settings), selectors)
    if selectors and not todo:
        raise InputError("--only selects no unit (see --list)")
    wanted = epochs(settings)
    for unit in track(todo, len(todo), "cv training units"):
        if status(unit, settings.out, wanted) == "done":
            continue
        logger.info("unit %d: %s", unit.index, unit.label())
        train_unit(settings, chosen, pairs, unit,
                   None if on_epoch is None else (lambda row, u=unit: on_epoch(u, row)))
    return None if selectors else report(settings, chosen, pairs)


def report(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair]) -> list[Row]:
    """Select, predict the hold-out scans, score, and write the summary and figures."""
    best = select_best(settings)
    write_csv(settings.out / SELECTION_FILE, [f.name for f in fields(Selected)],
              (asdict(b) for b in best))
    scores, sizes = {}, {}
    for model in settings.models:
        held = [predict_test(settings, chosen, pairs, b) for b in best if b.model == model]
        sizes[model] = held[0].parameters  # every fold trains the same network
        scores[model] = score_model(settings, model, [s for h in held for s in h.scans])
    rows = table(settings, chosen, pairs, scores, sizes)
    write_summary(settings, rows)
    write_figures(settings, rows, scores)
    return rows


# ---------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selected:
    """The inner run chosen for a model and outer fold: best validation Dice of any epoch."""

    model: str
    outer: int
    inner: int
    restart: int
    val_dice: float
    checkpoint: Path


def select_best(settings: CvSettings) -> list[Selected]:
    """Per model and outer fold, the finished unit with the best validation Dice.

    Raises:
        InputError: a unit has not finished (the message names it and how many remain).
    """
    every, wanted = units(settings), epochs(settings)
    rows = {u: metric_rows(u.folder(settings.out)) for u in every}
    missing = [u for u in every if not finished(rows[u], wanted)]
    if missing:
        raise InputError(f"{settings.out}: {len(missing)} of {len(every)} training "
                         f"units not finished, e.g. {missing[0].label()} (index "
                         f"{missing[0].index})")
    best: dict[tuple[str, int], tuple[float, Unit]] = {}
    for unit in every:  # in unit order, so the first of equals wins
        dice = max(float(r["val_dice"]) for r in rows[unit])
        if (unit.model, unit.outer) not in best or dice > best[unit.model, unit.outer][0]:
            best[unit.model, unit.outer] = dice, unit
    return [Selected(u.model, u.outer, u.inner, u.restart, dice,
                     u.folder(settings.out) / train.BEST_FILE) for dice, u in best.values()]


# ---------------------------------------------------------------------------- hold-out


@dataclass(frozen=True)
class HoldOut:
    """An outer fold's hold-out predictions and the size of the network that made them."""

    parameters: int  # learnable values of the checkpoint, as trained
    scans: list[tuple[str, Path, Path]]  # (scan, prediction, mask)


def predict_test(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair],
                 best: Selected) -> HoldOut:
    """Segment the outer fold's hold-out scans with its selected run.

    predictions/<model>/outer<k>_checkpoint.txt names the checkpoint the fold's predictions
    come from. A rerun keeps a prediction newer than the checkpoint when that file names the
    checkpoint selected now, and the file stays, so a rerun after a kill makes only the
    missing predictions; another selection (e.g. after changing --restarts) redoes them all,
    and the file is removed until it has.

    Raises:
        InputError: a scan fails (the message is `predict`'s one line).
    """
    from meshseg.models import catalog
    from meshseg.pipeline.infer import resolve_device
    from meshseg.pipeline.predict import Outputs, runner, segment_file

    device = resolve_device(settings.train.get("device", "auto"))
    model = catalog.load(str(best.checkpoint))
    run = runner(model, device)
    folder = settings.out / "predictions" / best.model
    make_folder(folder)
    source = folder / f"outer{best.outer}_checkpoint.txt"
    made_by = best.checkpoint.relative_to(settings.out).as_posix()
    same = source.is_file() and source.read_text(encoding="utf-8").strip() == made_by
    if not same:
        source.unlink(missing_ok=True)
    ids, done = scan_ids(pairs), []
    held_out = splits.test_pairs(chosen, pairs, best.outer)
    for pair in track(held_out, len(held_out), f"{best.model} outer {best.outer} hold-out"):
        target = folder / f"{ids[pair.image]}_lesion.nii.gz"
        stale = not same or (target.exists()
                             and target.stat().st_mtime < best.checkpoint.stat().st_mtime)
        # masks of a meshseg without sidecar records are cv's own: redone, not refused
        stale = stale or not Outputs(target).sidecar.exists()
        result = segment_file(pair.image, Outputs(target), model, run, str(device),
                              overwrite=stale)
        if result.status == "failed":
            raise InputError(result.error)
        done.append((ids[pair.image], target, pair.mask))
    with atomic_path(source, suffix=".part.txt") as tmp:
        tmp.write_text(made_by + "\n", encoding="utf-8")
    return HoldOut(model.parameters, done)


def score_model(settings: CvSettings, model: str,
                predicted: Sequence[tuple[str, Path, Path]]) -> list[evaluate.Score]:
    """Per-scan scores of one model's hold-out predictions (rows named by scan), saved as
    RESULTS/metrics/<model>.csv."""
    scores = [replace(evaluate.score(pred, mask), subject=scan) for scan, pred, mask in predicted]
    folder = settings.out / "metrics"
    make_folder(folder)
    evaluate.write_scores(scores, folder / f"{model}.csv")
    return scores


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    """One model's line of Table 1."""

    model: str
    parameters: int
    folds: dict[str, list[float]]  # metric -> per-outer-fold means
    stars: dict[str, str]
    p_holm: dict[str, float]
    scans: int

    def cell(self, metric: str) -> str:
        """mean (std) over folds, with the significance star."""
        return f"{self.mean(metric):.3f} ({self.std(metric):.3f}){self.stars[metric]}"

    def mean(self, metric: str) -> float:
        return float(np.mean(self.folds[metric]))

    def std(self, metric: str) -> float:
        return float(np.std(self.folds[metric], ddof=1))

    def numbers(self) -> dict[str, Any]:
        """summary.csv's line: per metric the mean, std and Holm-corrected p."""
        out: dict[str, Any] = {"model": self.model, "parameters": self.parameters,
                               "scans": self.scans}
        for m in TABLE_METRICS:
            out |= {f"{m}_mean": self.mean(m), f"{m}_std": self.std(m),
                    f"{m}_p_holm": self.p_holm[m]}
        return out


def table(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair],
          scores: dict[str, list[evaluate.Score]], parameters: dict[str, int]) -> list[Row]:
    """Table 1: per model its parameters, the mean of each metric per outer fold, and
    significance of the per-subject differences to the reference model (Wilcoxon, Holm over
    models)."""
    from meshseg.benchmark import stats

    tested_in = {subject: k for k, f in enumerate(chosen.folds) for subject in f.test}
    ids = scan_ids(pairs)
    fold_of = {ids[p.image]: tested_in[p.subject] for p in pairs}
    subject_of = {ids[p.image]: p.subject for p in pairs}
    tests = {metric: stats.compare({m: subject_means(rows, metric, subject_of)
                                    for m, rows in scores.items()}, settings.reference_model)
             for metric in TABLE_METRICS}
    out = []
    for model, rows in scores.items():
        folds = {metric: [_finite_mean([getattr(s, metric) for s in rows
                                        if fold_of[s.subject] == k])
                          for k in range(settings.outer)] for metric in TABLE_METRICS}
        found = {metric: tests[metric].get(model) for metric in TABLE_METRICS}
        out.append(Row(model, parameters[model], folds,
                       {m: c.star if c else "" for m, c in found.items()},
                       {m: c.p_holm if c else float("nan") for m, c in found.items()},
                       len(rows)))
    return out


def subject_means(rows: Sequence[evaluate.Score], metric: str,
                  subject_of: dict[str, str]) -> dict[str, float]:
    """A metric per subject: the mean over the subject's scans (rows are named by scan).

    The signed-rank test needs independent pairs; a subject's sessions are not independent,
    so the models are paired by subject, each subject once.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(subject_of[row.subject], []).append(getattr(row, metric))
    return {subject: float(np.mean(v)) for subject, v in values.items()}


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write_summary(settings: CvSettings, rows: Sequence[Row]) -> None:
    """summary.md (Table 1 layout) and summary.csv (the numbers behind it), atomically."""
    lines = ["| model | parameters | DICE | AVD | MCC |", "| --- | ---: | --- | --- | --- |"]
    for row in rows:
        name = row.model + (" (reference)" if row.model == settings.reference_model else "")
        lines.append(f"| {name} | {row.parameters:,} | "
                     f"{' | '.join(row.cell(m) for m in TABLE_METRICS)} |")
    note = (f"\nMean (std) over the {settings.outer} outer folds of each fold's mean over its "
            f"hold-out scans. * : Holm-corrected Wilcoxon signed-rank test against "
            f"{settings.reference_model} on per-subject scores (mean over a subject's scans), "
            "p < 0.05.\n")
    with atomic_path(settings.out / SUMMARY_MD, suffix=".part.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n" + note, encoding="utf-8")
    numbers = [row.numbers() for row in rows]
    write_csv(settings.out / SUMMARY_CSV, list(numbers[0]), numbers)


def write_figures(settings: CvSettings, rows: Sequence[Row],
                  scores: dict[str, list[evaluate.Score]]) -> None:
    """The DICE box plot (ranked, stars) and median DICE against 1 / parameters."""
    from meshseg.benchmark.figures import ModelPoint, box_plot, size_plot

    folder = settings.out / "figures"
    make_folder(folder)
    dice = {m: [s.dice for s in rows_] for m, rows_ in scores.items()}
    box_plot(dice, folder / BOX_FIGURE, marks={r.model: r.stars["dice"] for r in rows},
             title=f"hold-out DICE (*: p < 0.05 against {settings.reference_model})")
    points = {}
    for row in rows:
        q1, median, q3 = np.percentile(dice[row.model], [25, 50, 75])
        points[row.model] = ModelPoint(row.parameters, float(median), float(q1), float(q3))
    size_plot(points, folder / SIZE_FIGURE)
