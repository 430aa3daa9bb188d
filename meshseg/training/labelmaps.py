"""Synthetic heads of any contrast from real anatomical label maps (SynthSeg-style).

Each head is one label map (e.g. SynthSeg's 20 whole-head maps, 256^3 1 mm LIA: meshseg's
model space) with a real chronic stroke painted in as labels of its own before intensities
are drawn (SynthStroke's idea), so the lesion's intensity does not follow the tissue around
it and the painted lesion is the truth:

1. Lesion shape from a folder of MNI-space masks (a lesion atlas), carried into the map's
   head by an affine estimated from the brain's moments (`mni_affine`), mirrored so that
   synth.LEFT_SHARE of the strokes are left-sided, kept inside brain tissue.
2. Chronic appearance: a fluid cavity lined by a gliotic rim (or gliosis only), and ex-vacuo
   widening of the ventricle on the lesion's side.
3. Labels and lesion deformed together (random affine and a smooth elastic field).
4. A Gaussian intensity per label in the chosen look (`appearance.draw_intensities`), then
   blur, bias field, gamma and noise (`appearance.scanner`).

Every head is determined by its seed and its map; the mask is what was painted.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from meshseg.errors import MeshsegError
from meshseg.io import atomic_path, make_folder, save_array
from meshseg.metrics import ARC_QUARTILES_ML, voxel_ml
from meshseg.progress import track
from meshseg.qc.location import mni152_map
from meshseg.training import appearance
from meshseg.training.synth import draw_atlas_mask, place_mni_mask, smooth_noise

PARENCHYMA = appearance.GREY + appearance.DEEP_GREY + appearance.WHITE
# What a brain extraction keeps: parenchyma, the CSF spaces and the painted lesion
BRAIN = PARENCHYMA + appearance.CSF + (appearance.LESION_CAVITY, appearance.LESION_RIM)
LATERAL_VENTRICLE = {-1.0: 4, 1.0: 43}  # aseg's left and right lateral ventricles, by side


@dataclass(frozen=True)
class LabelMapOptions:
    """What to draw from the label maps: look, lesion source and size range (mL)."""

    lesions: Path | None  # folder of MNI lesion masks; None: healthy heads
    contrast: str = "any"  # t2, flair, t1, or any (a random look per head)
    lesion_ml: tuple[float, float] = (ARC_QUARTILES_ML[0], ARC_QUARTILES_ML[-1])
    cavity_share: float = 0.8  # share of lesions with a fluid cavity (the rest: gliosis only)
    skull_stripped: float = 0.0  # share of heads brain-extracted (zero outside BRAIN), as
    # many public and research scans are


@functools.lru_cache(maxsize=2)
def read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map as int16 labels and its affine (cached: a head re-reads its map)."""
    try:
        img = nib.load(path)
        labels = np.asarray(img.dataobj).round().astype(np.int16)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MeshsegError(f"{path}: unreadable label map ({err})") from err
    if labels.ndim != 3:
        raise MeshsegError(f"{path}: a label map must be 3-D, not of shape {labels.shape}")
    return labels, img.affine


def label_maps(folder: Path) -> list[Path]:
    """The NIfTI label maps of a folder, sorted so a seed always draws the same map."""
    try:
        found = sorted(p for p in Path(folder).iterdir()
                       if p.name.endswith((".nii", ".nii.gz")))
    except OSError as err:
        raise MeshsegError(f"{folder}: cannot read label-map folder "
                           f"({err.strerror or err})") from err
    if not found:
        raise MeshsegError(f"{folder}: no label maps (.nii or .nii.gz files) in it")
    return found


