"""The QC picture of one result: the input on its own grid with the lesion drawn over it, so
that an analyst can check a mask at a glance, even as a cohort page's thumbnail, without
opening a viewer.

An axial montage across the lesion's extent, then a sagittal and a coronal slice through
the largest lesion's centre (slices through the middle of the brain when the mask is empty).
Voxels are only permuted and flipped to RAS order (never resampled), shown in neurological
convention (left on the left) with the sides written above every panel, outside the image;
anisotropic voxels keep their aspect. The lesion is filled (translucent) and outlined; where
the probability map is given, voxels the model scored between `low` and the threshold get a
dashed contour of their own: what the model saw but did not call lesion.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from meshseg.io import save_png
from meshseg.metrics import largest_lesion_centre

AXIAL_SLICES = 6  # panels of the axial montage
LESION = "#ff2a2a"
LESION_ALPHA = 0.4  # fill: the scan stays visible under the lesion
OUTLINE_PX = 2.0  # lesion outline at the picture's own size
UNSURE = "#ffd500"  # contour of the low-confidence probability band
DPI = 80  # 960 x 560 pixels: enough to see a lesion, small enough for a cohort
# An empty mask's slices: the middle of the brain lies about 70 mm below the top of the head
# (MNI152: the template's brain ends at z = +82 mm, the lateral ventricles' bodies lie at
# z = +10 to +20 mm; a scalp adds 5-10 mm), and the axial slices span from 45 mm below it
# (temporal lobes, cerebellum) to 45 mm above (the convexity).
BRAIN_MIDDLE_MM = 70.0
BRAIN_SPAN_MM = (-45.0, 45.0)
HEAD_FLOOR = 0.1  # share of the display's top above which a voxel may be head
HEAD_MARGIN = 4  # voxels kept around the head when the panels are cropped to it
DISCLAIMER = "meshseg - research use only, not a medical device"


def draw(data: np.ndarray, affine: np.ndarray, mask: np.ndarray, title: str, path: Path,
         prob: np.ndarray | None = None, low: float = 0.2, threshold: float = 0.5) -> None:
    """Write the QC picture of `data` (3-D, any orientation) and its 0/1 `mask` to `path`;
    `title` may hold several lines (file and figures first, then the QC flags)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    image, lesion, zooms = _to_ras(data, affine, mask)
    unsure = None if prob is None else _to_ras(prob, affine, mask)[0]
    world = affine @ nib.orientations.inv_ornt_aff(nib.orientations.io_orientation(affine),
                                                   data.shape)
    low_high = _window(image)
    head = _head(image, low_high[1])
    middle = _brain_middle(head, zooms)
    centre = _centre(lesion, middle)
    crop = _head_box(head)
    figure = Figure(figsize=(12, 7), facecolor="black")  # fixed layout: constrained costs ~0.5 s
    lines = title.count("\n") + 1
    top = 1 - (0.045 + 0.03 * lines)
    grid = figure.add_gridspec(2, AXIAL_SLICES, height_ratios=[1, 1.4], left=0.005,
                               right=0.995, bottom=0.06, top=top, wspace=0.02, hspace=0.1)

    def panel(cell, view: tuple, axes_pair: tuple[int, int], sides: tuple[str, str],
              label: str) -> None:
        box = (crop[axes_pair[0]], crop[axes_pair[1]])
        _panel(figure.add_subplot(cell), image[view][box], lesion[view][box],
               None if unsure is None else unsure[view][box], (low, threshold),
               zooms[axes_pair[1]] / zooms[axes_pair[0]], low_high, sides, label)

    for column, k in enumerate(_axial_slices(lesion, middle, zooms)):
        panel(grid[0, column], (slice(None), slice(None), k), (0, 1), ("L", "R"),
              f"z {_mm(world, centre, 2, k):+.0f} mm")
    half = AXIAL_SLICES // 2
    panel(grid[1, :half], (centre[0],), (1, 2), ("P", "A"),
          f"sagittal x {_mm(world, centre, 0, centre[0]):+.0f} mm")
    panel(grid[1, half:], (slice(None), centre[1]), (0, 2), ("L", "R"),
          f"coronal y {_mm(world, centre, 1, centre[1]):+.0f} mm")
    figure.suptitle(title, fontsize=11, color="white", y=0.995, va="top", linespacing=1.3)
    key = [Patch(facecolor=LESION, edgecolor=LESION, alpha=0.7,
                 label=f"lesion (probability >= {threshold:g})")]
    if prob is not None:
        key.append(Line2D([], [], color=UNSURE, linestyle="--",
                          label=f"low confidence (probability {low:g}-{threshold:g})"))
    figure.legend(handles=key, loc="lower left", ncol=len(key), frameon=False, fontsize=10,
                  labelcolor="white", bbox_to_anchor=(0.005, 0.0))
    figure.text(0.995, 0.012, DISCLAIMER, color="#bbbbbb", fontsize=10, ha="right",
                va="bottom")
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


