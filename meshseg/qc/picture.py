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

Drawn with Pillow and numpy (matplotlib's import alone cost more than the whole picture now
does): panels scaled by nearest neighbour, outlines taken from the scaled masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont
from scipy import ndimage

from meshseg.io import save_png
from meshseg.metrics import largest_lesion_centre

AXIAL_SLICES = 6  # panels of the axial montage
LESION = "#ff2a2a"
LESION_ALPHA = 0.4  # fill: the scan stays visible under the lesion
OUTLINE_PX = 2  # outlines at the picture's own size: they show in a thumbnail too
UNSURE = "#ffd500"  # contour of the low-confidence probability band
DASH_PX = 4  # dash length of that contour
SIZE = (960, 560)  # pixels: enough to see a lesion, small enough for a cohort
MARGIN_PX = 5  # around the panels
GAP_PX = 6  # between panels
TITLE_LINE_PX = 17  # title line height
LABEL_PX = 18  # the text above each panel
KEY_PX = 26  # the key and the disclaimer along the bottom
BOLD_PX = 1  # stroke that thickens the sides' letters: bold
# An empty mask's slices: the middle of the brain lies about 70 mm below the top of the head
# (MNI152: the template's brain ends at z = +82 mm, the lateral ventricles' bodies lie at
# z = +10 to +20 mm; a scalp adds 5-10 mm), and the axial slices span from 45 mm below it
# (temporal lobes, cerebellum) to 45 mm above (the convexity).
BRAIN_MIDDLE_MM = 70.0
BRAIN_SPAN_MM = (-45.0, 45.0)
HEAD_FLOOR = 0.1  # share of the display's top above which a voxel may be head
HEAD_MARGIN = 4  # voxels kept around the head when the panels are cropped to it
DISCLAIMER = "meshseg - research use only, not a medical device"


@dataclass(frozen=True)
class Scene:
    """What a QC picture shows, before any layout: the scan, lesion and probability in RAS
    order, their voxel sizes and world map, the display window, the head's box, the centre
    and the axial slices. It needs nothing from QC's flags, so predict finds it while the
    scan registers (the title, which holds the flags, is the layout's business)."""

    image: np.ndarray
    lesion: np.ndarray
    unsure: np.ndarray | None
    zooms: np.ndarray
    world: np.ndarray
    window: tuple[float, float]
    crop: tuple[slice, slice, slice]
    centre: tuple[int, int, int]
    slices: list[int]


def scene(data: np.ndarray, affine: np.ndarray, mask: np.ndarray,
          prob: np.ndarray | None = None) -> Scene:
    """The Scene of `data` (3-D, any orientation), its 0/1 `mask` and probability map."""
    image, lesion, zooms = _to_ras(data, affine, mask)
    world = affine @ nib.orientations.inv_ornt_aff(nib.orientations.io_orientation(affine),
                                                   data.shape)
    window = _window(image)
    head = _head(image, window[1])
    middle = _brain_middle(head, zooms)
    return Scene(image, lesion, None if prob is None else _to_ras(prob, affine, mask)[0],
                 zooms, world, window, _head_box(head), _centre(lesion, middle),
                 _axial_slices(lesion, middle, zooms))


