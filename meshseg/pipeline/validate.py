"""The reading gate: every way a NIfTI file can be unreadable, inconsistent or dangerous, refused
(InputError naming the file) or repaired with a warning, never guessed silently.

`io.load_volume` calls the header checks in file order (`parse_header`, `data_bytes`,
`repair_header`) before any voxel is allocated, and `check_intensities` on the voxels; predict
adds `check_volume`. docs/input-checks.md lists each decision.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.nifti1 import data_type_codes, unit_codes, xform_codes

from meshseg.errors import InputError

if TYPE_CHECKING:
    from meshseg.io import Volume

Header = nib.Nifti1Header  # a Nifti2Header is a subclass

MIN_DIM, MAX_DIM = 8, 2048
MAX_VOXELS = 1024**3 // 2  # 2 GiB of float32: far beyond any brain MRI
MIN_MM, MAX_MM = 0.05, 20.0
MAX_WORLD_MM = 1e5  # no affine entry of a scan on Earth is larger (100 m)
# Scalar datatypes: integers and float32/64. Refused: binary (1), RGB/RGBA (128, 2304),
# complex (32, 1792, 2048), float128 (1536, not portable), unknown codes.
SCALAR_DATATYPES = frozenset({2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280})
# conform scales intensities in float32: beyond this magnitude its arithmetic overflows...
MAX_INTENSITY = 1e30
# ...and a span of fewer float32 steps than this cannot make a 1000-bin histogram.
MIN_SPAN_STEPS = 4096
MIN_SPAN = 1e-20  # below this, 255 / span overflows float32
# nibabel's own header checks at or above this level are refused, from WARNING up recorded.
NIBABEL_ERROR, NIBABEL_WARNING = 40, 30


def parse_header(name: str, head: bytes) -> Header:
    """The NIfTI-1 or NIfTI-2 header at the start of `head`, unchecked.

    Raises:
        InputError: neither header size and magic string fits (not NIfTI, or truncated).
    """
    for klass in (nib.Nifti2Header, nib.Nifti1Header):
        if len(head) >= klass.sizeof_hdr and klass.may_contain_header(head):
            # byte order from sizeof_hdr, as the standard says; nibabel would guess it from
            # dim[0] first, and so read a header with a bad dim[0] byte-swapped
            size = head[:4]
            order = next((o for o, code in (("<", "<i4"), (">", ">i4"))
                          if int(np.frombuffer(size, code)[0]) == klass.sizeof_hdr), None)
            return klass(head[:klass.sizeof_hdr], endianness=order, check=False)
    raise InputError(f"{name}: not a readable NIfTI image (no NIfTI-1 or NIfTI-2 magic string, "
                     "or the file is truncated)")


def data_bytes(name: str, header: Header) -> tuple[tuple[int, ...], int]:
    """(3-D shape, bytes of voxel data) the header announces; refuses absurd layouts before
    anything is allocated.

    Raises:
        InputError: dim[0] outside 1..7, a dimension below 1, not one 3-D volume, more than
            MAX_VOXELS voxels, or a datatype that is not an integer or float32/64 scalar.
    """
    dims = [int(d) for d in header["dim"]]
    if not 1 <= dims[0] <= 7:
        raise InputError(f"{name}: header dim[0] is {dims[0]}; it must be 1..7")
    shape = tuple(dims[1:dims[0] + 1])
    if min(shape) < 1:
        raise InputError(f"{name}: header dimensions {shape} include a size below 1")
    if len(shape) < 3 or math.prod(shape[3:]) != 1:
        raise InputError(f"{name}: image is {len(shape)}-D with shape {shape}; "
                         "a single 3-D volume is needed")
    voxels = math.prod(shape[:3])
    if voxels > MAX_VOXELS:
        raise InputError(f"{name}: header announces {voxels:,} voxels {shape[:3]}, more than "
                         f"any brain MRI ({MAX_VOXELS:,} at most)")
    code = int(header["datatype"])
    if code not in SCALAR_DATATYPES:
        label = data_type_codes.label.get(code, "unknown")
        raise InputError(f"{name}: datatype {code} ({label}) is not supported; meshseg reads "
                         "integer and float32/float64 scans")
    return shape[:3], voxels * header.get_data_dtype().itemsize


def repair_header(name: str, header: Header, body: bytearray, length: int) -> list[str]:
    """Check the header against the file's bytes; fix what has one sure reading, in place.

    `body` holds the (decompressed) file from its start (its extender flag may be cleared),
    `length` is the whole file's length. Returns the warnings of the repairs, for the report.

    Raises:
        InputError: a vox_offset that is negative, not finite, inside the header (unless the
            voxels exactly fill the file after it) or past the data; a .hdr/.img pair header;
            a non-finite scaling; or a problem nibabel rates as an error.
    """
    warnings: list[str] = []
    header_end = header.single_vox_offset  # 352 (NIfTI-1) or 544 (NIfTI-2)
    if header["magic"].item() != header.single_magic:
        raise InputError(f"{name}: magic {header['magic'].item()!r} marks the .hdr of a "
                         ".hdr/.img pair; meshseg reads single-file .nii/.nii.gz")
    _, nbytes = data_bytes(name, header)
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or offset < 0:
        raise InputError(f"{name}: header vox_offset is {offset:g}")
    if offset < header_end:
        if length - nbytes != header_end:
            raise InputError(f"{name}: header vox_offset {offset:g} lies inside the "
                             f"{header_end}-byte header (voxels would be read from it)")
        header["vox_offset"] = header_end
        warnings.append(f"{name}: header vox_offset {offset:g} lies inside the header; read "
                        f"the voxels from byte {header_end}, which they fill to the file's end")
    offset = int(header["vox_offset"])
    if offset + nbytes > length:
        raise InputError(f"{name}: truncated: the header needs {offset + nbytes:,} bytes, "
                         f"the file holds {length:,}")
    warnings += _extensions(name, header, body, header_end)
    _check_scaling(name, header)
    warnings += _units(name, header)
    sform_code = int(header["sform_code"])
    if (sform_code == 0 or sform_code not in xform_codes.code) and (
            header["pixdim"][1:4] == 0).any():
        sizes = [float(z) for z in header["pixdim"][1:4]]
        raise InputError(f"{name}: pixdim {sizes} has a zero voxel size and no sform gives one")
    for check in type(header)._get_checks():
        _, report = check(header, fix=True)
        if report.problem_level >= NIBABEL_ERROR:
            raise InputError(f"{name}: {report.problem_msg}")
        if report.problem_level >= NIBABEL_WARNING:
            warnings.append(f"{name}: {report.problem_msg}; {report.fix_msg}")
    _check_transforms(name, header)
    return warnings


def _check_transforms(name: str, header: Header) -> None:
    """A qform or sform in use (code > 0) must be finite, even when the other one places the
    voxels: outputs copy both."""
    qform = [header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                                 "qoffset_y", "qoffset_z")] + list(header["pixdim"][:4])
    sform = [header["srow_x"], header["srow_y"], header["srow_z"]]
    for label, values in (("qform", qform), ("sform", sform)):
        if int(header[f"{label}_code"]) > 0 and not np.isfinite(np.hstack(values)).all():
            raise InputError(f"{name}: affine contains NaN or Inf ({label})")


def _extensions(name: str, header: Header, body: bytearray, header_end: int) -> list[str]:
    """Walk the header extensions; malformed ones are dropped with a warning (they hold
    metadata meshseg does not use, never voxels) by clearing the extender flag in `body`."""
    flag = header_end - 4
    if len(body) < header_end or body[flag] == 0:
        return []
    offset, end = header_end, int(header["vox_offset"])
    while end - offset >= 16:  # as nibabel reads them: fewer bytes left are padding
        size = int(np.frombuffer(body, dtype=f"{header.endianness}i4", count=1,
                                 offset=offset)[0])
        if size < 16 or size % 16 or offset + size > end:
            break
        offset += size
    if end - offset < 16:
        return []
    body[flag] = 0
    return [f"{name}: header extensions are malformed (a size that is not a multiple of 16 "
            "or that overruns vox_offset); ignored, they hold no voxels"]


def _units(name: str, header: Header) -> list[str]:
    """An unknown space or time unit code (xyzt_units) becomes 0, "unknown", as nibabel
    cannot name it; voxel sizes are read as mm either way."""
    code = int(header["xyzt_units"])
    space = code % 8
    time = code - space  # as nibabel splits it
    known = [c if c in unit_codes.code else 0 for c in (space, time)]
    if known == [space, time]:
        return []
    header["xyzt_units"] = known[0] | known[1]
    return [f"{name}: xyzt_units {code} holds an unknown unit code; set to unknown"]


def _check_scaling(name: str, header: Header) -> None:
    """A slope of 0 or NaN means unscaled (the NIfTI standard); anything else must be finite."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope == 0 or math.isnan(slope):
        return
    if not math.isfinite(slope) or not math.isfinite(inter):
        raise InputError(f"{name}: intensity scaling scl_slope {slope:g}, scl_inter {inter:g} "
                         "is not finite")


