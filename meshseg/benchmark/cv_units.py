"""The units of `meshseg cv`: what they are, which to run, and training one.

A unit (model, outer fold, inner fold, restart) is one `meshseg train` run in
RESULTS/runs/<model>/outer<k>/inner<j>/restart<r>/. `units` lists them in a fixed order (their
index is a SLURM array index), `select` picks some with --only selectors, `status` reads
how far one got, and `train_unit` trains it, resumes it when interrupted, or leaves it when
finished. `prepare` fixes the data and the splits every unit draws its manifests from, and
refuses training settings other than those of the units already set up.
The report that follows the training is `meshseg.cv`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshseg import archs
from meshseg.benchmark import splits
from meshseg.errors import InputError
from meshseg.io import make_folder, stem
from meshseg.training import train
from meshseg.training.config import MACHINE_FIELDS, TrainConfig, differences, load_config
from meshseg.training.data import Pair, load_dataset, write_manifest

DEFAULT_REFERENCE = "meshnet-26"
SELECTOR_KEYS = ("model", "outer", "inner", "restart", "index")
UNIT_FILES = ("data", "out", "val_data")  # the training settings cv writes for each unit


@dataclass(frozen=True)
class CvSettings:
    """What `meshseg cv` does (`cv.run`); `train` holds the TrainConfig settings forwarded
    to every unit."""

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
    if not set_up(folder):
        return "todo"
    return "done" if finished(metric_rows(folder), epochs) else "started"


def set_up(folder: Path) -> bool:
    """Whether the unit's run can resume: `train.fit` writes split.json, then config.toml,
    so a unit killed between the two has split.json alone. Folders left by older versions,
    which wrote config.toml first, may hold config.toml alone. Either never trained, and
    starts afresh (`train_unit`)."""
    return all((folder / name).exists() for name in (train.CONFIG_FILE, train.SPLIT_FILE))


def finished(rows: Sequence[dict[str, str]], epochs: int) -> bool:
    """Whether a run's metrics.csv rows cover all its epochs (cv units train one restart)."""
    return len(rows) >= epochs


def metric_rows(folder: Path) -> list[dict[str, str]]:
    """Rows of a run's metrics.csv (none when it is missing)."""
    try:
        with open(folder / train.METRICS_FILE, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------- splits


def prepare(settings: CvSettings) -> tuple[list[Pair], splits.Splits]:
    """The data's pairs and the splits: from `settings.splits`, from RESULTS/splits.json
    when continuing, or made from the seed; then RESULTS/splits.json holds them. Units
    already set up must have been so with this call's training settings (`check_unit`).

    Raises:
        InputError: bad data or splits file, a splits file other than the one the
            results folder was made with, or a unit trained with other settings.
    """
    for model in settings.models:
        archs.settings(model)  # an unknown name fails now, not after hours of training
    pairs = load_dataset(settings.data)
    scan_ids(pairs)
    saved = settings.out / splits.SPLITS_FILE
    chosen = splits.folder_splits(pairs, saved, settings.splits, settings.outer, settings.inner,
                                  settings.seed)
    if (len(chosen.folds), len(chosen.folds[0].val)) != (settings.outer, settings.inner):
        raise InputError(f"{settings.splits or saved}: has {len(chosen.folds)} outer and "
                         f"{len(chosen.folds[0].val)} inner folds, not {settings.outer} and "
                         f"{settings.inner}")
    make_folder(settings.out)
    if not saved.exists():
        splits.save_splits(chosen, saved)
    for unit in units(settings):
        check_unit(settings, unit)
    return pairs, chosen


def check_unit(settings: CvSettings, unit: Unit) -> None:
    """Refuse to continue a unit set up with other training settings than this call's: its
    run would resume with its own, and the report would mix the two. Settings that may
    differ between machines (`config.MACHINE_FIELDS`) are not compared.

    Raises:
        InputError: naming the run folder and each setting that differs.
    """
    folder = unit.folder(settings.out)
    if not set_up(folder):
        return
    skip = (*UNIT_FILES, *MACHINE_FIELDS)  # its own files; the machine's settings
    saved, wanted = (
        {k: v for k, v in config.to_dict().items() if k not in skip}
        for config in (load_config(folder / train.CONFIG_FILE),
                       unit_config(settings, unit, Path(), Path()).resolved()))
    differ = differences(saved, wanted, "run")
    if differ:
        raise InputError(f"{folder}: trained with other settings ({'; '.join(differ)}); "
                         "continue with the same training options, or use another --out")


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
    train_pairs, val_pairs = splits.fold_pairs(chosen, pairs, outer, inner)
    make_folder(folder)
    return (write_manifest(train_pairs, folder / "train.csv"),
            write_manifest(val_pairs, folder / "val.csv"))


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
    """Train a unit, resume it when interrupted, or leave it when finished; its run folder.

    A resumed unit runs with this call's machine settings (`config.MACHINE_FIELDS`), not
    those of the machine that started it."""
    folder = unit.folder(settings.out)
    if set_up(folder):
        here = unit_config(settings, unit, Path(), Path())
        return train.resume(folder, on_epoch, {k: getattr(here, k) for k in MACHINE_FIELDS})
    # fit rewrites split.json; only an older version's config.toml without it must go
    (folder / train.CONFIG_FILE).unlink(missing_ok=True)
    train_csv, val_csv = write_manifests(settings.out, chosen, pairs, unit.outer, unit.inner)
    return train.fit(unit_config(settings, unit, train_csv, val_csv), on_epoch)