def _moments(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and covariance (mm) of an (n, 3) point cloud."""
    return points.mean(0), np.cov(points.T)


def _sqrtm(c: np.ndarray, power: float) -> np.ndarray:
    """A symmetric positive matrix to the given power (eigendecomposition)."""
    values, vectors = np.linalg.eigh(c)
    return (vectors * values ** power) @ vectors.T


@functools.lru_cache(maxsize=1)
def _mni_brain_moments() -> tuple[np.ndarray, np.ndarray]:
    """Moments of nilearn's MNI152 brain (grey + white matter > 0.5), in MNI mm."""
    gm, wm = mni152_map("gm"), mni152_map("wm")
    brain = (np.asarray(gm.dataobj) + np.asarray(wm.dataobj)) > 0.5
    return _moments(nib.affines.apply_affine(gm.affine, np.argwhere(brain)[::7]))


def mni_affine(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """4x4 map from the label map's world mm to MNI mm, by matching the brain's centroid and
    second moments to the MNI152 brain's (A = C_mni^1/2 C_map^-1/2, symmetric: no rotation
    is invented). Both are world-aligned heads, so this is the affine a registration would
    find to within a few mm, at a fraction of its cost; it needs no intensity image, which a
    label map does not have."""
    parenchyma = np.isin(labels, PARENCHYMA)
    if parenchyma.sum() < 1000:
        raise MeshsegError("label map has almost no brain tissue labels (aseg numbering)")
    mu_map, c_map = _moments(nib.affines.apply_affine(affine, np.argwhere(parenchyma)[::7]))
    mu_mni, c_mni = _mni_brain_moments()
    linear = _sqrtm(c_mni, 0.5) @ _sqrtm(c_map, -0.5)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = mu_mni - linear @ mu_map
    return out


def _place_lesion(rng: np.random.Generator, labels: np.ndarray, affine: np.ndarray,
                  to_mni: np.ndarray, options: LabelMapOptions) -> np.ndarray | None:
    """A real lesion mask (bool, on the label map's grid) drawn from the lesion folder, or
    None where it misses the brain tissue."""
    drawn, mask_affine = draw_atlas_mask(rng, options.lesions, options.lesion_ml)
    placed = place_mni_mask(rng, drawn, mask_affine, to_mni @ affine, labels.shape)
    if placed is None:
        return None
    box, fraction = placed
    core = np.zeros(labels.shape, bool)
    core[box] = (fraction >= 0.5) & np.isin(labels[box], PARENCHYMA)
    return core if core.any() else None


def _paint_chronic(rng: np.random.Generator, labels: np.ndarray, affine: np.ndarray,
                   lesion: np.ndarray, cavity_share: float) -> None:
    """Turn `lesion` into cavity and rim labels, and widen the ipsilateral ventricle toward
    it (ex vacuo), in place."""
    cavity = np.zeros_like(lesion)
    if rng.random() < cavity_share:
        cavity = ndimage.binary_erosion(lesion, iterations=int(rng.integers(1, 4)))
    labels[lesion] = appearance.LESION_RIM
    labels[cavity] = appearance.LESION_CAVITY
    side = -1.0 if nib.affines.apply_affine(affine, np.argwhere(lesion).mean(0))[0] < 0 else 1.0
    ventricle = labels == LATERAL_VENTRICLE[side]
    if not ventricle.any():
        return
    near = ndimage.distance_transform_edt(~lesion) < rng.uniform(15, 35)
    grown = ndimage.binary_dilation(ventricle, iterations=int(rng.integers(1, 4)))
    labels[grown & near & np.isin(labels, PARENCHYMA)] = LATERAL_VENTRICLE[side]


def _deform(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Labels under a random affine (rotation up to 10 degrees, scale 0.9-1.1, shift up to
    8 mm) and a smooth elastic field (up to ~3 mm), nearest-neighbour."""
    shape = np.array(labels.shape, float)
    linear = (Rotation.from_rotvec(rng.uniform(-1, 1, 3) * math.radians(10)).as_matrix()
              @ np.diag(rng.uniform(0.9, 1.1, 3)))
    centre = (shape - 1) / 2
    offset = centre - linear @ centre + rng.uniform(-8, 8, 3)
    grid = np.indices(labels.shape, np.float32).reshape(3, -1)
    coords = (linear.astype(np.float32) @ grid) + offset[:, None].astype(np.float32)
    del grid
    strength = rng.uniform(0, 3)
    for axis in range(3):
        coords[axis] += strength * smooth_noise(rng, labels.shape, max(labels.shape) / 5).ravel()
    out = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return out.reshape(labels.shape)


def draw_label_head(seed: int, map_path: Path, options: LabelMapOptions
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(image float32 0..1, lesion mask uint8, affine, look) of one head from one map."""
    rng = np.random.default_rng(seed)
    labels, affine = read_label_map(Path(map_path))
    labels = labels.copy()
    lesion = None
    to_mni = mni_affine(labels, affine) if options.lesions is not None else None
    for _ in range(5 if options.lesions is not None else 0):  # retry shapes that miss
        lesion = _place_lesion(rng, labels, affine, to_mni, options)
        if lesion is not None:
            break
    if lesion is not None:
        _paint_chronic(rng, labels, affine, lesion, options.cavity_share)
    labels = _deform(rng, labels)
    if rng.random() < options.skull_stripped:
        labels[~np.isin(labels, BRAIN)] = 0
    contrast = options.contrast
    if contrast == "any":
        contrast = str(rng.choice(appearance.CONTRASTS))
    image = appearance.scanner(rng, appearance.draw_intensities(rng, labels, contrast))
    mask = np.isin(labels, (appearance.LESION_CAVITY, appearance.LESION_RIM)).astype(np.uint8)
    return image, mask, affine, contrast


def _write_head(seed: int, map_path: Path, image_path: Path, mask_path: Path,
                options: LabelMapOptions) -> tuple[float, str]:
    """Write one head (uint8 0..255 image, uint8 mask); returns (lesion mL, look)."""
    image, mask, affine, contrast = draw_label_head(seed, map_path, options)
    save_array(np.round(image * 255).astype(np.uint8), affine, image_path)
    save_array(mask, affine, mask_path)
    return float(mask.sum() * voxel_ml(affine)), contrast


def make_label_dataset(folder: Path, maps: Path, n: int, seed: int,
                       options: LabelMapOptions, jobs: int = 1) -> Path:
    """Write n heads (seed k uses map k mod the number of maps) and a manifest.csv
    (image,mask,subject,lesion_ml,contrast); the result does not depend on `jobs`."""
    if options.contrast not in appearance.CONTRASTS:
        raise MeshsegError(f"contrast {options.contrast!r}: one of "
                           f"{', '.join(appearance.CONTRASTS)}")
    if not 0 <= options.skull_stripped <= 1:
        raise MeshsegError(f"skull_stripped {options.skull_stripped}: need a share in 0..1")
    folder = Path(folder)
    make_folder(folder)
    found = label_maps(maps)
    seeds = [seed + k for k in range(n)]
    subjects = [f"lmap{s:05d}" for s in seeds]
    args = (seeds, [found[s % len(found)] for s in seeds],
            [folder / f"{sub}_image.nii.gz" for sub in subjects],
            [folder / f"{sub}_lesion.nii.gz" for sub in subjects], [options] * n)
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(track(pool.map(_write_head, *args), n, "synth"))
    else:
        results = list(track(map(_write_head, *args), n, "synth"))
    rows = ["image,mask,subject,lesion_ml,contrast"] + [
        f"{image.name},{mask.name},{subject},{ml:.3f},{look}"
        for image, mask, subject, (ml, look) in zip(args[2], args[3], subjects, results)]
    manifest = folder / "manifest.csv"
    with atomic_path(manifest) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return manifest
