"""Checks that a loaded scan can be conformed: reject what would give a silently wrong mask."""

from __future__ import annotations

import numpy as np

from meshseg.errors import InputError
from meshseg.io import Volume

MIN_DIM, MAX_DIM = 8, 2048
MAX_VOXELS = 1024**3 // 2  # 2 GiB of float32: far beyond any brain MRI
MIN_MM, MAX_MM = 0.05, 20.0


def check_volume(volume: Volume) -> None:
    """Raise InputError naming the file when the scan is unusable.

    Refused: non-finite voxels, an all-zero or constant image, a dimension outside
    8..2048 voxels, a voxel size outside 0.05..20 mm, or a singular affine.
    """
    name, data = volume.name, volume.data
    shape = data.shape
    if any(d < MIN_DIM or d > MAX_DIM for d in shape) or data.size > MAX_VOXELS:
        raise InputError(f"{name}: implausible dimensions {shape} for a brain MRI "
                         f"(each axis must have {MIN_DIM}..{MAX_DIM} voxels)")
    _check_affine(name, volume.affine)
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(f"{name}: {data.size - int(finite.sum())} voxels are NaN or Inf")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        what = "all zero" if hi == 0 else f"constant ({hi:g})"
        raise InputError(f"{name}: image is {what}; nothing to segment")


def _check_affine(name: str, affine: np.ndarray) -> None:
    if not np.isfinite(affine).all():
        raise InputError(f"{name}: affine contains NaN or Inf")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < MIN_MM) or np.any(zooms > MAX_MM):
        sizes = " x ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{name}: implausible voxel size {sizes} mm "
                         f"(each must be {MIN_MM:g}..{MAX_MM:g} mm)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)):
        raise InputError(f"{name}: affine is singular (voxel axes are not independent)")
