"""Training data: image/mask pairs, their up-front checks, a conformed-volume cache, a Dataset.

Pairs come from a CSV manifest or an ARC-like BIDS folder. Every pair is conformed once
(FreeSurfer's 256^3 1 mm LIA grid, uint8) and cached on disk, so training epochs only read
arrays. The Dataset scales each whole volume to 0..1 exactly as inference does, then
optionally downsamples, crops and flips it; its randomness comes only from its seed and
the key it is indexed with, so the same seed gives the same samples in any worker.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from meshseg.errors import InputError, OutputError
from meshseg.io import (
    GRID_ATOL_MM,
    Volume,
    atomic_path,
    bids_entities,
    cache_home,
    is_nifti_path,
    load_volume,
    stem,
    write_csv,
)
from meshseg.models.weights import sha256_file
from meshseg.pipeline.conform import (
    CONFORMED_SHAPE,
    CONFORMED_VOXEL_MM,
    F_HIGH,
    HISTOGRAM_BINS,
    ConformRecord,
    conform,
    to_conformed,
    to_unit_range,
)

logger = logging.getLogger(__name__)

# Bump when the cached arrays would change for the same input files (conform or mask rules).
CACHE_FORMAT = 2  # 2: masks resampled exactly as their image (conform.to_conformed)
MASK_THRESHOLD = 0.5
LR_AXIS = 0  # conformed LIA order: axis i runs right -> left
ENTITY_KEYS_TO_MATCH = ("acq", "ce", "rec", "run")
SEQUENCE_NAME = re.compile(r"\*?([A-Za-z]+)")


@dataclass(frozen=True)
class Pair:
    """One training example: a T2w scan, its binary lesion mask (same grid), who and how."""

    image: Path
    mask: Path
    subject: str
    acq: str | None = None

    def to_dict(self) -> dict[str, str]:
        """JSON/TOML-safe form; a missing acq is left out."""
        out = {"image": str(self.image), "mask": str(self.mask), "subject": self.subject}
        return out if self.acq is None else {**out, "acq": self.acq}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Pair:
        """Inverse of `to_dict`."""
        return cls(Path(d["image"]), Path(d["mask"]), d["subject"], d.get("acq"))


# ---------------------------------------------------------------------------- discovery


def read_manifest(csv_path: Path) -> list[Pair]:
    """Pairs listed in a CSV with columns image, mask and optionally subject, acq.

    Relative paths are relative to the CSV's folder. A missing subject is taken from the
    image name's sub- entity, else the image name itself (each row its own subject); a
    missing acq from the image name's acq- entity. Files are not opened: `check_pairs` does.

    Raises:
        InputError: the CSV is unreadable, lacks the image/mask columns, has an empty cell
            in them, or lists no rows.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{csv_path}: cannot read manifest ({err})") from err
    if not rows:
        raise InputError(f"{csv_path}: manifest lists no image/mask pairs")
    if not {"image", "mask"} <= set(columns):
        raise InputError(f"{csv_path}: manifest needs columns image and mask "
                         f"(found {', '.join(str(c) for c in columns)})")
    pairs = []
    for line, row in enumerate(rows, start=2):
        image, mask = ((row.get(key) or "").strip() for key in ("image", "mask"))
        if not image or not mask:
            raise InputError(f"{csv_path}: line {line}: empty image or mask cell")
        image_path = csv_path.parent / image
        entities = bids_entities(image_path)
        pairs.append(Pair(
            image=image_path,
            mask=csv_path.parent / mask,
            subject=(row.get("subject") or "").strip() or _subject_of(image_path, entities),
            acq=(row.get("acq") or "").strip() or entities.get("acq"),
        ))
    return pairs


def write_manifest(pairs: Sequence[Pair], path: Path) -> Path:
    """Write `pairs` as a manifest `read_manifest` reads back (image, mask, subject, acq),
    atomically; absolute paths, so it works wherever it is moved or read from."""
    return write_csv(path, ("image", "mask", "subject", "acq"),
                     ({"image": p.image.absolute(), "mask": p.mask.absolute(),
                       "subject": p.subject, "acq": p.acq or ""} for p in pairs))