def draw(data: np.ndarray, affine: np.ndarray, mask: np.ndarray, title: str, path: Path,
         prob: np.ndarray | None = None, low: float = 0.2, threshold: float = 0.5,
         shown: Scene | None = None) -> None:
    """Write the QC picture of `data` (3-D, any orientation) and its 0/1 `mask` to `path`;
    `title` may hold several lines (file and figures first, then the QC flags). `shown`: the
    `scene` of these arrays, when already found."""
    shown = shown or scene(data, affine, mask, prob)
    image, lesion, unsure, zooms = shown.image, shown.lesion, shown.unsure, shown.zooms
    world, low_high, crop, centre = shown.world, shown.window, shown.crop, shown.centre
    canvas = Image.new("RGB", SIZE, "black")
    pen = ImageDraw.Draw(canvas)
    lines = title.splitlines() or [""]
    for row, line in enumerate(lines):
        pen.text((SIZE[0] // 2, 3 + row * TITLE_LINE_PX), line, fill="white", font=_font(14),
                 anchor="mt")
    axial_box, lower_box = _cells(3 + len(lines) * TITLE_LINE_PX + 4)

    def panel(cell: tuple[int, int, int, int], view: tuple, axes_pair: tuple[int, int],
              sides: tuple[str, str], label: str) -> None:
        box = (crop[axes_pair[0]], crop[axes_pair[1]])
        rgb = _panel(image[view][box], lesion[view][box],
                     None if unsure is None else unsure[view][box], (low, threshold),
                     (zooms[axes_pair[0]], zooms[axes_pair[1]]), low_high, cell[2:])
        _place(canvas, pen, rgb, cell, sides, label)

    for column, k in enumerate(shown.slices):
        panel(axial_box(column), (slice(None), slice(None), k), (0, 1), ("L", "R"),
              f"z {_mm(world, centre, 2, k):+.0f} mm")
    panel(lower_box(0), (centre[0],), (1, 2), ("P", "A"),
          f"sagittal x {_mm(world, centre, 0, centre[0]):+.0f} mm")
    panel(lower_box(1), (slice(None), centre[1]), (0, 2), ("L", "R"),
          f"coronal y {_mm(world, centre, 1, centre[1]):+.0f} mm")
    _key(pen, unsure is not None, low, threshold)
    pen.text((SIZE[0] - MARGIN_PX, SIZE[1] - KEY_PX // 2), DISCLAIMER, fill="#bbbbbb",
             font=_font(13), anchor="rm")
    save_png(canvas, path)


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
    (background noise and ghosts fall below it or are specks apart from the head). The
    pieces are sized by their voxels on a 2x-subsampled grid (an eighth of the counting; the
    head outweighs any other piece by far), where one has any."""
    labels, count = ndimage.label(image > HEAD_FLOOR * high)
    if count == 0:
        return np.ones(image.shape, bool)
    sample = labels[::2, ::2, ::2]
    sizes = np.bincount((sample if sample.any() else labels).ravel())
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


def _cells(top: int) -> tuple[Callable[[int], tuple[int, int, int, int]],
                             Callable[[int], tuple[int, int, int, int]]]:
    """The panels' cells (left, top, width, height of the image, its labels above it) below
    a title ending at `top`: the axial row, then the sagittal and coronal halves, 1.4 times
    taller, above the key."""
    images = SIZE[1] - KEY_PX - top - 2 * LABEL_PX - GAP_PX
    axial_h = round(images / 2.4)
    width = SIZE[0] - 2 * MARGIN_PX
    axial_w = (width - (AXIAL_SLICES - 1) * GAP_PX) // AXIAL_SLICES
    lower_w = (width - GAP_PX) // 2
    lower_top = top + LABEL_PX + axial_h + GAP_PX + LABEL_PX
    return (lambda i: (MARGIN_PX + i * (axial_w + GAP_PX), top + LABEL_PX, axial_w, axial_h),
            lambda i: (MARGIN_PX + i * (lower_w + GAP_PX), lower_top, lower_w,
                       images - axial_h))


def _panel(image: np.ndarray, lesion: np.ndarray, prob: np.ndarray | None,
           band: tuple[float, float], zooms: tuple[float, float], window: tuple[float, float],
           fit: tuple[int, int]) -> np.ndarray:
    """One slice as RGB pixels fitting `fit` (width, height) with the voxels' aspect (first
    array axis shown left to right, second bottom to top): the lesion filled and outlined,
    the low-confidence `band` of the probability contoured with dashes. In RAS order the
    first axis runs towards the patient's right (or anterior), so the image's left edge is
    the patient's left (posterior): neurological convention."""
    rows, columns = _display_indices(image.shape, zooms, fit)
    grey = np.clip((image - window[0]) / (window[1] - window[0]), 0, 1) * 255
    rgb = np.repeat(grey.T[::-1][rows, columns][..., None], 3, axis=2)
    if prob is not None and (prob >= band[0]).any():
        unsure = ndimage.binary_opening(prob >= band[0]) | lesion  # specks of one voxel dropped
        if (unsure & ~lesion).any():
            edge = _outline(unsure.T[::-1][rows, columns])
            rgb[edge & _dashes(edge.shape)] = _rgb(UNSURE)
    if lesion.any():
        shown = lesion.T[::-1][rows, columns]
        rgb[shown] = (1 - LESION_ALPHA) * rgb[shown] + LESION_ALPHA * _rgb(LESION)
        rgb[_outline(shown)] = _rgb(LESION)
    return rgb.astype(np.uint8)


def _display_indices(shape: tuple[int, ...], zooms: tuple[float, float], fit: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour row and column indices that scale a (top-to-bottom) slice of voxels
    `shape` (columns, rows) with sizes `zooms` (mm) to the largest size fitting `fit`,
    keeping its physical aspect."""
    mm = np.array(shape[:2]) * np.array(zooms)
    scale = min(fit[0] / mm[0], fit[1] / mm[1])
    width, height = (max(int(round(n * scale)), 1) for n in mm)
    columns = ((np.arange(width) + 0.5) * shape[0] / width).astype(int)
    rows = ((np.arange(height) + 0.5) * shape[1] / height).astype(int)
    return rows[:, None], columns[None, :]


def _outline(mask: np.ndarray) -> np.ndarray:
    """The OUTLINE_PX-wide inner edge of a display mask: its pixels whose neighbourhood
    leaves it."""
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=OUTLINE_PX)


def _dashes(shape: tuple[int, int]) -> np.ndarray:
    """Where a dashed line is drawn: diagonal stripes DASH_PX wide, so that an outline of any
    direction but the stripes' own breaks into dashes."""
    y, x = np.indices(shape)
    return (x + y) // DASH_PX % 2 == 0


def _place(canvas: Image.Image, pen: ImageDraw.ImageDraw, rgb: np.ndarray,
           cell: tuple[int, int, int, int], sides: tuple[str, str], label: str) -> None:
    """Paste a panel's pixels centred in its cell, the patient's `sides` (bold) above its
    corners and its `label` above its middle."""
    left = cell[0] + (cell[2] - rgb.shape[1]) // 2
    top = cell[1] + (cell[3] - rgb.shape[0]) // 2
    canvas.paste(Image.fromarray(rgb), (left, top))
    above = top - 3
    pen.text((left, above), sides[0], fill="white", font=_font(14), anchor="ld",
             stroke_width=BOLD_PX, stroke_fill="white")
    pen.text((left + rgb.shape[1], above), sides[1], fill="white", font=_font(14),
             anchor="rd", stroke_width=BOLD_PX, stroke_fill="white")
    pen.text((left + rgb.shape[1] // 2, above), label, fill="white", font=_font(13),
             anchor="md")


def _key(pen: ImageDraw.ImageDraw, unsure: bool, low: float, threshold: float) -> None:
    """The colour key along the bottom left: the lesion's swatch, and the dashed line of the
    low-confidence band when the probability is shown."""
    middle = SIZE[1] - KEY_PX // 2
    x = MARGIN_PX + 10
    pen.rectangle((x, middle - 4, x + 22, middle + 4), fill=_blend(LESION, 0.7))
    x = _key_text(pen, x + 30, middle, f"lesion (probability >= {threshold:g})") + 24
    if unsure:
        for dash in range(x, x + 22, 2 * DASH_PX):
            pen.line((dash, middle, dash + DASH_PX - 1, middle), fill=UNSURE, width=2)
        _key_text(pen, x + 30, middle, f"low confidence (probability {low:g}-{threshold:g})")


def _key_text(pen: ImageDraw.ImageDraw, x: int, middle: int, text: str) -> int:
    """Write one key entry's `text` from `x`; returns where it ends."""
    pen.text((x, middle), text, fill="white", font=_font(13), anchor="lm")
    return int(pen.textlength(text, font=_font(13))) + x


def _rgb(colour: str) -> np.ndarray:
    """A "#rrggbb" colour as three floats 0-255."""
    return np.array(ImageColor.getrgb(colour), float)


def _blend(colour: str, alpha: float) -> tuple[int, ...]:
    """`colour` at opacity `alpha` over the black background."""
    return tuple(int(round(alpha * c)) for c in ImageColor.getrgb(colour))


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own TrueType font (no system fonts needed) at `size` pixels."""
    return ImageFont.load_default(size=size)
