"""Compare predicted masks with reference masks: per-subject metrics and a summary.

Pairs are matched by subject key: BIDS sub-/ses- entities when both names have them,
else the file name without .nii[.gz] and without meshseg's and common mask suffixes
(_lesion, _mask, _T2w, ...). Masks must share a grid: a different grid is an error naming
both files, unless resampling (nearest neighbour) is asked for. Voxels above 0.5 are lesion;
a mask with other values than 0 and 1 is reported. A pair that cannot be scored is listed and
the others are scored.

Summaries are given over all subjects and per lesion-volume bin: the quartiles of ARC's
true lesion volumes that the paper stratified by (`VOLUME_BINS`), because small lesions
are the hardest and a mean over all subjects hides them.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from rich import box
from rich.table import Table

from meshseg.errors import InputError, MeshsegError
from meshseg.io import GRID_ATOL_MM, Volume, is_nifti_path, load_volume, stem, write_csv
from meshseg.metrics import ARC_QUARTILES_ML, avd, dice, hd95, lesion_counts, mcc, voxel_ml
from meshseg.pipeline.cohort import is_companion

logger = logging.getLogger(__name__)

SUFFIXES = re.compile(r"(_(lesion|prob|mask|label|T2w|desc-[A-Za-z0-9]+|space-[A-Za-z0-9]+))+$")
ENTITIES = re.compile(r"(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")
SUMMARY_METRICS = ("dice", "avd", "mcc", "hd95_mm")
LESION_THRESHOLD = 0.5  # as predict thresholds probabilities; a 0/1 mask is unchanged by it
# The paper's quartile cut points of ARC's lesion volumes (voxels at 1 mm^3, i.e. mL / 1000);
# the outer bins are open, so no volume falls outside them.
_CUTS = ARC_QUARTILES_ML[1:-1]
BIN_NAMES = ("Q1", "Q2", "Q3", "Q4")
VOLUME_BINS = tuple(f"{name} {span} mL" for name, span in zip(BIN_NAMES, (
    f"< {_CUTS[0]:.1f}", f"{_CUTS[0]:.1f}-{_CUTS[1]:.1f}", f"{_CUTS[1]:.1f}-{_CUTS[2]:.1f}",
    f">= {_CUTS[2]:.1f}")))


@dataclass
class Score:
    """One subject's row."""

    subject: str
    dice: float
    avd: float
    mcc: float
    vol_true_ml: float
    vol_pred_ml: float
    hd95_mm: float
    lesions_true: int
    lesions_detected: int
    lesions_missed: int
    lesions_false_positive: int
    pred: str
    truth: str

    @property
    def volume_bin(self) -> str:
        """The `VOLUME_BINS` label of the true lesion volume."""
        return VOLUME_BINS[int(np.searchsorted(_CUTS, self.vol_true_ml, side="right"))]


def subject_key(path: Path) -> str:
    """The key two files of the same subject share."""
    found = ENTITIES.search(path.name)
    if found:
        return "_".join(part for part in found.groups() if part)
    return SUFFIXES.sub("", stem(path))


def mask_files(spec: Path, pattern: str = "*") -> list[Path]:
    """One NIfTI file, or the NIfTI files below a folder whose names match `pattern`
    (probability maps, meshseg's or BIDS *_probseg, and meshseg's --mni masks excluded)."""
    if spec.is_dir():
        return sorted(p for p in spec.rglob(pattern) if is_nifti_path(p)
                      and not is_companion(p) and not stem(p).endswith(("_probseg", "_prob")))
    if not spec.exists():
        raise InputError(f"{spec}: no such file or folder")
    return [spec]


