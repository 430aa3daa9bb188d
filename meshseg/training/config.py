"""Training settings: one frozen dataclass, its rules, and its config.toml form.

Kept apart from train.py (and free of torch) so the command line can build its
options from these fields without importing torch.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from meshseg import archs
from meshseg.errors import InputError
from meshseg.io import atomic_path

ACTIVATION_NAMES = ("elu", "relu")  # those meshseg.models.meshnet.ACTIVATIONS builds

PATH_FIELDS = ("data", "out", "val_data", "cache", "init")
# Settings that may differ between the machines sharing a tune study or a cv results folder,
# and that stay out of tune's best.toml.
MACHINE_FIELDS = ("device", "num_workers", "cache", "threads")


def _help(text: str, default: Any = None) -> Any:
    """A dataclass field carrying its one-line help (for the CLI) in metadata["help"]."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; saved as the run's config.toml."""

    data: Path = _help("Training pairs: a .csv manifest (image,mask[,subject,acq]) or a BIDS "
                       "folder with lesion masks under derivatives/.", MISSING)
    out: Path = _help("Run folder to create; holds config, metrics, last.pt, best.safetensors.",
                      MISSING)
    val_data: Path | None = _help("Validation pairs (.csv or BIDS folder); default: hold out "
                                  "val_fraction of the training subjects.")
    val_fraction: float = _help("Share of subjects held out for validation without val_data.",
                                0.2)
    architecture: str = _help("Network to train: meshnet, or a baseline that `meshseg arch` "
                              "lists (e.g. segresnet, mednext-s, umamba-bot).", archs.MESHNET)
    channels: int = _help("MeshNet channels per layer (paper: 26; 16 and 5 are smaller).", 26)
    activation: str = _help("MeshNet activation after each batch norm (each convolution "
                            "without batchnorm): relu (paper) or elu.",
                            "relu")
    batchnorm: bool = _help("MeshNet with batch norm after each convolution (paper); false "
                            "builds the norm-folded form of brainchop's models, e.g. to "
                            "fine-tune arc-t2-lesion with init.", True)
    init: Path | None = _help("Start every restart from this meshseg checkpoint's weights "
                              "(fine-tuning) instead of random ones; it must have this run's "
                              "architecture, channels, activation and batchnorm.")
    teacher: str | None = _help("Distil from this model (a name `meshseg models list` shows, "
                                "or a path, as predict -m takes it): its lesion probabilities, "
                                "mixed with the masks by teacher_weight, are the training "
                                "targets.")
    teacher_weight: float = _help("Share of the teacher's probabilities in the training "
                                  "targets (0: masks only, 1: teacher only).", 0.5)
    epochs: int = _help("Passes over the training data per restart.", 50)
    lr: float = _help("Peak learning rate of the one-cycle schedule (AdamW).", 1e-3)
    weight_decay: float = _help("AdamW decoupled weight decay.", 3e-5)
    eps: float = _help("AdamW epsilon (large, so half-precision steps stay finite).", 1e-4)
    div_factor: float = _help("One-cycle starting rate is lr / div_factor.", 100.0)
    pct_start: float = _help("Share of all steps spent warming up to lr, then cosine decay.",
                             0.01)
    label_smoothing: float = _help("Cross-entropy label smoothing.", 0.01)
    class_weights: tuple[float, float] = _help("Cross-entropy weights: background (>= 0; the "
                                               "paper searched 0..1), lesion (> 0).",
                                               (0.5, 1.0))
    batch_size: int = _help("Volumes (or crops) per optimisation step.", 1)
    restarts: int = _help("Independent re-initialisations; the best validation Dice is kept.", 1)
    seed: int = _help("Seed of the split, initialisations and sampling (CPU runs repeat "
                      "exactly).", 0)
    device: str = _help("auto, cpu, cuda or cuda:N; auto picks CUDA when present.", "auto")
    amp: bool | None = _help("Half precision (autocast + GradScaler); default on CUDA only.")
    checkpointing: bool = _help("Recompute each block during backward: far less memory, "
                                "each block runs forward twice.", False)
    freeze_norms: bool = _help("Fine-tuning (needs init): keep the batch-norm statistics of the "
                               "init checkpoint, so training normalises each crop exactly as "
                               "inference will, instead of by the statistics of one crop.",
                               False)
    crop: int | None = _help("Train on random crop^3 patches (CPU); default whole volumes. "
                             "Validation then uses one fixed crop over lesion per volume.")
    crop_lesion_p: float = _help("Probability that a training crop is placed over lesion.", 0.5)
    intensity_aug: bool = _help("Randomly vary contrast (gamma 0.7-1.5) and brightness (x0.7-1.4, "
                                "clipped) of each training sample.", False)
    val_whole: bool = _help("MeshNet with crop: validate on whole volumes, as predict sees "
                            "them, instead of one crop per volume (slower; keeps the "
                            "checkpoint that works on whole heads).", False)
    flip_lr: bool = _help("Randomly mirror the hemispheres (left-right) during training.", False)
    downsample: int = _help("Block-average volumes by this factor (2 -> 128^3, 2 mm) for quick "
                            "experiments; such a model expects downsampled input.", 1)
    steps_per_epoch: int | None = _help("Batches per epoch; default one pass over the pairs.")
    keep_epochs: bool = _help("Also keep each epoch's weights (epochs/rR-eE.safetensors), so a "
                              "checkpoint can be chosen afterwards on real scans rather than "
                              "on validation Dice.", False)
    num_workers: int = _help("Data-loading worker processes (0: load in the main process).", 0)
    cache: Path | None = _help("Folder of conformed volumes shared by runs; default "
                               "~/.cache/meshseg/conformed.")
    threads: int | None = _help("CPU threads of the main process (e.g. $SLURM_CPUS_PER_TASK "
                                "on a shared node); default PyTorch's choice, one per core.")

    def to_dict(self) -> dict[str, Any]:
        """TOML-safe form: paths as strings, tuples as lists, None settings left out."""
        out = {}
        for key, value in asdict(self).items():
            if value is not None:
                out[key] = (str(value) if key in PATH_FIELDS
                            else list(value) if isinstance(value, tuple) else value)
        return out

    def resolved(self) -> TrainConfig:
        """This config with every path absolute (a teacher given as a path too), as a run
        saves it."""
        teacher = self.teacher
        if teacher is not None and Path(teacher).exists():
            teacher = str(Path(teacher).resolve())
        return replace(self, teacher=teacher, **{k: getattr(self, k).resolve()
                                                 for k in PATH_FIELDS
                                                 if getattr(self, k) is not None})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; missing settings take their defaults.

        Raises:
            InputError: unknown settings, or data/out missing.
        """
        check_names(d)
        if "data" not in d or "out" not in d:
            raise InputError("training settings need both data and out")
        values = {k: Path(v) if k in PATH_FIELDS else v for k, v in d.items()}
        if isinstance(values.get("class_weights"), list):
            values["class_weights"] = tuple(values["class_weights"])
        return cls(**values)

    def check(self) -> None:
        """Refuse settings that cannot train.

        Raises:
            InputError: the first setting that breaks its rule, named with its value.
        """
        for name, ok, rule in _RULES:
            value = getattr(self, name)
            if not ok(value):
                raise InputError(f"training setting {name}={value!r}: must be {rule}")
        arch = archs.get(self.architecture)  # an unknown name is refused with the known ones
        arch.check_size(self.input_side(), "training setting crop" if self.crop else
                        f"training volume side (downsample {self.downsample})")
        if self.val_whole and (self.crop is None or arch.name != archs.MESHNET):
            raise InputError("training setting val_whole=True: needs crop and architecture "
                             f"meshnet (baselines validate in their window), not "
                             f"{arch.name} with crop={self.crop}")
        if self.teacher is not None and self.downsample > 1:
            raise InputError(f"training setting teacher={self.teacher!r}: the teacher runs on "
                             f"full-resolution volumes, not with downsample={self.downsample}")
        if self.freeze_norms and self.init is None:
            raise InputError("training setting freeze_norms=True: needs init (the checkpoint "
                             "whose batch-norm statistics to keep)")
        if self.checkpointing and arch.name != archs.MESHNET:
            raise InputError(f"training setting checkpointing=True: layer checkpointing is for "
                             f"MeshNet only, not architecture {arch.name}")

    def input_side(self) -> int:
        """Side of the cubes the network trains on: the crop, else the (downsampled) volume."""
        from meshseg.pipeline.conform import CONFORMED_SHAPE

        return self.crop or CONFORMED_SHAPE[0] // self.downsample

    def network_options(self) -> dict[str, Any]:
        """What `archs.build` needs besides the name; saved with the checkpoint."""
        return archs.options_for(self.architecture, self.channels, self.activation,
                                 self.input_side(), self.batchnorm)


def check_names(names: Iterable[str]) -> None:
    """Refuse names that are not TrainConfig settings (a typo would otherwise be ignored).

    Raises:
        InputError: listing the unknown names.
    """
    unknown = sorted(set(names) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise InputError(f"unknown training settings: {', '.join(unknown)}")


def differences(old: dict[str, Any], new: dict[str, Any], holder: str,
                prefix: str = "") -> list[str]:
    """'key: <holder> has A, this call B' for each differing entry, nested keys dotted: what
    a one-line refusal to continue with other settings names."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, holder, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {holder} has {a!r}, this call {b!r}")
    return found


