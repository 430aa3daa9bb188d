"""Hyper-parameter search for MeshNet with Optuna, as in Fedorov et al. (2025).

The paper searched channels (uniform int 5..21), learning rate and AdamW weight decay
(log-uniform 1e-4..4e-2 each), the background class weight (uniform 0..1; lesion stays 1.0)
and the warm-up fraction ({0.02, 0.1, 0.2}), with epochs as the fidelity (15..50) under
asynchronous successive halving, on the inner folds of the first outer fold.

A trial trains its inner folds one after the other, each for `max_epochs`. Only the first
inner fold reports its validation Dice to the pruner, once per epoch, so every trial is
compared with the others on the same fold at the same epoch; a pruned trial stops right
after the epoch the pruner judged (its run folder stays as the record) and never trains the
other folds. A trial that survives trains all inner folds; its objective is the mean over
the folds of each fold's best validation Dice (the model `meshseg train` keeps).

Optuna is imported only here, lazily: it is part of the ``benchmark`` extra. The study lives
in an RDB storage (SQLite in the output folder by default, or any SQLAlchemy URL such as
PostgreSQL) so that several processes, on several machines, can work on one study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from meshseg import archs
from meshseg.errors import InputError
from meshseg.io import atomic_path, make_folder, write_csv
from meshseg.training.config import MACHINE_FIELDS, TrainConfig, as_flags, check_names, differences

if TYPE_CHECKING:
    import optuna

    from meshseg.benchmark.splits import Splits
    from meshseg.training.data import Pair

logger = logging.getLogger(__name__)

# TrainConfig fields the search sets, or that tune sets per fold: not options of `tune`.
NOT_FIXED = ("data", "out", "val_data", "val_fraction", "seed", "restarts", "epochs",
             "channels", "lr", "weight_decay", "class_weights", "pct_start")
CHANNELS = (5, 21)
LR = (1e-4, 4e-2)
WEIGHT_DECAY = (1e-4, 4e-2)
BACKGROUND_WEIGHT = (0.0, 1.0)
PCT_START = (0.02, 0.1, 0.2)
LESION_WEIGHT = 1.0
OUTER_FOLD = 0  # the paper tuned on the inner folds of the first outer fold
STUDY_DB, BEST_FILE, TRIALS_FILE = "study.db", "best.toml", "trials.csv"
HEARTBEAT_S = 60  # a trial whose process stops beating this long (x2) is marked failed


@dataclass(frozen=True)
class TuneSettings:
    """One `meshseg tune` process: which study, where, how many trials, what stays fixed."""

    data: Path
    out: Path
    study: str = "meshseg"
    storage: str | None = None
    trials: int = 20
    seed: int = 0
    splits: Path | None = None
    min_epochs: int = 15
    max_epochs: int = 50
    reduction_factor: int = 3
    sampler: str = "tpe"
    sampler_seed: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)

    def storage_url(self) -> str:
        """The RDB URL; default a SQLite file in the output folder."""
        return self.storage or f"sqlite:///{(self.out / STUDY_DB).absolute()}"

    def check(self) -> None:
        """Refuse settings that cannot run, before any file is written.

        Raises:
            InputError: a bad search setting, or a fixed training setting TrainConfig refuses.
        """
        rules = ((self.trials >= 1, "trials must be >= 1"),
                 (1 <= self.min_epochs <= self.max_epochs,
                  "need 1 <= min_epochs <= max_epochs"),
                 (self.reduction_factor >= 2, "reduction_factor must be >= 2"),
                 (self.sampler in ("tpe", "random"), "sampler must be tpe or random"))
        for ok, rule in rules:
            if not ok:
                raise InputError(f"tune: {rule}")
        check_names(self.fixed)
        misplaced = sorted(set(self.fixed) & set(NOT_FIXED))
        if misplaced:
            raise InputError(f"tune sets these training settings itself: {', '.join(misplaced)}")
        self.train_config(Path("train.csv"), Path("val.csv"), self.out, {}).check()

    def train_config(self, data: Path, val_data: Path, out: Path,
                     tuned: dict[str, Any]) -> TrainConfig:
        """One inner fold's training run: the fixed settings plus a trial's."""
        return TrainConfig(data=data, val_data=val_data, out=out, epochs=self.max_epochs,
                           seed=self.seed, **self.fixed, **tuned)


@dataclass(frozen=True)
class TuneResult:
    """Where a study stands after this process's trials (all processes' trials counted)."""

    study: str
    states: dict[str, int]
    best_value: float | None
    best_number: int | None
    best_settings: dict[str, Any] | None
    best_file: Path | None
    trials_file: Path


def import_optuna():
    """Optuna, or an InputError saying how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise InputError(f"meshseg tune needs Optuna: {archs.INSTALL_HINT}") from err
    return optuna