def match(preds: list[Path], truths: list[Path], two_files: bool = False
          ) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(matched pairs, unmatched files) by subject key; `two_files` (the user named one file on
    each side) pairs them whatever their keys, which folders never do.

    Raises:
        InputError: two files on one side share a key.
    """
    sides = []
    for files in (preds, truths):
        keyed: dict[str, Path] = {}
        for path in files:
            key = subject_key(path)
            if key in keyed:
                raise InputError(f"{keyed[key]} and {path}: same subject key {key!r}")
            keyed[key] = path
        sides.append(keyed)
    pred_by, truth_by = sides
    if two_files:
        return [(preds[0], truths[0])], []
    pairs = [(pred_by[k], truth_by[k]) for k in sorted(pred_by.keys() & truth_by.keys())]
    unmatched = sorted([pred_by[k] for k in pred_by.keys() - truth_by.keys()]
                       + [truth_by[k] for k in truth_by.keys() - pred_by.keys()])
    return pairs, unmatched


def score(pred_path: Path, truth_path: Path, resample: bool = False,
          warn: Callable[[str], None] = logger.warning) -> Score:
    """Metrics of one pair of masks: values > LESION_THRESHOLD are lesion; a mask holding other
    values than 0 and 1 is scored so and reported through `warn`.

    Raises:
        InputError: a mask fails the reading gate, or the grids differ without `resample`.
    """
    pred, truth = load_volume(pred_path), load_volume(truth_path)
    for volume in (pred, truth):
        for note in volume.warnings:
            warn(note)
        _report_non_binary(volume, warn)
    same = (pred.data.shape == truth.data.shape
            and np.allclose(pred.affine, truth.affine, atol=GRID_ATOL_MM))
    if not same:
        if not resample:
            raise InputError(f"{pred_path} and {truth_path}: masks are on different grids "
                             "(use --resample to compare anyway)")
        moved = resample_from_to(nib.Nifti1Image(pred.data, pred.affine),
                                 (truth.data.shape, truth.affine), order=0)
        pred_data = np.asarray(moved.dataobj)
        if (pred.data > LESION_THRESHOLD).any() and not (pred_data > LESION_THRESHOLD).any():
            warn(f"{pred_path}: its lesion lies entirely outside {truth_path}'s grid; "
                 "scored as an empty prediction (wrong mask or affine?)")
    else:
        pred_data = pred.data
    p, t = pred_data > LESION_THRESHOLD, truth.data > LESION_THRESHOLD
    ml = voxel_ml(truth.affine)
    spacing_mm = tuple(float(z) for z in np.linalg.norm(truth.affine[:3, :3], axis=0))
    lesions = lesion_counts(p, t)
    return Score(subject=subject_key(truth_path), dice=dice(p, t), avd=avd(p, t), mcc=mcc(p, t),
                 vol_true_ml=float(t.sum()) * ml, vol_pred_ml=float(p.sum()) * ml,
                 hd95_mm=hd95(p, t, spacing_mm), lesions_true=lesions.true,
                 lesions_detected=lesions.detected, lesions_missed=lesions.missed,
                 lesions_false_positive=lesions.false_positive,
                 pred=str(pred_path), truth=str(truth_path))


def _report_non_binary(volume: Volume, warn: Callable[[str], None]) -> None:
    """Warn, once per file, when a mask is not 0/1 (a probability map, labels, -1...)."""
    other = (volume.data != 0) & (volume.data != 1)
    if other.any():
        values = volume.data[other]
        warn(f"{volume.name}: mask holds {int(other.sum())} voxels other than 0 and 1 "
             f"({float(values.min()):g}..{float(values.max()):g}); lesion taken as "
             f"> {LESION_THRESHOLD:g}")


def score_all(pairs: list[tuple[Path, Path]], resample: bool = False,
              warn: Callable[[str], None] = logger.warning) -> tuple[list[Score], list[str]]:
    """(scores of the readable pairs, one error line per pair that could not be scored)."""
    scores, errors = [], []
    for pred, truth in pairs:
        try:
            scores.append(score(pred, truth, resample, warn))
        except MeshsegError as err:
            errors.append(str(err))
    return scores, errors


def by_volume_bin(scores: list[Score]) -> dict[str, list[Score]]:
    """Scores grouped by `VOLUME_BINS` label, every bin present (possibly empty), in order."""
    return {label: [s for s in scores if s.volume_bin == label] for label in VOLUME_BINS}


def summary(scores: list[Score]) -> dict[str, dict[str, float]]:
    """Mean, std, median and IQR of each of SUMMARY_METRICS over subjects, with n.

    Infinite and NaN values (AVD with an empty truth, HD95 with one empty mask) are left
    out, so n may differ between metrics; a metric without finite values is left out.
    """
    out = {}
    for name in SUMMARY_METRICS:
        values = [getattr(s, name) for s in scores if np.isfinite(getattr(s, name))]
        if not values:
            continue
        q1, q2, q3 = np.percentile(values, [25, 50, 75])
        out[name] = {"mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "median": float(q2), "q1": float(q1), "q3": float(q3), "n": len(values)}
    return out


def scores_table(scores: list[Score]) -> Table:
    """One line per subject, for the terminal."""
    table = _table("subject", "DICE", "AVD", "MCC", "HD95", "true", "pred", "found", "false",
                   caption="HD95 in mm, true and predicted lesion volumes in mL; found: true "
                           "lesions detected; false: predicted lesions on no true lesion")
    for s in scores:
        table.add_row(s.subject, f"{s.dice:.3f}", f"{s.avd:.3f}", f"{s.mcc:.3f}",
                      f"{s.hd95_mm:.1f}", f"{s.vol_true_ml:.2f}", f"{s.vol_pred_ml:.2f}",
                      f"{s.lesions_detected}/{s.lesions_true}", str(s.lesions_false_positive))
    return table


def summary_table(scores: list[Score]) -> Table:
    """`summary` over all subjects and per volume bin, for the terminal.

    Each metric's cell is mean (std) over median [IQR] (Q3 - Q1, one number), and bins are
    named Q1..Q4 with their bounds in the caption: so the table fits 80 columns.
    """
    table = _table("volume", "n", *(m.removesuffix("_mm").upper() for m in SUMMARY_METRICS),
                   "found", caption=f"mean (std) over median [IQR]; n=k: k finite values. "
                                    f"True lesion volume bins: {', '.join(VOLUME_BINS)}.",
                   show_lines=True)
    for name, group in [("all", scores), *zip(BIN_NAMES, by_volume_bin(scores).values())]:
        stats = summary(group)
        found = sum(s.lesions_detected for s in group), sum(s.lesions_true for s in group)
        table.add_row(name, str(len(group)),
                      *(_stats_cell(stats.get(m), len(group), 1 if m == "hd95_mm" else 3)
                        for m in SUMMARY_METRICS),
                      f"{found[0]}/{found[1]}")
    return table


def _stats_cell(stats: dict[str, float] | None, n: int, digits: int) -> str:
    """Mean (std) over median [IQR] of one metric, and its count where values were left out."""
    if stats is None:
        return "-"
    count = f"\nn={stats['n']}" if stats["n"] != n else ""
    return (f"{stats['mean']:.{digits}f} ({stats['std']:.{digits}f})\n"
            f"{stats['median']:.{digits}f} [{stats['q3'] - stats['q1']:.{digits}f}]{count}")


def _table(*columns: str, caption: str, show_lines: bool = False) -> Table:
    """A Rich table without vertical rules (narrow enough for 80 columns); a cell too wide
    for its column folds onto the next line instead of being cut."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, caption=caption,
                  show_lines=show_lines)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def write_scores(scores: list[Score], path: Path) -> None:
    """One row per subject (the Score fields), atomically."""
    write_csv(path, [f.name for f in fields(Score)], (asdict(s) for s in scores))
