"""The QC picture of one result: the input on its own grid with the lesion outlined, so that
an analyst can check a mask at a glance without opening a viewer.

An axial montage across the lesion's extent, then a sagittal and a coronal slice through
the largest lesion's centre (mid-brain slices when the mask is empty). Voxels are only
permuted and flipped to RAS order (never resampled), shown in neurological convention
(left on the left) with L and R written on every panel; anisotropic voxels keep their
aspect.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from meshseg.io import save_png
from meshseg.metrics import largest_lesion_centre

AXIAL_SLICES = 6  # panels of the axial montage
OUTLINE = "#ff3030"
DPI = 80  # 960 x 520 pixels: enough to see a lesion's outline, small enough for a cohort


def draw(data: np.ndarray, affine: np.ndarray, mask: np.ndarray, title: str,
         path: Path) -> None:
    """Write the QC picture of `data` (3-D, any orientation) and its 0/1 `mask` to `path`."""
    from matplotlib.figure import Figure

    image, lesion, zooms = _to_ras(data, affine, mask)
    low, high = _window(image)
    centre = _centre(image, lesion)
    figure = Figure(figsize=(12, 6.5))  # fixed layout: constrained layout costs ~0.5 s
    grid = figure.add_gridspec(2, AXIAL_SLICES, height_ratios=[1, 1.4], left=0.005,
                               right=0.995, bottom=0.005, top=0.94, wspace=0.02, hspace=0.03)
    for column, k in enumerate(_axial_slices(image, lesion, centre)):
        _panel(figure.add_subplot(grid[0, column]), image[:, :, k], lesion[:, :, k],
               zooms[1] / zooms[0], (low, high), ("L", "R"), f"z={k}")
    half = AXIAL_SLICES // 2
    _panel(figure.add_subplot(grid[1, :half]), image[centre[0]], lesion[centre[0]],
           zooms[2] / zooms[1], (low, high), ("P", "A"), f"sagittal x={centre[0]}")
    _panel(figure.add_subplot(grid[1, half:]), image[:, centre[1]], lesion[:, centre[1]],
           zooms[2] / zooms[0], (low, high), ("L", "R"), f"coronal y={centre[1]}")
    figure.suptitle(title, fontsize=10)
    save_png(figure, path, dpi=DPI)


def _to_ras(data: np.ndarray, affine: np.ndarray, mask: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and mask with voxel axes permuted and flipped to the nearest RAS order, and the
    voxel sizes along the new axes."""
    orientation = nib.orientations.io_orientation(affine)
    image = nib.orientations.apply_orientation(data, orientation)
    lesion = nib.orientations.apply_orientation(np.asarray(mask, bool), orientation)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)[orientation[:, 0].astype(int).argsort()]
    return image, lesion, zooms


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st to 99.5th percentile of the non-zero voxels."""
    values = image[image > 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _centre(image: np.ndarray, lesion: np.ndarray) -> tuple[int, int, int]:
    """Voxel at the centre of the largest lesion, or of the head when there is none."""
    point = largest_lesion_centre(lesion)
    if point is None:
        point = ndimage.center_of_mass(image > np.percentile(image, 50))
    return tuple(int(round(p)) for p in point)  # type: ignore[return-value]


def _axial_slices(image: np.ndarray, lesion: np.ndarray,
                  centre: tuple[int, int, int]) -> list[int]:
    """Slices spread evenly over the lesion's axial extent (over the middle of the head when
    there is no lesion)."""
    if lesion.any():
        z = np.flatnonzero(lesion.any(axis=(0, 1)))
        low, high = int(z[0]), int(z[-1])
    else:
        depth = image.shape[2]
        low, high = centre[2] - depth // 6, centre[2] + depth // 6
    return [int(round(k)) for k in np.linspace(low, high, AXIAL_SLICES + 2)[1:-1]]


def _panel(axes, image: np.ndarray, lesion: np.ndarray, aspect: float,
           window: tuple[float, float], sides: tuple[str, str], label: str) -> None:
    """One slice (first array axis shown left to right, second bottom to top) with the
    lesion's outline and the patient's side at the left and right edges. In RAS order the
    first axis runs towards the patient's right (or anterior), so the image's left edge is
    the patient's left (posterior): neurological convention."""
    axes.imshow(image.T, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                aspect=aspect, interpolation="nearest")
    if lesion.any():
        axes.contour(lesion.T.astype(np.float32), levels=[0.5], colors=OUTLINE,
                     linewidths=1.0)
    for x, text in zip((0.02, 0.98), sides):
        axes.text(x, 0.5, text, transform=axes.transAxes, color="yellow", fontsize=11,
                  ha="left" if x < 0.5 else "right", va="center", fontweight="bold")
    axes.text(0.5, 0.98, label, transform=axes.transAxes, color="white", fontsize=8,
              ha="center", va="top")
    axes.set_axis_off()
