"""FreeSurfer's conformed model space, and the exact way back to the scan's own grid.

The network was trained on scans that FreeSurfer's ``mri_convert --conform`` had put on
one grid: 256^3 voxels of 1 mm, LIA voxel order (i->Left, j->Inferior, k->Anterior),
centred on the scan, intensities robustly scaled to 0..255 and stored as uint8.
``conform`` reproduces that grid and scaling the way FastSurfer's ``conform.py`` does
(scale computed on the native voxels, trilinear resampling, then scale, clip and round),
and ``unconform`` brings maps on that grid back onto the native grid.

Preconditions (checked upstream by the input validation step, not here): the volume's
data are finite and its affine is invertible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine, from_matvec, to_matvec
from nibabel.processing import resample_from_to

from meshseg.io import Volume

logger = logging.getLogger(__name__)

CONFORMED_SHAPE: tuple[int, int, int] = (256, 256, 256)
CONFORMED_VOXEL_MM = 1.0
# Columns are the world (RAS+) directions of voxel axes i, j, k: -R (Left), -S (Inferior), +A.
LIA_DIRECTIONS = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
UCHAR_MAX = 255.0
# FreeSurfer's robust range for the uchar conversion: no cut at the low end, the top
# thousandth of the non-zero voxels cut at the high end, on a 1000-bin histogram.
HISTOGRAM_BINS = 1000
F_HIGH = 0.999
NONZERO_EPS = 1e-15
# A voxel-to-voxel map closer than this to a permutation/flip with whole-voxel shift
# is a pure re-ordering: nearest neighbour copies voxels exactly, without blurring.
REORDER_EPS = 1e-4


@dataclass(frozen=True)
class ConformRecord:
    """What `unconform` needs to put conformed-grid maps back on the scan's grid.

    Attributes:
        native_shape: voxel shape (i, j, k) of the input scan.
        native_affine: 4x4 voxel -> RAS+ mm affine of the input scan.
        affine: 4x4 voxel -> RAS+ mm affine of the conformed 256^3 grid.
    """

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    affine: np.ndarray


def conformed_affine(native_shape: Sequence[int], native_affine: np.ndarray) -> np.ndarray:
    """Voxel -> RAS+ mm affine of FreeSurfer's conformed grid for a scan.

    The grid is 256^3, 1 mm, LIA, axis-aligned with the world whatever the scan's
    obliquity. Like FreeSurfer (and FastSurfer, NiiVue) it is centred on the scan's
    c_ras, the world position of voxel index shape/2 (not (shape-1)/2), which lands
    on conformed voxel (128, 128, 128). A field of view wider than 256 mm is cropped
    around that centre, as ``mri_convert --conform`` does.

    nibabel.processing.conform is not used: it centres the grid on the RAS origin
    and orders voxels RAS, so it does not match the space the network was trained in.
    """
    half_native = np.asarray(native_shape[:3], dtype=float) / 2.0
    c_ras = np.asarray(native_affine, dtype=float)[:3, :3] @ half_native + native_affine[:3, 3]
    rotation_zooms = LIA_DIRECTIONS * CONFORMED_VOXEL_MM
    half_conformed = np.asarray(CONFORMED_SHAPE, dtype=float) / 2.0
    return from_matvec(rotation_zooms, c_ras - rotation_zooms @ half_conformed)


def robust_range(data: np.ndarray) -> tuple[float, float]:
    """FreeSurfer's robust intensity bounds (low, high) used to scale a scan to 0..255.

    Follows FastSurfer's ``getscale`` (f_low=0, f_high=0.999), which reproduces
    ``mri_convert --conform``: with f_low=0 the low bound is the minimum. The high
    bound comes from a 1000-bin histogram over [min, max] of all voxels: it is the
    lower edge of the bin *below* the first bin at which the cumulative count
    reaches (all voxels - 0.1% of the non-zero voxels). Cutting a share of the
    non-zero voxels only keeps a large zero background from hiding the bright
    outliers. If that bin is the first one, the maximum is used (as FastSurfer's
    indexing does). A constant volume gives (value, value).

    Args:
        data: voxel intensities, any shape, finite.

    Returns:
        (low, high) in the data's intensity units.
    """
    low = float(np.min(data))
    high = float(np.max(data))
    if high <= low:
        return low, high
    counts, edges = np.histogram(data, bins=HISTOGRAM_BINS, range=(low, high))
    cumulative = np.concatenate(([0], np.cumsum(counts)))
    nonzero = int(np.count_nonzero(np.abs(data) >= NONZERO_EPS))
    cutoff = data.size - int((1.0 - F_HIGH) * nonzero)
    first = int(np.flatnonzero(cumulative >= cutoff)[0])
    robust_high = float(edges[first - 2]) if first >= 2 else high
    return low, robust_high


def conform(volume: Volume) -> tuple[np.ndarray, ConformRecord]:
    """Put a scan into the model space: FreeSurfer's conformed grid, uint8 0..255.

    Intensities: a scan stored as uint8 with values 0..255 (see `_is_uchar`) is kept
    as is, as FreeSurfer keeps uchar data; anything else is scaled with `robust_range`
    computed on the native voxels, then resampled trilinearly (cubic would
    overshoot), shifted, scaled, clipped to 0..255 and rounded. As in FastSurfer,
    voxels whose resampled value is exactly 0 (background, and everything outside
    the scan's field of view) stay 0 even when the scan's minimum is negative.

    Args:
        volume: the scan; `volume.data` float32 with any scaling already applied.

    Returns:
        (uint8 array of shape 256^3 in the conformed grid's [i, j, k] order, record).
    """
    affine = conformed_affine(volume.data.shape, volume.affine)
    record = ConformRecord(
        native_shape=tuple(int(n) for n in volume.data.shape),
        native_affine=np.array(volume.affine, dtype=float),
        affine=affine,
    )
    resampled = to_conformed(volume.data, volume.affine, record)
    if not _is_uchar(volume):
        low, high = robust_range(volume.data)
        scale = UCHAR_MAX / (high - low) if high > low else 1.0
        logger.debug("%s: rescale min %g, robust max %g, scale %g", volume.name, low, high, scale)
        background = resampled == 0
        resampled -= low
        resampled *= scale
        resampled[background] = 0
    np.clip(resampled, 0, UCHAR_MAX, out=resampled)
    np.rint(resampled, out=resampled)
    return resampled.astype(np.uint8), record


def _is_uchar(volume: Volume) -> bool:
    """True for a scan stored as uint8 whose values, after any scaling, are still 0..255 integers.

    FreeSurfer keeps uchar data unscaled but reads a uint8 file with a real
    scl_slope/scl_inter as float and rescales it. The header cannot tell which:
    nibabel moves the scaling into the data on load and leaves NaN in the header's
    scl_slope/scl_inter. So the scaled values are checked instead; only a uint8 file
    whose scaling still yields whole numbers in 0..255 (e.g. slope 2 on values up to
    127) is kept as is where FreeSurfer would rescale it.
    """
    if volume.header.get_data_dtype() != np.uint8:
        return False
    data = volume.data
    return bool(data.min() >= 0 and data.max() <= UCHAR_MAX and np.array_equal(data, np.rint(data)))


def to_unit_range(conformed: np.ndarray) -> np.ndarray:
    """Min-max scale the whole volume to float32 0..1, as brainchop feeds MeshNet.

    No clipping or threshold: the network was trained on exactly this. A constant
    volume gives zeros.
    """
    out = conformed.astype(np.float32)
    low = out.min()
    span = out.max() - low
    out -= low
    if span > 0:
        out /= span
    return out


def unconform(maps: np.ndarray, record: ConformRecord) -> np.ndarray:
    """Bring float maps from the conformed grid back onto the scan's native grid.

    Trilinear (order 1), 0 outside the conformed field of view, so a probability map
    stays within its range and `> 0.5` gives the native-grid mask.

    Args:
        maps: float32 array (256, 256, 256) or (C, 256, 256, 256) on the conformed grid.
        record: the record `conform` returned for this scan.

    Returns:
        float32 array of shape `record.native_shape` or (C,) + `record.native_shape`.
    """
    if maps.shape[-3:] != CONFORMED_SHAPE or maps.ndim not in (3, 4):
        raise ValueError(f"unconform expects (C,)+{CONFORMED_SHAPE} maps, got {maps.shape}")
    channels = maps[np.newaxis] if maps.ndim == 3 else maps
    native = np.stack([
        _resample(np.asarray(channel, dtype=np.float32), record.affine,
                  record.native_shape, record.native_affine)
        for channel in channels
    ])
    return native[0] if maps.ndim == 3 else native


def to_conformed(data: np.ndarray, affine: np.ndarray, record: ConformRecord) -> np.ndarray:
    """Resample float32 voxels on a scan's grid onto its conformed grid, as `conform` does.

    Masks drawn on the scan go through this too, so they stay aligned with the image.
    """
    return _resample(data, affine, CONFORMED_SHAPE, record.affine)


def _resample(data: np.ndarray, from_affine: np.ndarray, to_shape: Sequence[int],
              to_affine: np.ndarray) -> np.ndarray:
    """Resample a float32 3-D array between two voxel grids of the same world, 0 outside.

    Trilinear in general; nearest neighbour when the grids differ only by axis order,
    flips and whole-voxel shifts, so that such inputs come back voxel-identical.

    Only the target voxels that can see the source are computed (a native scan usually
    covers a fraction of the 256^3 grid), in one slab per CPU core: nibabel's resampler
    (scipy.ndimage) is single-threaded but releases the GIL.
    """
    to_from = np.linalg.inv(from_affine) @ to_affine
    order = 0 if _is_reordering(to_from) else 1
    image = nib.Nifti1Image(data, from_affine)
    out = np.zeros(tuple(to_shape), dtype=np.float32)
    box = _covered_box(data.shape, np.linalg.inv(to_from), to_shape)
    if box is None:
        return out
    slabs = np.array_split(np.arange(box[0].start, box[0].stop), _workers())
    parts = [(slice(int(rows[0]), int(rows[-1]) + 1), box[1], box[2])
             for rows in slabs if rows.size]

    def fill(part: tuple[slice, slice, slice]) -> None:
        shape = tuple(s.stop - s.start for s in part)
        part_affine = to_affine @ from_matvec(np.eye(3), [s.start for s in part])
        out[part] = np.asarray(resample_from_to(image, (shape, part_affine), order=order,
                                                mode="constant", cval=0.0).dataobj)

    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(fill, parts))
    return out


def _covered_box(from_shape: Sequence[int], from_to: np.ndarray,
                 to_shape: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """Target voxels within one voxel of the source volume (trilinear interpolation reads
    zeros beyond it, so everything else is 0), or None when they do not meet."""
    corners = np.array(np.meshgrid(*[(-1.0, n) for n in from_shape], indexing="ij"))
    mapped = apply_affine(from_to, corners.reshape(3, -1).T)
    low = np.maximum(np.floor(mapped.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(mapped.max(axis=0)).astype(int) + 1, to_shape)
    if (high <= low).any():
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _workers() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _is_reordering(vox2vox: np.ndarray) -> bool:
    """True when a voxel-to-voxel affine only permutes/flips axes and shifts whole voxels."""
    matrix, shift = to_matvec(vox2vox)
    signed_permutation = np.rint(matrix)
    one_per_axis = (np.abs(signed_permutation).sum(axis=0) == 1).all() and (
        np.abs(signed_permutation).sum(axis=1) == 1).all()
    return bool(one_per_axis
                and np.allclose(matrix, signed_permutation, rtol=0, atol=REORDER_EPS)
                and np.allclose(shift, np.rint(shift), rtol=0, atol=REORDER_EPS))