def _subject_of(image: Path, entities: dict[str, str]) -> str:
    """sub- label when the name has one, else the name: keeps a subject's sessions together."""
    return f"sub-{entities['sub']}" if "sub" in entities else stem(image)


def find_bids_pairs(root: Path) -> list[Pair]:
    """Pair every lesion mask under ``root/derivatives`` with its T2w scan (ARC layout).

    Recognised:
        scans: ``root/sub-*/[ses-*/]anat/*_T2w.nii[.gz]``;
        masks: any ``*.nii[.gz]`` below ``root/derivatives/`` (any pipeline folder, e.g.
            ``lesion_masks``) whose name has a sub- entity and contains "lesion", e.g.
            ``sub-X_ses-Y_acq-spc3_run-7_T2w_desc-lesion_mask.nii.gz`` or
            ``sub-X_label-lesion_roi.nii.gz``.
    A mask goes with the scan of the same subject and session whose acq, ce, rec and run
    entities agree with the mask's (entities the mask lacks match anything). Scans
    without a mask are not training data and are only counted in the log. The acquisition
    is the scan's acq- entity, else derived from its JSON sidecar (`sidecar_acq`).

    Raises:
        InputError: no scans or no masks, or a mask matching no scan or several scans.
    """
    root = Path(root)
    scans = sorted(p for pattern in ("sub-*/anat/*_T2w.nii*", "sub-*/ses-*/anat/*_T2w.nii*")
                   for p in root.glob(pattern) if is_nifti_path(p))
    masks = sorted(p for p in (root / "derivatives").rglob("sub-*")
                   if is_nifti_path(p) and "lesion" in p.name.lower()
                   and "sub" in bids_entities(p))
    if not scans:
        raise InputError(f"{root}: no T2w scans found (expected sub-*/[ses-*/]anat/*_T2w.nii.gz)")
    if not masks:
        raise InputError(f"{root}: no lesion masks found below {root / 'derivatives'}")
    pairs, problems = [], []
    for mask in masks:
        matches = _matching_scans(mask, scans)
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches) or "none"
            problems.append(f"{mask}: needs exactly one matching T2w scan (found {found})")
            continue
        entities = bids_entities(matches[0])
        pairs.append(Pair(matches[0], mask, f"sub-{entities['sub']}",
                          entities.get("acq") or sidecar_acq(matches[0])))
    if problems:
        raise InputError(f"{len(problems)} unmatched lesion mask(s): {'; '.join(problems)}")
    logger.info("%s: %d scan/mask pairs; %d T2w scans without a lesion mask", root, len(pairs),
                len(scans) - len({p.image for p in pairs}))
    return pairs


def _matching_scans(mask: Path, scans: Sequence[Path]) -> list[Path]:
    """Scans of the mask's subject and session whose acq/ce/rec/run agree with the mask's."""
    want = bids_entities(mask)
    found = []
    for scan in scans:
        have = bids_entities(scan)
        if have.get("sub") != want["sub"] or have.get("ses") != want.get("ses"):
            continue
        if all(have[k] == want[k] for k in ENTITY_KEYS_TO_MATCH if k in have and k in want):
            found.append(scan)
    return found


def sidecar_acq(scan: Path) -> str | None:
    """Acquisition label from the scan's JSON sidecar (``<name>.json`` beside it), or None.

    The Siemens sequence name's leading letters (``*spc_282ns`` -> spc, ``*tse2d1_11`` -> tse),
    else ProtocolName, plus ``p<R>`` for in-plane parallel acceleration R > 1 (like ARC's
    ``acq-spc3p2``). Sidecars inherited from parent folders are not read.
    """
    sidecar = scan.with_name(stem(scan) + ".json")
    try:
        fields = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict):
        return None
    name = SEQUENCE_NAME.match(str(fields.get("SequenceName", "")))
    label = name.group(1).lower() if name else str(fields.get("ProtocolName", "")).strip()
    factor = fields.get("ParallelReductionFactorInPlane")
    if isinstance(factor, (int, float)) and factor > 1:
        label += f"p{factor:g}"
    return label or None


