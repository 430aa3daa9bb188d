"""Synthetic T2-weighted heads with chronic stroke lesions, from nilearn's MNI152 maps.

Used for the example scan, for tests, and to train the bundled model without patient data.
Each head is drawn from a seed: MNI152 (ICBM 2009a) grey matter, white matter and CSF
(brain mask minus both) plus a skull and scalp grown around the brain; T2 contrast with
per-class intensities widened by domain randomisation (as SynthSeg does); a chronic
lesion (a CSF-like cavity with a brighter gliotic rim, in a vascular territory, mostly in one
hemisphere, 0.2 to 360 mL as in ARC) with ex-vacuo widening of the nearby ventricle; a smooth
random deformation and affine; bias field, partial-volume blur and Rician noise; and a scan
grid of random orientation, obliquity and voxel size. Image and mask share that grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from meshseg.io import atomic_path, save_array

PAD_MM = 24  # room around the MNI brain for CSF, skull and scalp
# Vascular territories: centre (MNI mm, left hemisphere; x is mirrored for the right),
# spread (mm) and how often a lesion falls there. MCA dominates in ARC's aphasia cohort.
TERRITORIES = (
    ("mca", (-42.0, -8.0, 12.0), (10.0, 22.0, 14.0), 0.6),
    ("lenticulostriate", (-24.0, 2.0, 6.0), (5.0, 8.0, 6.0), 0.15),
    ("aca", (-8.0, 24.0, 40.0), (4.0, 16.0, 10.0), 0.1),
    ("pca", (-18.0, -76.0, 6.0), (8.0, 10.0, 8.0), 0.15),
)
LEFT_SHARE = 0.8  # aphasia follows left-hemisphere strokes
# ARC's lesion volume quartiles (mL; the paper's voxel-count cut points at 1 mm). Sizes are
# drawn log-uniformly within a quartile chosen at random, so the training data has ARC's
# spread rather than a log-uniform one dominated by tiny lesions.
ARC_QUARTILES_ML = (0.203, 33.619, 67.891, 128.314, 363.885)


@dataclass(frozen=True)
class SynthOptions:
    """What to draw: lesion presence and size range, and the kind of scan grid."""

    lesion: bool = True
    lesion_ml: tuple[float, float] = (ARC_QUARTILES_ML[0], ARC_QUARTILES_ML[-1])
    native_grid: bool = True  # random orientation / voxel size; False: 1 mm, LIA-like axial


@functools.lru_cache(maxsize=1)
def anatomy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue labels, distance outside the brain (mm) and the voxel->MNI affine, padded.

    Labels: 0 outside, 1 CSF, 2 GM, 3 WM (the most probable class inside the brain mask).
    """
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.dataobj, np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    csf = np.clip(brain - gm - wm, 0, 1)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[~brain] = 0
    labels = np.pad(labels, PAD_MM)
    outside = ndimage.distance_transform_edt(labels == 0).astype(np.float32)
    affine = gm_img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, PAD_MM)
    return labels, outside, affine


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], knots: int = 5,
                 terms: int = 4) -> np.ndarray:
    """A smooth random 3-D field scaled to [-1, 1].

    A sum of separable products of smooth random 1-D profiles (cubic through `knots` random
    values): each term costs one multiply-add per voxel, against seconds for upsampling a
    random grid to a whole head volume.
    """
    field = np.zeros(shape, np.float32)
    for _ in range(terms):
        profiles = []
        for size in shape:
            values = rng.uniform(-1, 1, knots)
            profiles.append(ndimage.zoom(values, size / knots, order=3, mode="nearest")[:size]
                            .astype(np.float32))
        field += profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None]
    return field / max(float(np.abs(field).max()), 1e-6)