def flag(name: str) -> str:
    """The `meshseg train` flag of a setting: lr -> --lr, class_weights -> --class-weights."""
    return "--" + name.replace("_", "-")


def as_flags(settings: dict[str, Any]) -> list[str]:
    """Settings (config.toml form) as `meshseg train` flags; floats keep every digit."""
    flags = []
    for key, value in settings.items():
        if isinstance(value, bool):
            flags.append(flag(key) if value else f"--no-{flag(key)[2:]}")
        else:
            flags += [flag(key), *map(str, value if isinstance(value, list) else [value])]
    return flags


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data", lambda v: isinstance(v, Path), "a path"),
    ("out", lambda v: isinstance(v, Path), "a path"),
    ("val_data", lambda v: v is None or isinstance(v, Path), "unset or a path"),
    ("cache", lambda v: v is None or isinstance(v, Path), "unset or a path"),
    ("init", lambda v: v is None or isinstance(v, Path), "unset or a path"),
    ("val_fraction", lambda v: _number(v) and 0 < v < 1, "between 0 and 1"),
    ("channels", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("activation", lambda v: v in ACTIVATION_NAMES, f"one of {', '.join(ACTIVATION_NAMES)}"),
    ("teacher", lambda v: v is None or (isinstance(v, str) and v != ""),
     "unset or a model name or path"),
    ("teacher_weight", lambda v: _number(v) and 0 <= v <= 1, "between 0 and 1"),
    ("epochs", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("lr", lambda v: _number(v) and v > 0, "> 0"),
    ("weight_decay", lambda v: _number(v) and v >= 0, ">= 0"),
    ("eps", lambda v: _number(v) and v > 0, "> 0"),
    ("div_factor", lambda v: _number(v) and v >= 1, ">= 1"),
    ("pct_start", lambda v: _number(v) and 0 <= v <= 1, "between 0 and 1"),
    ("label_smoothing", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    ("class_weights", lambda v: isinstance(v, tuple) and len(v) == 2 and all(map(_number, v))
     and v[0] >= 0 and v[1] > 0, "two numbers, background >= 0 and lesion > 0"),
    ("batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("restarts", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("seed", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("amp", lambda v: v is None or isinstance(v, bool), "true, false or unset"),
    ("batchnorm", lambda v: isinstance(v, bool), "true or false"),
    ("checkpointing", lambda v: isinstance(v, bool), "true or false"),
    ("freeze_norms", lambda v: isinstance(v, bool), "true or false"),
    ("crop", lambda v: v is None or (_int(v) and v >= 1), "unset or an integer >= 1"),
    ("crop_lesion_p", lambda v: _number(v) and 0 <= v <= 1, "between 0 and 1"),
    ("flip_lr", lambda v: isinstance(v, bool), "true or false"),
    ("intensity_aug", lambda v: isinstance(v, bool), "true or false"),
    ("val_whole", lambda v: isinstance(v, bool), "true or false"),
    ("downsample", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("steps_per_epoch", lambda v: v is None or (_int(v) and v >= 1), "unset or an integer >= 1"),
    ("keep_epochs", lambda v: isinstance(v, bool), "true or false"),
    ("num_workers", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("threads", lambda v: v is None or (_int(v) and v >= 1), "unset or an integer >= 1"),
)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write config.toml atomically."""
    with atomic_path(path, suffix=".part.toml") as tmp:
        tmp.write_text(tomli_w.dumps(config.to_dict()), encoding="utf-8")


def read_settings(path: Path) -> dict[str, Any]:
    """The settings of a config.toml: a run's, or one without data and out such as tune's
    best.toml. Only their names are checked here; `TrainConfig.check` judges the values.

    Raises:
        InputError: missing, not TOML, or a setting TrainConfig does not have.
    """
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from err
    try:
        check_names(values)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err
    return values


def load_config(path: Path) -> TrainConfig:
    """Read a config.toml written by `save_config`.

    Raises:
        InputError: missing, not TOML, or not training settings.
    """
    values = read_settings(path)
    try:
        return TrainConfig.from_dict(values)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err