def load_dataset(spec: Path) -> list[Pair]:
    """Pairs from a ``.csv`` manifest or a BIDS folder.

    Raises:
        InputError: `spec` is missing or neither a .csv file nor a folder, or see
            `read_manifest` / `find_bids_pairs`.
    """
    spec = Path(spec)
    if spec.is_dir():
        return find_bids_pairs(spec)
    if not spec.exists():
        raise InputError(f"{spec}: no such file or folder")
    if spec.suffix.lower() != ".csv":
        raise InputError(f"{spec}: expected a .csv manifest or a BIDS folder")
    return read_manifest(spec)


def check_pairs(pairs: Sequence[Pair]) -> list[str]:
    """Every problem that would spoil training, one line each naming the file.

    Missing or unreadable files, a scan listed twice, a mask on a different grid (shape or
    affine) than its scan, a mask with values other than 0 and 1. Reads every file.
    """
    problems, seen = [], set()
    for pair in pairs:
        if pair.image in seen:
            problems.append(f"{pair.image}: listed more than once")
        seen.add(pair.image)
        try:
            image, mask = load_volume(pair.image), load_volume(pair.mask)
        except InputError as err:
            problems.append(str(err))
            continue
        if image.data.shape != mask.data.shape:
            problems.append(f"{pair.mask}: shape {mask.data.shape} differs from its scan "
                            f"{pair.image.name} {image.data.shape}")
        elif not np.allclose(image.affine, mask.affine, rtol=0, atol=GRID_ATOL_MM):
            problems.append(f"{pair.mask}: affine differs from its scan {pair.image.name} "
                            "(not on the same grid)")
        if not np.all((mask.data == 0) | (mask.data == 1)):
            problems.append(f"{pair.mask}: mask is not binary (values other than 0 and 1)")
    return problems