def lesion_volume_ml(rng: np.random.Generator, limits: tuple[float, float]) -> float:
    """A lesion volume with ARC's quartiles, restricted to `limits` (mL)."""
    quartile = int(rng.integers(4))
    low = max(ARC_QUARTILES_ML[quartile], limits[0])
    high = min(ARC_QUARTILES_ML[quartile + 1], limits[1])
    if low >= high:  # the chosen quartile lies outside the limits: draw within the limits
        low, high = limits
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_lesion(rng: np.random.Generator, labels: np.ndarray, affine: np.ndarray,
                lesion_ml: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(lesion mask, gliotic rim) on the template grid: an irregular blob in a territory."""
    from scipy.spatial.transform import Rotation

    names = [t[0] for t in TERRITORIES]
    weights = np.array([t[3] for t in TERRITORIES])
    name, centre, spread, _ = TERRITORIES[rng.choice(len(names), p=weights / weights.sum())]
    side = -1.0 if rng.random() < LEFT_SHARE else 1.0
    centre_mm = np.array(centre)
    centre_mm[0] = abs(centre_mm[0]) * side
    centre_mm = centre_mm + rng.normal(0, 1, 3) * np.array(spread) * 0.5
    volume_ml = lesion_volume_ml(rng, lesion_ml)
    voxels = int(round(volume_ml * 1000))
    centre_vox = np.linalg.solve(affine, np.append(centre_mm, 1))[:3]
    radius = (3 * voxels / (4 * math.pi)) ** (1 / 3)
    half = int(radius * 2.2) + 8
    lo = np.maximum(np.round(centre_vox).astype(int) - half, 0)
    hi = np.minimum(np.round(centre_vox).astype(int) + half, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.indices([b - a for a, b in zip(lo, hi)], dtype=np.float32)
    offsets = np.stack([g + a - c for g, a, c in zip(grid, lo, centre_vox)])
    # An elongated blob at a random angle, its edge made ragged by smooth noise.
    axes = Rotation.random(random_state=rng).as_matrix() / rng.uniform(0.5, 1.8, 3)[:, None]
    dist = np.sqrt((np.einsum("ij,j...->i...", axes.astype(np.float32), offsets) ** 2).sum(0))
    score = -dist / max(radius, 1.0) + rng.uniform(0.8, 1.6) * smooth_field(rng, dist.shape,
                                                                            knots=7, terms=6)
    inside = labels[box] >= 1
    # Cortical strokes spare the ventricles' CSF; lesions live in GM and WM.
    candidates = inside & (labels[box] >= 2)
    order = np.sort(score[candidates])[::-1]
    if order.size == 0:
        return np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    threshold = order[min(voxels, order.size) - 1]
    blob = candidates & (score >= threshold)
    blob = ndimage.binary_closing(blob, iterations=1) & inside
    lesion = np.zeros(labels.shape, bool)
    lesion[box] = blob
    keep, n = ndimage.label(lesion)
    if n > 1:  # one stroke: keep its largest piece
        sizes = np.bincount(keep.ravel())
        sizes[0] = 0
        lesion = keep == sizes.argmax()
    rim = lesion & ~ndimage.binary_erosion(lesion, iterations=int(rng.integers(1, 3)))
    return lesion, rim


def widen_ventricle(rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray,
                    affine: np.ndarray) -> np.ndarray:
    """Ex-vacuo change: the ventricle on the lesion's side grows in proportion to its size."""
    steps = int(min(4, lesion.sum() / 30000 + rng.uniform(0, 1)))
    if steps == 0:
        return labels
    # The template grid is axis-aligned RAS, so a box in mm is a box of indices.
    side = np.sign(affine[0, 0] * np.argwhere(lesion)[:, 0].mean() + affine[0, 3])
    low = np.array([0.0 if side > 0 else -30.0, -45.0, -5.0])
    box = tuple(slice(int(a), int(b)) for a, b in zip(
        np.linalg.solve(affine[:3, :3], low - affine[:3, 3]),
        np.linalg.solve(affine[:3, :3], low + [30.0, 75.0, 40.0] - affine[:3, 3])))
    ventricle = np.zeros(labels.shape, bool)
    ventricle[box] = labels[box] == 1
    region = tuple(slice(max(b.start - steps, 0), b.stop + steps) for b in box)
    grown = ndimage.binary_dilation(ventricle[region], iterations=steps) & (labels[region] >= 2)
    out = labels.copy()
    out[region][grown] = 1
    return out


def tissue_image(rng: np.random.Generator, labels: np.ndarray, outside: np.ndarray,
                 lesion: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """T2-weighted intensities on the template grid, before deformation and scanning."""
    # Means keep T2 ordering (CSF > GM > WM; fat bright, bone dark) but vary widely.
    csf = rng.uniform(0.8, 1.0)
    gm = csf * rng.uniform(0.4, 0.65)
    wm = gm * rng.uniform(0.6, 0.9)
    scalp = rng.uniform(0.3, 0.8)
    bone = rng.uniform(0.0, 0.12)
    thick = 1.0 + 0.3 * smooth_field(rng, labels.shape)
    shell_csf = outside <= rng.uniform(1.5, 3.5) * thick
    skull = (outside <= rng.uniform(6.5, 9.0) * thick) & ~shell_csf
    head = (outside <= rng.uniform(12.0, 17.0) * thick) & ~shell_csf & ~skull
    image = np.zeros(labels.shape, np.float32)
    for mask, mean in ((labels == 1, csf), (labels == 2, gm), (labels == 3, wm),
                       (shell_csf & (labels == 0), csf * 0.9), (skull, bone), (head, scalp)):
        image[mask] = mean * (1 + rng.normal(0, 0.03, int(mask.sum()))).astype(np.float32)
    image[lesion] = csf * rng.uniform(0.8, 1.0)
    image[rim] = (gm + csf) / 2 * rng.uniform(0.9, 1.2)
    return image


def scan_grid(rng: np.random.Generator, native: bool) -> tuple[tuple[int, int, int], np.ndarray]:
    """A scanner grid around the head: orientation, obliquity and voxel size vary if native."""
    from scipy.spatial.transform import Rotation

    if native:
        zooms = np.array([rng.uniform(0.8, 1.2)] * 2 + [rng.choice([1.0, 1.0, 2.0, 3.0, 5.0])])
        axes = rng.permutation(3)
        flips = rng.choice([-1.0, 1.0], 3)
        rotation = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    else:
        zooms, axes, flips, rotation = np.ones(3), np.array([0, 2, 1]), np.array(
            [-1.0, -1.0, 1.0]), np.eye(3)
    base = np.eye(3)[:, axes] * flips
    linear = rotation @ base @ np.diag(zooms)
    fov_mm = np.array([220.0, 250.0, 220.0])[axes] * rng.uniform(1.0, 1.1)
    shape = tuple(int(math.ceil(f / z)) for f, z in zip(fov_mm, zooms))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.array(shape) / 2) + rng.normal(0, 5, 3) + [0, -18, 8]
    return shape, affine


def synth_head(seed: int, options: SynthOptions = SynthOptions()
               ) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(T2-weighted image, lesion mask) on one scan grid, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    labels, outside, template_affine = anatomy()
    if options.lesion:
        lesion, rim = draw_lesion(rng, labels, template_affine, options.lesion_ml)
        labels = widen_ventricle(rng, labels, lesion, template_affine)
    else:
        lesion = rim = np.zeros(labels.shape, bool)
    image = tissue_image(rng, labels, outside, lesion, rim)
    shape, affine = scan_grid(rng, options.native_grid)
    coords = _sample_points(rng, shape, affine, template_affine, labels.shape)
    blur = 0.4 * float(np.mean(np.sqrt((affine[:3, :3] ** 2).sum(0))))
    warped = ndimage.map_coordinates(ndimage.gaussian_filter(image, blur), coords, order=1,
                                     cval=0.0, output=np.float32).reshape(shape)
    mask = _warp_mask(lesion, coords, shape)
    warped *= np.exp(0.25 * smooth_field(rng, shape))  # bias field
    sigma = rng.uniform(0.01, 0.04)
    noise = rng.normal(0, sigma, (2, *shape)).astype(np.float32)
    warped = np.sqrt((warped + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    scanner = (warped * rng.uniform(500, 2000)).astype(np.float32)
    return nib.Nifti1Image(scanner, affine), nib.Nifti1Image(mask.astype(np.uint8), affine)


def _warp_mask(lesion: np.ndarray, coords: np.ndarray, shape: tuple[int, int, int]
               ) -> np.ndarray:
    """The lesion on the scan grid (linear, > 0.5), sampled only near the lesion for speed."""
    mask = np.zeros(int(np.prod(shape)), bool)
    if lesion.any():
        found = np.argwhere(lesion)
        lo, hi = found.min(0) - 2, found.max(0) + 2
        near = np.all((coords >= lo[:, None]) & (coords <= hi[:, None]), axis=0)
        mask[near] = ndimage.map_coordinates(lesion.astype(np.float32), coords[:, near],
                                             order=1) > 0.5
    return mask.reshape(shape)


def _sample_points(rng: np.random.Generator, shape: tuple[int, int, int], affine: np.ndarray,
                   template_affine: np.ndarray, template_shape: tuple[int, ...]) -> np.ndarray:
    """Template voxel coordinates of every scan voxel: random affine plus smooth warp."""
    from scipy.spatial.transform import Rotation

    pose = np.eye(4)
    pose[:3, :3] = (Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
                    * rng.uniform(0.9, 1.1))
    pose[:3, 3] = rng.normal(0, 4, 3)
    to_template = np.linalg.inv(template_affine) @ np.linalg.inv(pose) @ affine
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = to_template[:3, :3].astype(np.float32) @ ijk + to_template[:3, 3:4].astype(
        np.float32)
    amplitude = rng.uniform(1.0, 3.0)
    for axis in range(3):
        coords[axis] += amplitude * smooth_field(rng, shape).reshape(-1)
    return coords


def write_pair(seed: int, image_path: Path, mask_path: Path | None = None,
               options: SynthOptions = SynthOptions()) -> float:
    """Write one synthetic scan (and its mask); returns the lesion volume in mL."""
    image, mask = synth_head(seed, options)
    save_array(np.asarray(image.dataobj), image.affine, image_path)
    if mask_path is not None:
        save_array(np.asarray(mask.dataobj), mask.affine, mask_path)
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    return float(np.asarray(mask.dataobj).sum() * voxel_ml)


def make_dataset(folder: Path, n: int, seed: int, options: SynthOptions = SynthOptions(),
                 jobs: int = 1) -> Path:
    """Write n pairs (seeds seed .. seed+n-1) and a manifest.csv (image,mask,subject,lesion_ml).

    `jobs` worker processes draw heads in parallel; the result does not depend on it.
    """
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    subjects = [f"synth{seed + index:05d}" for index in range(n)]
    images = [folder / f"{subject}_T2w.nii.gz" for subject in subjects]
    masks = [folder / f"{subject}_lesion.nii.gz" for subject in subjects]
    seeds = [seed + index for index in range(n)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        volumes = list(pool.map(write_pair, seeds, images, masks, [options] * n))
    rows = ["image,mask,subject,lesion_ml"] + [
        f"{image.name},{mask.name},{subject},{ml:.3f}"
        for image, mask, subject, ml in zip(images, masks, subjects, volumes)]
    manifest = folder / "manifest.csv"
    with atomic_path(manifest) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return manifest
