"""Nested cross-validation of several architectures: the paper's Table 1 on your data.

A results folder is built in stages, each resumable and each file written atomically:

    RESULTS/splits.json                         nested stratified splits (`meshseg.splits`)
    RESULTS/manifests/outer<k>/inner<j>/{train,val}.csv, outer<k>/test.csv
    RESULTS/runs/<model>/outer<k>/inner<j>/restart<r>/   one `meshseg train` run per unit
    RESULTS/selection.csv                       best inner run per model and outer fold
    RESULTS/predictions/<model>/<scan>_lesion.nii.gz     hold-out predictions of that run
    RESULTS/metrics/<model>.csv                 per-scan scores (`meshseg eval` columns)
    RESULTS/summary.md, summary.csv             Table 1: mean (std) over outer folds, stars
    RESULTS/figures/dice_box.png, dice_vs_size.png

A unit (model, outer fold, inner fold, restart) is one training run. A unit already finished
is skipped and an interrupted one resumed (`train.resume`), so rerunning continues where a
run stopped; `select` picks units, so that job arrays or several GPUs can share the work.
The report stage needs every unit finished.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from meshseg import archs, evaluate, splits
from meshseg.cohort import stem
from meshseg.config import TrainConfig
from meshseg.data import Pair, load_dataset, write_manifest
from meshseg.errors import InputError, OutputError
from meshseg.io import atomic_path

logger = logging.getLogger(__name__)

SPLITS_FILE, SELECTION_FILE = "splits.json", "selection.csv"
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
BOX_FIGURE, SIZE_FIGURE = "dice_box.png", "dice_vs_size.png"
TABLE_METRICS = ("dice", "avd", "mcc")
DEFAULT_REFERENCE = "meshnet-26"
SELECTOR_KEYS = ("model", "outer", "inner", "restart", "index")


@dataclass(frozen=True)
class CvSettings:
    """What `run` does; `train` holds the TrainConfig settings forwarded to every unit."""

    data: Path
    out: Path
    models: tuple[str, ...]
    splits: Path | None = None
    seed: int = 0
    restarts: int = 1
    outer: int = 3
    inner: int = 3
    reference: str | None = None  # default: meshnet-26 when trained, else the first model
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_model(self) -> str:
        if self.reference is not None:
            return self.reference
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE in self.models else self.models[0]


@dataclass(frozen=True)
class Unit:
    """One training run of the nested cross-validation; `index` is its place in `units`."""

    index: int
    model: str
    outer: int
    inner: int
    restart: int

    def folder(self, results: Path) -> Path:
        return (results / "runs" / self.model / f"outer{self.outer}" / f"inner{self.inner}"
                / f"restart{self.restart}")

    def label(self) -> str:
        return (f"model={self.model},outer={self.outer},inner={self.inner},"
                f"restart={self.restart}")


# ---------------------------------------------------------------------------- units


def units(settings: CvSettings) -> list[Unit]:
    """Every unit, in a fixed order (model, outer, inner, restart): SLURM array indices."""
    grid = [(m, k, j, r) for m in settings.models for k in range(settings.outer)
            for j in range(settings.inner) for r in range(settings.restarts)]
    return [Unit(i, *cell) for i, cell in enumerate(grid)]


def parse_selector(text: str) -> dict[str, str]:
    """``model=resunet,outer=1`` -> {"model": "resunet", "outer": "1"}.

    Raises:
        InputError: a part is not key=value with a known key, or a number is not a number.
    """
    selector = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in SELECTOR_KEYS or not value:
            raise InputError(f"--only {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(SELECTOR_KEYS)}")
        if key != "model" and not value.isdigit():
            raise InputError(f"--only {text!r}: {key} must be a number, not {value!r}")
        selector[key] = value
    return selector


def select(all_units: Sequence[Unit], selectors: Sequence[dict[str, str]]) -> list[Unit]:
    """Units matching any selector (all units when there are none); a selector matches a
    unit when every key it names has the unit's value."""
    if not selectors:
        return list(all_units)
    return [u for u in all_units
            if any(all(str(getattr(u, k)) == v for k, v in s.items()) for s in selectors)]


def status(unit: Unit, results: Path, epochs: int) -> str:
    """"done", "started" or "todo", from the run folder's metrics.csv."""
    folder = unit.folder(results)
    if not (folder / "config.toml").exists():
        return "todo"
    return "done" if len(_metrics(folder)) >= epochs else "started"