# ---------------------------------------------------------------------------- the search


def tunes_channels(fixed: dict[str, Any]) -> bool:
    """Channels are MeshNet's width; other architectures keep their own configuration."""
    return fixed.get("architecture", archs.MESHNET) == archs.MESHNET


def suggest(trial: optuna.Trial, channels: bool) -> dict[str, Any]:
    """A trial's training settings (TrainConfig fields) from the paper's search space."""
    background = trial.suggest_float("background_weight", *BACKGROUND_WEIGHT)
    tuned = {"lr": trial.suggest_float("lr", *LR, log=True),
             "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True),
             "class_weights": (background, LESION_WEIGHT),
             "pct_start": trial.suggest_categorical("pct_start", PCT_START)}
    if channels:
        tuned["channels"] = trial.suggest_int("channels", *CHANNELS)
    return tuned


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving with the epoch as the resource."""
    return import_optuna().pruners.SuccessiveHalvingPruner(
        min_resource=settings.min_epochs, reduction_factor=settings.reduction_factor)


def make_sampler(settings: TuneSettings) -> optuna.samplers.BaseSampler:
    """TPE (constant liar, so parallel workers spread out) or random search like the paper."""
    optuna = import_optuna()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.sampler_seed)
    return optuna.samplers.TPESampler(seed=settings.sampler_seed, constant_liar=True)


def open_study(settings: TuneSettings,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study, or join it when it exists (another process, an earlier call).

    Raises:
        InputError: the storage URL is malformed, its database driver is missing, or the
            database cannot be reached.
    """
    optuna = import_optuna()
    from sqlalchemy.exc import SQLAlchemyError

    url = settings.storage_url()
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S)
        return optuna.create_study(storage=storage, study_name=settings.study,
                                   direction="maximize", load_if_exists=True,
                                   sampler=make_sampler(settings),
                                   pruner=pruner or make_pruner(settings))
    except (SQLAlchemyError, ImportError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"storage {_hide_password(url)}: {detail}") from err


def _hide_password(url: str) -> str:
    """The URL without its password, for error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def study_identity(settings: TuneSettings, folds: list[tuple[list[Pair], list[Pair]]],
                   channels: bool) -> dict[str, Any]:
    """What every process of one study must agree on: search space, pruning, the fixed
    training settings, defaults included (machine-specific ones aside), and the inner
    folds' subjects."""
    subjects = [[sorted({p.subject for p in side}) for side in fold] for fold in folds]
    return {
        "space": {"channels": list(CHANNELS) if channels else None, "lr": list(LR),
                  "weight_decay": list(WEIGHT_DECAY),
                  "background_weight": list(BACKGROUND_WEIGHT), "pct_start": list(PCT_START)},
        "epochs": [settings.min_epochs, settings.max_epochs],
        "reduction_factor": settings.reduction_factor,
        "seed": settings.seed,
        "training": fixed_training(settings.train_config(Path("."), Path("."), Path("."), {})),
        "fold_subjects_sha256": hashlib.sha256(json.dumps(subjects).encode()).hexdigest(),
    }