def split_by_subject(pairs: Sequence[Pair], val_fraction: float,
                     seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded train/validation split that keeps all sessions of a subject on one side.

    At least one subject goes to each side.

    Raises:
        InputError: fewer than two subjects.
    """
    subjects = sorted({p.subject for p in pairs})
    if len(subjects) < 2:
        raise InputError(f"need at least two subjects to hold some out for validation, "
                         f"found {len(subjects)}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, round(val_fraction * len(subjects))))
    held_out = {subjects[i] for i in order[:n_val]}
    return ([p for p in pairs if p.subject not in held_out],
            [p for p in pairs if p.subject in held_out])


# ---------------------------------------------------------------------------- conforming


def mask_to_conformed(mask: Volume, record: ConformRecord) -> np.ndarray:
    """Resample a binary mask onto the conformed grid its scan was put on, as uint8 0/1.

    Resampled exactly as the image was (`conform.to_conformed`), then > 0.5.
    """
    resampled = to_conformed(mask.data.astype(np.float32), mask.affine, record)
    return (resampled > MASK_THRESHOLD).astype(np.uint8)


def conform_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 conformed scan, uint8 0/1 conformed mask), both (256, 256, 256) in LIA order."""
    image, record = conform(load_volume(pair.image))
    return image, mask_to_conformed(load_volume(pair.mask), record)


def default_cache_dir() -> Path:
    """``conformed/`` in meshseg's cache folder (`io.cache_home`): shared by runs."""
    return cache_home() / "conformed"


class ConformedCache:
    """Conformed (scan, mask) arrays on disk, keyed by file content and conform settings.

    An entry is one ``<key>.npy`` of shape (2, 256, 256, 256) uint8 (scan, mask), written
    atomically, so a killed run never leaves half an entry and later runs share entries.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._digests: dict[tuple[str, int, int], str] = {}

    @staticmethod
    def settings() -> dict[str, object]:
        """Everything besides the files' bytes that decides the cached arrays."""
        return {"format": CACHE_FORMAT, "shape": list(CONFORMED_SHAPE),
                "voxel_mm": CONFORMED_VOXEL_MM, "f_high": F_HIGH, "bins": HISTOGRAM_BINS,
                "mask_threshold": MASK_THRESHOLD}

    def key(self, pair: Pair) -> str:
        """sha256 over both files' sha256 and the settings."""
        text = json.dumps([self._digest(pair.image), self._digest(pair.mask), self.settings()],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _digest(self, path: Path) -> str:
        """Content sha256, remembered per (path, size, mtime) so epochs don't re-hash."""
        try:
            stat = path.stat()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = sha256_file(path)
        return self._digests[memo]

    def entry(self, pair: Pair) -> Path:
        """Path of the pair's cached array, conforming and writing it on a miss.

        Raises:
            InputError: a file cannot be read; OutputError: the cache cannot be written.
        """
        path = self.folder / f"{self.key(pair)}.npy"
        if path.exists():
            logger.debug("cache hit %s for %s", path.name, pair.image)
            return path
        logger.info("conforming %s", pair.image)
        image, mask = conform_pair(pair)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{self.folder}: cannot create cache ({err.strerror})") from err
        with atomic_path(path, suffix=".part.npy") as tmp:
            np.save(tmp, np.stack([image, mask]))
        return path

    def get(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 conformed scan, uint8 0/1 conformed mask), from disk when cached."""
        stacked = np.load(self.entry(pair))
        return stacked[0], stacked[1]


# ---------------------------------------------------------------------------- dataset


def downsample(image: np.ndarray, mask: np.ndarray,
               factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means over factor^3 voxels; a mask voxel stays lesion when >= half was lesion.

    Every dimension must be a multiple of `factor` (`LesionDataset` checks up front).
    """
    both = torch.from_numpy(np.stack([image, mask], dtype=np.float32))  # 2 channels, (D, H, W)
    small = F.avg_pool3d(both, factor).numpy()
    return small[0], (small[1] >= MASK_THRESHOLD).astype(np.uint8)


def crop_start(shape: Sequence[int], size: int, mask: np.ndarray, lesion_p: float,
               rng: np.random.Generator) -> tuple[int, ...]:
    """Corner of a size^3 crop: with probability lesion_p around a random lesion voxel
    (anywhere in the crop), else uniform; uniform too when the mask is empty."""
    want_lesion = rng.random() < lesion_p
    voxels = np.flatnonzero(mask) if want_lesion else np.empty(0, dtype=np.intp)
    if voxels.size == 0:
        return tuple(int(rng.integers(0, n - size + 1)) for n in shape)
    centre = np.unravel_index(voxels[rng.integers(voxels.size)], tuple(shape))
    return tuple(int(rng.integers(max(0, c - size + 1), min(c, n - size) + 1))
                 for c, n in zip(centre, shape))


def _check_sampling(shape: Sequence[int], crop: int | None, factor: int) -> None:
    """Refuse a downsampling factor or crop that does not fit a (D, H, W) volume.

    Raises:
        InputError: a dimension is not a multiple of `factor`, or the crop is larger than
            the downsampled volume.
    """
    if factor < 1 or any(n % factor for n in shape):
        raise InputError(f"downsample {factor}: volume shape {tuple(shape)} is not a multiple")
    side = min(shape) // factor
    if crop is not None and not 1 <= crop <= side:
        raise InputError(f"crop {crop}: must be between 1 and the volume side {side}")


GAMMA_RANGE = (0.7, 1.5)  # contrast: unit-range intensity u becomes u ** gamma
SCALE_RANGE = (0.7, 1.4)  # brightness: where the scan's robust maximum fell, clipped as conform


def vary_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random contrast (gamma, log-uniform) and brightness (scale, clipped to 1) of a
    0..1 image.

    Where the brain lands in 0..1 depends on the brightest 0.1% of the head (fat, eyes, CSF),
    so it varies from scan to scan; a model trained without this variation learned an
    absolute level and marked whole heads as lesion when they came out brighter.
    """
    gamma = math.exp(rng.uniform(*np.log(GAMMA_RANGE)))
    scale = rng.uniform(*SCALE_RANGE)
    return np.minimum(np.power(image, gamma, dtype=np.float32) * np.float32(scale), 1.0)


TEACHER_LEVELS = 255  # teacher probabilities are cached as uint8 steps of 1/255: 16 MiB each


def soft_target(mask: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    """Class probabilities (2, ...) float32: (1 - weight) x the one-hot mask + weight x the
    teacher's (background, lesion) probabilities (`teacher` in uint8 steps of 1/TEACHER_LEVELS)."""
    lesion = (np.float32(1 - weight) * (mask == 1)
              + np.float32(weight / TEACHER_LEVELS) * teacher.astype(np.float32))
    return np.stack([1 - lesion, lesion])


class LesionDataset(Dataset):
    """Cached conformed pairs as (image float32 (1, D, H, W) 0..1, mask int64 (D, H, W)).

    Per sample: the whole scan is scaled to 0..1 with `to_unit_range` (as at inference),
    then downsampled by `downsample` (block mean; 2 gives 128^3), cropped to crop^3 if
    `crop` is set, and flipped left-right with probability 0.5 if `flip_lr` (strokes
    occur in either hemisphere, so a mirrored brain is a plausible brain; other axes are
    not flipped because anatomy is not up-down or front-back symmetric). With
    `intensity_aug` each training draw also gets a random contrast and brightness
    (`vary_intensity`).

    With `teacher` (one cached teacher probability file per pair, see `meshseg.distill`),
    the target is not the mask but class probabilities (2, D, H, W): the mask mixed with the
    teacher's probabilities by `teacher_weight`, cropped and flipped with the image.

    Randomness: ``ds[i]`` always gives the same sample for a given seed (validation);
    ``ds[(i, draw)]`` gives a different random crop/flip per draw (training). The
    generator is seeded from (seed, i[, draw]) only, so results do not depend on workers.
    """

    def __init__(self, pairs: Sequence[Pair], cache: ConformedCache, *, crop: int | None = None,
                 lesion_p: float = 0.5, flip_lr: bool = False, intensity_aug: bool = False,
                 downsample: int = 1, seed: int = 0, teacher: Sequence[Path] | None = None,
                 teacher_weight: float = 0.0) -> None:
        self.pairs = list(pairs)
        self.teacher, self.teacher_weight = teacher, teacher_weight
        self.entries = [cache.entry(pair) for pair in self.pairs]
        self.crop, self.lesion_p, self.flip_lr = crop, lesion_p, flip_lr
        self.intensity_aug = intensity_aug
        self.downsample, self.seed = downsample, seed
        for entry in self.entries:
            _check_sampling(np.load(entry, mmap_mode="r").shape[1:], crop, downsample)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, *draw = (key,) if isinstance(key, int) else key
        rng = np.random.default_rng([self.seed, index, *draw])
        stacked = np.load(self.entries[index], mmap_mode="r")
        image, mask = to_unit_range(np.asarray(stacked[0])), np.asarray(stacked[1])
        if self.downsample > 1:
            image, mask = downsample(image, mask, self.downsample)
        box = (slice(None),) * 3
        if self.crop is not None:
            start = crop_start(image.shape, self.crop, mask, self.lesion_p, rng)
            box = tuple(slice(s, s + self.crop) for s in start)
            image, mask = image[box], mask[box]
        flip = self.flip_lr and rng.random() < 0.5
        if flip:
            image, mask = np.flip(image, LR_AXIS), np.flip(mask, LR_AXIS)
        if self.intensity_aug and draw:
            image = vary_intensity(image, rng)
        target = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        if self.teacher is not None:
            teacher = np.load(self.teacher[index], mmap_mode="r")[box]
            target = torch.from_numpy(soft_target(
                mask, np.flip(teacher, LR_AXIS) if flip else teacher, self.teacher_weight))
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], target