def _mm(world: np.ndarray, centre: tuple[int, int, int], axis: int, index: int) -> float:
    """World mm along `axis` of the slice `index` (taken at the centre: exact for a scan
    aligned with the scanner's axes, the slice's middle for an oblique one)."""
    point = np.array([*centre, 1.0])
    point[axis] = index
    return float((world @ point)[axis])


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st to 99.5th percentile of the non-zero voxels."""
    values = image[image > 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _head(image: np.ndarray, high: float) -> np.ndarray:
    """The head: the largest connected piece brighter than HEAD_FLOOR of the display's top
    (background noise and ghosts fall below it or are specks apart from the head)."""
    labels, count = ndimage.label(image > HEAD_FLOOR * high)
    if count == 0:
        return np.ones(image.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _head_box(head: np.ndarray) -> tuple[slice, slice, slice]:
    """The box around the head with HEAD_MARGIN voxels: panels cropped to it show the head
    larger."""
    found = ndimage.find_objects(head.astype(np.uint8))[0]
    return tuple(slice(max(s.start - HEAD_MARGIN, 0), s.stop + HEAD_MARGIN)
                 for s in found)  # type: ignore[return-value]


def _brain_middle(head: np.ndarray, zooms: np.ndarray) -> tuple[int, int, int]:
    """The middle of the brain, found from the top of the head (the one landmark that a
    whole head, a head with its neck and a brain-extracted scan share): BRAIN_MIDDLE_MM
    below it, at the centre of the head's cross-section there."""
    top = int(np.flatnonzero(head.any(axis=(0, 1)))[-1])
    k = max(int(round(top - BRAIN_MIDDLE_MM / zooms[2])), 0)
    x, y = ndimage.center_of_mass(head[:, :, k]) if head[:, :, k].any() else (
        np.array(head.shape[:2]) / 2)
    return int(round(x)), int(round(y)), k


def _centre(lesion: np.ndarray, middle: tuple[int, int, int]) -> tuple[int, int, int]:
    """Voxel at the centre of the largest lesion, or the brain's `middle` when there is
    none."""
    point = largest_lesion_centre(lesion)
    if point is None:
        point = middle
    return tuple(int(round(p)) for p in point)  # type: ignore[return-value]


def _axial_slices(lesion: np.ndarray, middle: tuple[int, int, int],
                  zooms: np.ndarray) -> list[int]:
    """Slices spread evenly over the lesion's axial extent (over BRAIN_SPAN_MM around the
    brain's `middle` when there is no lesion)."""
    if lesion.any():
        z = np.flatnonzero(lesion.any(axis=(0, 1)))
        points = np.linspace(float(z[0]), float(z[-1]), AXIAL_SLICES + 2)[1:-1]
    else:
        below, above = (mm / zooms[2] for mm in BRAIN_SPAN_MM)
        points = np.linspace(middle[2] + below, middle[2] + above, AXIAL_SLICES)
    return [int(np.clip(round(k), 0, lesion.shape[2] - 1)) for k in points]


def _panel(axes, image: np.ndarray, lesion: np.ndarray, prob: np.ndarray | None,
           band: tuple[float, float], aspect: float, window: tuple[float, float],
           sides: tuple[str, str], label: str) -> None:
    """One slice (first array axis shown left to right, second bottom to top): the lesion
    filled and outlined, the low-confidence `band` of the probability contoured, and the
    patient's sides and the slice's position above the image. In RAS order the first axis
    runs towards the patient's right (or anterior), so the image's left edge is the
    patient's left (posterior): neurological convention."""
    from matplotlib.colors import ListedColormap

    axes.imshow(image.T, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                aspect=aspect, interpolation="nearest")
    if prob is not None and (prob >= band[0]).any():
        unsure = ndimage.binary_opening(prob >= band[0]) | lesion  # specks of one voxel dropped
        if (unsure & ~lesion).any():
            axes.contour(unsure.T.astype(np.float32), levels=[0.5], colors=UNSURE,
                         linewidths=OUTLINE_PX * 72 / DPI, linestyles="--")
    if lesion.any():
        axes.imshow(np.ma.masked_where(~lesion.T, lesion.T), cmap=ListedColormap([LESION]),
                    origin="lower", aspect=aspect, alpha=LESION_ALPHA,
                    interpolation="nearest")
        axes.contour(lesion.T.astype(np.float32), levels=[0.5], colors=LESION,
                     linewidths=OUTLINE_PX * 72 / DPI)
    style = {"transform": axes.transAxes, "color": "white", "va": "bottom"}
    axes.text(0.0, 1.01, sides[0], ha="left", fontsize=11, fontweight="bold", **style)
    axes.text(1.0, 1.01, sides[1], ha="right", fontsize=11, fontweight="bold", **style)
    axes.text(0.5, 1.01, label, ha="center", fontsize=10, **style)
    axes.set_axis_off()