def fixed_training(config: TrainConfig) -> dict[str, Any]:
    """The settings of `config` that a study fixes (config.toml form): all but those tune
    sets and the machine-specific ones."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_FIXED + MACHINE_FIELDS}


def join_study(study: optuna.Study, identity: dict[str, Any]) -> None:
    """Record the study's identity on first use; refuse a process that differs from it.

    A training setting the study's identity lacks was added to TrainConfig after the study
    began, whose trials trained with its default: it counts as the default.

    Raises:
        InputError: naming each setting that differs from the study's.
    """
    known = study.user_attrs
    if not known:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return
    defaults = fixed_training(TrainConfig(data=Path("."), out=Path(".")))
    known = {**known, "training": {**defaults, **known.get("training", {})}}
    differ = differences(known, identity, "study")
    if differ:
        raise InputError(f"study {study.study_name} was started with other settings "
                         f"({'; '.join(differ)})")


# ---------------------------------------------------------------------------- folds


def inner_folds(settings: TuneSettings) -> tuple[Splits, list[tuple[list[Pair], list[Pair]]]]:
    """The splits (`splits.folder_splits`: from `settings.splits`, OUT/splits.json or the
    seed) and the (train, val) pairs of each inner fold of their first outer fold."""
    from meshseg.benchmark.splits import SPLITS_FILE, fold_pairs, folder_splits
    from meshseg.training.data import load_dataset

    pairs = load_dataset(settings.data)
    splits = folder_splits(pairs, settings.out / SPLITS_FILE, settings.splits,
                           seed=settings.seed)
    return splits, [fold_pairs(splits, pairs, OUTER_FOLD, inner)
                    for inner in range(len(splits.folds[OUTER_FOLD].val))]


# ---------------------------------------------------------------------------- trials


def trial_dir(settings: TuneSettings, number: int) -> Path:
    """OUT/<study>/trial-NNNN: trial numbers are unique within a study, on every machine."""
    return settings.out / settings.study / f"trial-{number:04d}"


@dataclass
class Objective:
    """Trains one trial's inner folds; the first fold's epochs feed the pruner."""

    settings: TuneSettings
    folds: list[tuple[list[Pair], list[Pair]]]

    def __call__(self, trial: optuna.Trial) -> float:
        from meshseg.training.data import write_manifest
        from meshseg.training.train import fit

        tuned = suggest(trial, tunes_channels(self.settings.fixed))
        folder = trial_dir(self.settings, trial.number)
        trial.set_user_attr("folder", str(folder.absolute()))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("train_settings", best_settings(self.settings, tuned))
        scores = []
        for inner, (train_pairs, val_pairs) in enumerate(self.folds, start=1):
            run = folder / f"inner-{inner}"
            make_folder(run)
            write_manifest(train_pairs, run / "train.csv")
            write_manifest(val_pairs, run / "val.csv")
            config = self.settings.train_config(run / "train.csv", run / "val.csv", run, tuned)
            rows: list[dict] = []
            fit(config, on_epoch=_Reporter(trial, rows) if inner == 1 else rows.append)
            scores.append(rows[-1]["best_val_dice"])
            trial.set_user_attr("inner_dice", scores)
        return sum(scores) / len(scores)


@dataclass
class _Reporter:
    """`fit`'s on_epoch for the first inner fold: report the epoch's Dice, stop if pruned.

    It runs after the epoch's state is on disk, so raising TrialPruned here leaves a
    complete, resumable run folder behind.
    """

    trial: optuna.Trial
    rows: list[dict]

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        self.trial.report(row["val_dice"], row["epoch"])
        if self.trial.should_prune():
            raise import_optuna().TrialPruned(f"pruned after epoch {row['epoch']} of inner "
                                              "fold 1")


def best_settings(settings: TuneSettings, tuned: dict[str, Any]) -> dict[str, Any]:
    """The training settings of a trial as `config.toml` keys, machine-specific ones left
    out: with data and out added they make a complete `meshseg train` configuration."""
    full = settings.train_config(Path("."), Path("."), Path("."), tuned).to_dict()
    keep = (set(settings.fixed) | set(tuned) | {"epochs", "seed"}) - set(MACHINE_FIELDS)
    return {k: v for k, v in full.items() if k in keep}


# ---------------------------------------------------------------------------- reports


TRIAL_COLUMNS = ("number", "state", "value", "epochs_reported", "inner_dice", "channels", "lr",
                 "weight_decay", "background_weight", "pct_start", "seconds", "host", "folder")


def write_reports(settings: TuneSettings, study: optuna.Study) -> tuple[Path | None, Path]:
    """Rewrite trials.csv and best.toml from the storage (every process's trials).

    Returns (best.toml or None while no trial has finished, trials.csv).
    """
    trials = study.get_trials(deepcopy=False)
    trials_file = settings.out / TRIALS_FILE
    write_csv(trials_file, TRIAL_COLUMNS, (_trial_row(t) for t in trials))
    best = _best_trial(trials)
    if best is None:
        return None, trials_file
    best_file = settings.out / BEST_FILE
    with atomic_path(best_file, suffix=".part.toml") as tmp:
        tmp.write_text(best_toml(study.study_name, best), encoding="utf-8")
    return best_file, trials_file


def _trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One line of trials.csv."""
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    return {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
            "epochs_reported": trial.last_step,
            "inner_dice": " ".join(f"{d:.4f}" for d in trial.user_attrs.get("inner_dice", [])),
            **{k: trial.params.get(k) for k in TRIAL_COLUMNS[5:10]},
            "seconds": None if seconds is None else round(seconds, 1),
            "host": trial.user_attrs.get("host"), "folder": trial.user_attrs.get("folder")}


def _best_trial(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The finished trial with the highest objective (pruned and failed ones never count)."""
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def best_toml(study_name: str, trial: optuna.trial.FrozenTrial) -> str:
    """best.toml: the best trial's training settings, with how to use them in comments."""
    train_settings = trial.user_attrs["train_settings"]
    head = (f"# meshseg tune, study {study_name}: best trial {trial.number}, mean inner-fold "
            f"validation Dice {trial.value:.4f}\n"
            "# config.toml settings without data and out; train with them:\n"
            "# meshseg train --config best.toml --data DATA --out RUN\n"
            f"# or as flags: {' '.join(as_flags(train_settings))}\n")
    return head + tomli_w.dumps(train_settings)


# ---------------------------------------------------------------------------- entry point


def tune(settings: TuneSettings,
         pruner: optuna.pruners.BasePruner | None = None) -> TuneResult:
    """Run `settings.trials` trials of the study (created or joined) and write the reports.

    `pruner` replaces successive halving (tests use it to force pruning).

    Raises:
        InputError: bad settings, data, splits or storage, Optuna missing, or a study
            started with other settings; OutputError: the output folder cannot be written;
            errors of `train.fit` (a CUDA out-of-memory error only fails that trial).
    """
    from meshseg.benchmark.splits import SPLITS_FILE, save_splits

    settings.check()
    import_optuna()
    make_folder(settings.out)
    splits, folds = inner_folds(settings)
    study = open_study(settings, pruner)
    join_study(study, study_identity(settings, folds, tunes_channels(settings.fixed)))
    # only now: a process the study refuses must not replace the study's splits file
    save_splits(splits, settings.out / SPLITS_FILE)
    import torch

    study.optimize(Objective(settings, folds), n_trials=settings.trials,
                   catch=(torch.cuda.OutOfMemoryError,),
                   callbacks=[lambda s, _: write_reports(settings, s)])
    best_file, trials_file = write_reports(settings, study)
    trials = study.get_trials(deepcopy=False)
    best = _best_trial(trials)
    return TuneResult(settings.study, dict(Counter(t.state.name.lower() for t in trials)),
                      best and best.value, best and best.number,
                      best and best.user_attrs["train_settings"], best_file, trials_file)