def _metrics(folder: Path) -> list[dict[str, str]]:
    """Rows of a run's metrics.csv (none when it is missing)."""
    try:
        with open(folder / "metrics.csv", newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------- splits


def prepare(settings: CvSettings) -> tuple[list[Pair], splits.Splits]:
    """The data's pairs and the splits: from `settings.splits`, from RESULTS/splits.json
    when continuing, or made from the seed; then RESULTS/splits.json holds them.

    Raises:
        InputError: bad data or splits file, or a splits file other than the one the
            results folder was made with.
    """
    for model in settings.models:
        archs.settings(model)  # an unknown name fails now, not after hours of training
    pairs = load_dataset(settings.data)
    scan_ids(pairs)
    saved = settings.out / SPLITS_FILE
    if settings.splits is not None:
        chosen = splits.load_splits(settings.splits, pairs)
        if saved.exists() and splits.load_splits(saved, pairs) != chosen:
            raise InputError(f"{settings.splits}: differs from {saved}, which the results "
                             "in this folder were made with")
    elif saved.exists():
        chosen = splits.load_splits(saved, pairs)
    else:
        chosen = splits.make_splits(pairs, settings.outer, settings.inner, settings.seed)
    if (len(chosen.folds), len(chosen.folds[0].val)) != (settings.outer, settings.inner):
        raise InputError(f"{settings.splits or saved}: has {len(chosen.folds)} outer and "
                         f"{len(chosen.folds[0].val)} inner folds, not {settings.outer} and "
                         f"{settings.inner}")
    _mkdir(settings.out)
    if not saved.exists():
        splits.save_splits(chosen, saved)
    return pairs, chosen


def scan_ids(pairs: Sequence[Pair]) -> dict[Path, str]:
    """A name for each scan's prediction and metrics row: its file name without .nii[.gz].

    Raises:
        InputError: two scans share a file name.
    """
    ids: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for pair in pairs:
        name = stem(pair.image)
        if name in seen:
            raise InputError(f"{seen[name]} and {pair.image}: same file name; cv names "
                             "predictions after the scans, so scan names must differ")
        seen[name], ids[pair.image] = pair.image, name
    return ids


def write_manifests(results: Path, chosen: splits.Splits, pairs: Sequence[Pair],
                    outer: int, inner: int) -> tuple[Path, Path]:
    """(train.csv, val.csv) of one inner fold, as `data.read_manifest` reads them."""
    folder = results / "manifests" / f"outer{outer}" / f"inner{inner}"
    train, val = splits.fold_pairs(chosen, pairs, outer, inner)
    _mkdir(folder)
    return write_manifest(train, folder / "train.csv"), write_manifest(val, folder / "val.csv")


# ---------------------------------------------------------------------------- training


def unit_config(settings: CvSettings, unit: Unit, train_csv: Path, val_csv: Path) -> TrainConfig:
    """The unit's training settings: the forwarded ones, its architecture, one restart
    seeded from the cv seed and the restart number."""
    return TrainConfig(data=train_csv, val_data=val_csv, out=unit.folder(settings.out),
                       restarts=1, seed=settings.seed + unit.restart,
                       **archs.settings(unit.model), **settings.train)


def epochs(settings: CvSettings) -> int:
    """Epochs every unit trains (the forwarded setting, else TrainConfig's default)."""
    return unit_config(settings, units(settings)[0], Path(), Path()).epochs


def train_unit(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair], unit: Unit,
               on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train a unit, resume it when interrupted, or leave it when finished; its run folder."""
    from meshseg import train

    folder = unit.folder(settings.out)
    if (folder / train.CONFIG_FILE).exists():
        return train.resume(folder, on_epoch)
    train_csv, val_csv = write_manifests(settings.out, chosen, pairs, unit.outer, unit.inner)
    return train.fit(unit_config(settings, unit, train_csv, val_csv), on_epoch)


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
    missing = [u for u in units(settings) if status(u, settings.out, epochs(settings)) != "done"]
    if missing:
        raise InputError(f"{settings.out}: {len(missing)} of {len(units(settings))} training "
                         f"units not finished, e.g. {missing[0].label()} (index "
                         f"{missing[0].index})")
    picked = []
    for model in settings.models:
        for k in range(settings.outer):
            candidates = [u for u in units(settings) if (u.model, u.outer) == (model, k)]
            scored = [(max(float(r["val_dice"]) for r in _metrics(u.folder(settings.out))), u)
                      for u in candidates]
            dice, best = max(scored, key=lambda item: item[0])  # first of equals
            picked.append(Selected(model, k, best.inner, best.restart, dice,
                                   best.folder(settings.out) / "best.safetensors"))
    return picked


# ---------------------------------------------------------------------------- hold-out


def predict_test(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair],
                 best: Selected) -> list[tuple[str, Path, Path]]:
    """Segment the outer fold's hold-out scans with its selected run: (scan, prediction,
    mask) for each.

    A prediction newer than the checkpoint is kept, so a rerun skips it.

    Raises:
        InputError: a scan fails (the message is `predict`'s one line).
    """
    from meshseg import catalog
    from meshseg.infer import resolve_device
    from meshseg.predict import Outputs, runner, segment_file

    device = resolve_device(settings.train.get("device", "auto"))
    model = catalog.load(str(best.checkpoint))
    run = runner(model, device)
    folder = settings.out / "predictions" / best.model
    _mkdir(folder)
    ids, done = scan_ids(pairs), []
    for pair in splits.test_pairs(chosen, pairs, best.outer):
        target = folder / f"{ids[pair.image]}_lesion.nii.gz"
        stale = target.exists() and target.stat().st_mtime < best.checkpoint.stat().st_mtime
        result = segment_file(pair.image, Outputs(target), model, run, str(device),
                              overwrite=stale)
        if result.status == "failed":
            raise InputError(result.error)
        done.append((ids[pair.image], target, pair.mask))
    return done


def score_model(settings: CvSettings, model: str,
                predicted: Sequence[tuple[str, Path, Path]]) -> list[evaluate.Score]:
    """Per-scan scores of one model's hold-out predictions (rows named by scan), saved as
    RESULTS/metrics/<model>.csv."""
    scores = [replace(evaluate.score(pred, mask), subject=scan) for scan, pred, mask in predicted]
    folder = settings.out / "metrics"
    _mkdir(folder)
    evaluate.write_csv(scores, folder / f"{model}.csv")
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


def table(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair],
          scores: dict[str, list[evaluate.Score]]) -> list[Row]:
    """Table 1: per model the mean of each metric per outer fold, and significance of the
    per-subject differences to the reference model (Wilcoxon, Holm over models)."""
    from meshseg import stats

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
        out.append(Row(model, parameters(settings, model), folds,
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


def parameters(settings: CvSettings, model: str) -> int:
    """Learnable parameters of the model as trained (its architecture and build options)."""
    config = unit_config(settings, Unit(0, model, 0, 0, 0), Path(), Path())
    return archs.count_parameters(config.architecture, config.network_options())


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
    _write_csv(settings.out / SUMMARY_CSV,
               ["model", "parameters", "scans"] + [f"{m}_{x}" for m in TABLE_METRICS
                                                   for x in ("mean", "std", "p_holm")],
               [[row.model, row.parameters, row.scans]
                + [v for m in TABLE_METRICS for v in (row.mean(m), row.std(m), row.p_holm[m])]
                for row in rows])


def write_figures(settings: CvSettings, rows: Sequence[Row],
                  scores: dict[str, list[evaluate.Score]]) -> None:
    """The DICE box plot (ranked, stars) and median DICE against 1 / parameters."""
    from meshseg.figures import ModelPoint, box_plot, size_plot

    folder = settings.out / "figures"
    _mkdir(folder)
    dice = {m: [s.dice for s in rows_] for m, rows_ in scores.items()}
    box_plot(dice, folder / BOX_FIGURE, marks={r.model: r.stars["dice"] for r in rows},
             title=f"hold-out DICE (*: p < 0.05 against {settings.reference_model})")
    points = {}
    for row in rows:
        q1, median, q3 = np.percentile(dice[row.model], [25, 50, 75])
        points[row.model] = ModelPoint(row.parameters, float(median), float(q1), float(q3))
    size_plot(points, folder / SIZE_FIGURE)


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
    for unit in todo:
        if status(unit, settings.out, epochs(settings)) == "done":
            continue
        logger.info("unit %d: %s", unit.index, unit.label())
        train_unit(settings, chosen, pairs, unit,
                   None if on_epoch is None else (lambda row, u=unit: on_epoch(u, row)))
    return None if selectors else report(settings, chosen, pairs)


def report(settings: CvSettings, chosen: splits.Splits, pairs: Sequence[Pair]) -> list[Row]:
    """Select, predict the hold-out scans, score, and write the summary and figures."""
    best = select_best(settings)
    _write_csv(settings.out / SELECTION_FILE,
               ["model", "outer", "inner", "restart", "val_dice", "checkpoint"],
               [[b.model, b.outer, b.inner, b.restart, b.val_dice, b.checkpoint] for b in best])
    scores = {}
    for model in settings.models:
        predicted = [p for b in best if b.model == model
                     for p in predict_test(settings, chosen, pairs, b)]
        scores[model] = score_model(settings, model, predicted)
    rows = table(settings, chosen, pairs, scores)
    write_summary(settings, rows)
    write_figures(settings, rows, scores)
    return rows


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV file, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path, suffix=".part.csv") as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create folder ({err.strerror or err})") from err