def check_intensities(name: str, data: np.ndarray) -> None:
    """Refuse voxels that conform cannot scale to 0..255 meaningfully in float32.

    Raises:
        InputError: NaN/Inf voxels, magnitudes over MAX_INTENSITY, or a non-zero range
            narrower than MIN_SPAN or than MIN_SPAN_STEPS float32 steps at its magnitude.
    """
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(f"{name}: {data.size - int(finite.sum())} voxels are NaN or Inf")
    lo, hi = float(data.min()), float(data.max())
    biggest = max(abs(lo), abs(hi))
    if biggest > MAX_INTENSITY:
        raise InputError(f"{name}: intensities reach {biggest:.3g}, beyond the "
                         f"{MAX_INTENSITY:g} conform can scale (wrong scl_slope?)")
    span = hi - lo
    if span and span < max(MIN_SPAN, MIN_SPAN_STEPS * float(np.spacing(np.float32(biggest)))):
        raise InputError(f"{name}: intensities {lo:.9g}..{hi:.9g} span too little to scale "
                         "to 0..255 (wrong scl_slope?)")


def check_grid(name: str, affine: np.ndarray) -> None:
    """Refuse an affine that places no voxel anywhere sensible: NaN/Inf, 100 m away, singular."""
    if not np.isfinite(affine).all():
        raise InputError(f"{name}: affine contains NaN or Inf")
    if np.abs(affine).max() > MAX_WORLD_MM:
        raise InputError(f"{name}: affine places voxels beyond {MAX_WORLD_MM:g} mm "
                         "(corrupted qform/sform?)")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)) or not zooms.all():
        raise InputError(f"{name}: affine is singular (voxel axes are not independent)")


def check_volume(volume: Volume) -> None:
    """Raise InputError naming the file when the scan cannot be segmented.

    Refused besides `check_intensities` and `check_grid`: an all-zero or constant image, a
    dimension outside 8..2048 voxels, a voxel size outside 0.05..20 mm.
    """
    name, data = volume.name, volume.data
    shape = data.shape
    if any(d < MIN_DIM or d > MAX_DIM for d in shape) or data.size > MAX_VOXELS:
        raise InputError(f"{name}: implausible dimensions {shape} for a brain MRI "
                         f"(each axis must have {MIN_DIM}..{MAX_DIM} voxels)")
    check_grid(name, volume.affine)
    zooms = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < MIN_MM) or np.any(zooms > MAX_MM):
        sizes = " x ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{name}: implausible voxel size {sizes} mm "
                         f"(each must be {MIN_MM:g}..{MAX_MM:g} mm)")
    check_intensities(name, data)
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        what = "all zero" if hi == 0 else f"constant ({hi:g})"
        raise InputError(f"{name}: image is {what}; nothing to segment")
