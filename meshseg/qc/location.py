"""Where a lesion is: the scan registered to MNI152, its mask carried to MNI space, and the
lesion's side, arterial territories and per-lesion figures read there.

Registration is affine (12 degrees of freedom) with SimpleITK's Mattes mutual information, so
that any contrast (T2, FLAIR, T1) registers to nilearn's T1 template; docs/location.md says
why affine and why SimpleITK. Everything else is numpy on the MNI grid of the arterial atlas
(Liu et al. 2023; 157x189x136, 1 mm, SPM's MNI bounding box), which is also the grid of the
``--mni`` mask. The scan's affine is the truth about its orientation: a scan whose voxels are
flipped left-right with an affine that says so gets the same side; a flipped affine alone
mirrors the head, and the side with it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from scipy import ndimage

from meshseg.errors import MeshsegError
from meshseg.io import Volume, kept_arrays, save_array
from meshseg.metrics import label_lesions, voxel_ml

ATLAS_FILE = "ArterialAtlas136.nii.gz"
LABELS_FILE = "ArterialAtlas136.txt"
# A lesion is "bilateral" when the smaller side holds at least this share of it: a few mm of
# registration error moves under 10% of a midline-touching lesion across x = 0 (our choice).
BILATERAL_SHARE = 0.10
REGISTRATION_MM = 3.0  # both images are resampled to this spacing before registering
SKULL_GAP_MM = 6  # eroding this far parts brain and scalp (the skull is 5-10 mm thick)
SKULL_GAP_VOXELS = 3  # ...done in this many voxels (the rough brain is found at 2 mm)
BRAIN_MARGIN_MM = 6  # the template brain grown by this much: the metric's region
PEAK_SHIFT_MM = 10.0  # the fit is compared with itself moved this far along each axis
SAMPLE_STRIDE = 2  # ...at every 2nd template brain voxel along each axis (1/8 of them)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS+ (nibabel) <-> LPS (ITK) world coordinates
A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class Registration:
    """An affine map from MNI mm to the scan's world mm (both RAS+), and how well it fits."""

    scan_from_mni: np.ndarray  # 4x4
    quality: float  # sharpness of the metric's peak at the fit (fit_quality)
    nmi: float  # normalised mutual information with the template in its brain mask
    image: np.ndarray  # the scan on the MNI grid (float32; QC's contrast and asymmetry checks)
    seconds: float


@dataclass(frozen=True)
class Territory:
    """One label of the arterial atlas."""

    index: int
    abbreviation: str
    name: str


@dataclass(frozen=True)
class MniSpace:
    """The MNI grid and what lives on it: atlas labels, template T1 and its brain mask."""

    affine: np.ndarray
    labels: np.ndarray  # int16 arterial territory per voxel (0 = none)
    territories: dict[int, Territory]
    t1: np.ndarray  # template T1, 0..1
    brain: np.ndarray  # bool: template brain mask
    territory_voxels: np.ndarray  # voxels per label (index 0 = none), counted once

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.labels.shape  # type: ignore[return-value]


def atlas_path(name: str = ATLAS_FILE) -> Path:
    """A file of the arterial atlas shipped in the package (meshseg/qc/atlas)."""
    return Path(str(resources.files("meshseg.qc") / "atlas" / name))


def read_territories(path: Path) -> dict[int, Territory]:
    """The atlas' label table (index|abbreviation|name|group). The file as shipped repeats
    the left abbreviation for four right labels (10, 12, 14, 16: MCAPL for the right
    parietal MCA...); the full name says right, so the abbreviation is corrected from it."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        index, abbreviation, name, _group = line.split("|")
        if name.endswith(" right") and abbreviation.endswith("L"):
            abbreviation = abbreviation[:-1] + "R"
        found[int(index)] = Territory(int(index), abbreviation, name)
    return found


def mni152_map(kind: str) -> nib.Nifti1Image:
    """nilearn's bundled MNI152 map `kind` (gm, wm, t1; ICBM 2009a symmetric, 1 mm), opened
    directly: importing nilearn.datasets costs over 2 s.

    Raises:
        MeshsegError: nilearn is not installed, or its installation lacks the map.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MeshsegError("nilearn is not installed: it holds the MNI152 maps")
    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.exists():
        raise MeshsegError(f"{path}: MNI152 map missing from the nilearn installation")
    return nib.load(path)


@functools.lru_cache(maxsize=1)
def mni_space() -> MniSpace:
    """Load the atlas and bring nilearn's template onto its grid (once)."""
    try:
        atlas = nib.load(atlas_path())
        territories = read_territories(atlas_path(LABELS_FILE))
    except (OSError, ValueError) as err:
        raise MeshsegError(f"{atlas_path()}: arterial atlas missing or unreadable "
                           f"({err}); reinstall meshseg") from err

    def make() -> tuple[np.ndarray, ...]:
        labels = np.asarray(atlas.dataobj, np.int16)
        t1 = _on_grid(mni152_map("t1"), atlas.affine, labels.shape)
        return labels, t1, np.bincount(labels.ravel(), minlength=len(territories) + 1)

    labels, t1, sizes = kept_arrays("mni-space", maps_key(), make)
    brain = t1 > 0.2  # nilearn's own threshold for its brain mask
    return MniSpace(atlas.affine, labels, territories, t1, brain, sizes)


@functools.lru_cache(maxsize=1)
def maps_key() -> str:
    """What QC's maps of the MNI grid are made from, as a key of their cache files
    (io.kept_arrays): the code of meshseg's QC, the atlas, and nilearn's templates by its
    version. Reading and hashing them takes a few milliseconds."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("checks.py"), atlas_path()):
        digest.update(path.read_bytes())
    try:
        digest.update(version("nilearn").encode())
    except PackageNotFoundError:
        digest.update(b"no nilearn")
    return digest.hexdigest()[:16]


def tissue_priors() -> tuple[np.ndarray, np.ndarray]:
    """(white-matter, cerebrospinal-fluid) priors, 0..1 on the atlas grid; CSF is the brain
    minus grey and white matter. Not kept in MniSpace: QC needs only the masks thresholded
    from them (checks._tissue_masks)."""
    space = mni_space()
    grey, white = (_on_grid(mni152_map(kind), space.affine, space.shape) for kind in ("gm", "wm"))
    return white, np.clip(space.brain - grey - white, 0.0, 1.0)


def _on_grid(img: nib.Nifti1Image, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A 0..1 map of nilearn's on the atlas grid. Both are 1 mm MNI grids whose voxels
    coincide (the atlas' x axis runs the other way), so this is a flipped slice of the map:
    what linear resampling would give (resampling the three cost about a second of CPU in
    every process that runs QC).

    Raises:
        MeshsegError: the map's grid does not line up with the atlas' (another nilearn).
    """
    voxels = np.linalg.inv(img.affine) @ affine  # atlas voxel -> map voxel
    linear, offset = voxels[:3, :3], voxels[:3, 3]
    steps = np.diag(linear)
    ends = offset + steps * (np.array(shape) - 1)
    if (not np.allclose(linear, np.diag(steps)) or not np.allclose(np.abs(steps), 1)
            or not np.allclose(offset, np.round(offset))
            or (np.minimum(offset, ends) < 0).any()
            or (np.maximum(offset, ends) > np.array(img.shape) - 1).any()):
        raise MeshsegError(f"{img.get_filename()}: MNI152 map not on the atlas' 1 mm grid")
    index = tuple(slice(int(round(start)), None if stop < 0 else int(round(stop)), int(step))
                  for start, stop, step in zip(offset, ends + np.sign(steps), steps))
    # sliced before the conversion to float: the maps are uint8, and a third of each is cut
    return np.asanyarray(img.dataobj)[index].astype(np.float32) / 255


# --- registration ------------------------------------------------------------------------


def _sitk_image(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a voxel array and its RAS+ affine (ITK works in LPS)."""
    import SimpleITK as sitk

    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T, dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    return image


def _coarse(data: np.ndarray, affine: np.ndarray, mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The volume smoothed and resampled to about `mm` spacing (same orientation): the
    registration then works on a few hundred thousand voxels whatever the scan's grid."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    step = np.maximum(mm / zooms, 1.0)
    smooth = ndimage.gaussian_filter(data, sigma=np.maximum(step / 2.355, 0.0) * (step > 1))
    shape = np.maximum(np.floor(np.array(data.shape) / step), 1).astype(int)
    scale = np.diag([*step, 1.0])
    out = ndimage.affine_transform(smooth, step, output_shape=tuple(shape), order=1)
    return out, affine @ scale


def register(volume: Volume) -> Registration:
    """Affine registration of the scan to the MNI152 template: the scan's rough brain
    (`_rough_brain`: skull, scalp, eyes and neck of a whole head dropped, since they would
    pull on the brain-only template) fitted rigid, then 12 dof, then 12 dof again also masked
    by the template's brain carried back through that fit. Crude, but territory-level
    location needs only the brain within a few millimetres.

    Raises:
        MeshsegError: SimpleITK is missing or the optimiser fails on this scan.
    """
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise MeshsegError("lesion location needs SimpleITK: pip install simpleitk") from err
    start = time.perf_counter()
    space = mni_space()
    brain, fixed, fixed_mask = _template()
    (data, affine), (rough, fine_affine) = _alongside(
        lambda: _coarse(volume.data, volume.affine, REGISTRATION_MM),
        lambda: _rough_brain_of(volume))
    data = data * (_resample(rough, fine_affine, affine, np.eye(4), data.shape) > 0.5)
    moving = _sitk_image(data, affine)
    try:
        fit = _optimise(fixed, moving, fixed_mask, sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS))
        fit = _optimise(fixed, moving, fixed_mask, _as_affine(fit))
        mni_from_scan = np.linalg.inv(LPS @ _matrix(fit) @ LPS)
        scan_brain = _resample(brain, space.affine, affine, mni_from_scan, data.shape)
        fit = _optimise(fixed, _sitk_image(data * (scan_brain > 0.5), affine), fixed_mask, fit)
    except RuntimeError as err:  # ITK's message: a location line, then "ITK ERROR: ...: why"
        lines = [line for line in str(err).splitlines() if "ITK ERROR" in line] or [str(err)]
        why = lines[0].split(": ", 2)[-1].strip()
        raise MeshsegError(f"{volume.name}: registration to MNI failed ({why})") from err
    scan_from_mni = LPS @ _matrix(fit) @ LPS
    (quality, nmi), image = _alongside(
        lambda: fit_quality(volume, scan_from_mni),
        lambda: to_mni(volume.data, volume.affine, scan_from_mni))
    return Registration(scan_from_mni, quality, nmi, image,
                        round(time.perf_counter() - start, 3))


def _rough_brain_of(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(`_rough_brain` of the scan at SKULL_GAP_MM / SKULL_GAP_VOXELS spacing, its affine)."""
    fine, affine = _coarse(volume.data, volume.affine, SKULL_GAP_MM / SKULL_GAP_VOXELS)
    return _rough_brain(fine), affine


def _alongside(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """(first(), second()), first in a helper thread while second runs here, where the
    registration may use two threads or more: their smoothing and interpolation release the
    GIL, and most of QC otherwise keeps one core of two idle (docs/benchmarks.md)."""
    import SimpleITK as sitk

    if sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() < 2:
        return first(), second()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(first)
        out = second()
        return pending.result(), out


def _template() -> tuple[np.ndarray, Any, Any]:
    """(the template's brain grown by BRAIN_MARGIN_MM, a bool mask on the MNI grid; the
    template at REGISTRATION_MM as a SimpleITK image; the metric's mask on that image): the
    fixed side of every registration."""
    import SimpleITK as sitk

    brain, template, region = template_arrays()
    fixed_mask = sitk.Cast(_sitk_image(*region) > 0.5, sitk.sitkUInt8)
    return brain, _sitk_image(*template), fixed_mask


@functools.lru_cache(maxsize=1)
def template_arrays() -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray],
                               tuple[np.ndarray, np.ndarray]]:
    """The arrays behind `_template`, kept on disk (io.kept_arrays): the grown brain, and
    (array, affine) of the template and of the grown brain at REGISTRATION_MM."""
    space = mni_space()

    def make() -> tuple[np.ndarray, ...]:
        brain = ndimage.binary_dilation(space.brain, iterations=BRAIN_MARGIN_MM)
        return (brain, *_coarse(space.t1, space.affine, REGISTRATION_MM),
                *_coarse(brain.astype(np.float32), space.affine, REGISTRATION_MM))

    brain, template, template_affine, region, region_affine = kept_arrays(
        "registration-template", maps_key(), make)
    return brain, (template, template_affine), (region, region_affine)


@functools.lru_cache(maxsize=1)
def _brain_sample() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(the MNI voxels, as np.nonzero gives, of every SAMPLE_STRIDE-th template brain voxel
    along each axis; the template there): where fit_quality reads the NMI."""
    space = mni_space()
    grid = np.zeros(space.shape, bool)
    grid[::SAMPLE_STRIDE, ::SAMPLE_STRIDE, ::SAMPLE_STRIDE] = True
    index = np.nonzero(space.brain & grid)
    return index, space.t1[index]


def fit_quality(volume: Volume, scan_from_mni: np.ndarray) -> tuple[float, float]:
    """The fit's sharpness and NMI. Sharpness is (NMI - 1) over (the median NMI of the fit
    moved PEAK_SHIFT_MM both ways along each axis - 1): how far the fit stands above its
    own neighbourhood. A scan's NMI also depends on its contrast, noise and slice thickness,
    so an absolute NMI cannot tell a whole-head 2 mm T2's good fit from a sharp T1's poor
    one; the ratio can (docs/location.md has the measurements). Each NMI is read at a
    regular 1/8 of the template's brain voxels (_brain_sample) rather than on the whole
    resampled grid: seven whole-grid resamplings were most of QC's time."""
    index, template = _brain_sample()
    upper = np.array(volume.data.shape)[:, None] - 0.5

    def nmi(moved: np.ndarray) -> float:
        voxels = _scan_voxels(volume.affine, moved, index)
        seen = ((voxels > -0.5) & (voxels < upper)).all(0)  # inside the field of view
        image = ndimage.map_coordinates(volume.data, voxels[:, seen], order=1)
        return mutual_information(image, template[seen])

    at_fit = nmi(scan_from_mni)
    around = []
    for axis in range(3):
        for shift in (-PEAK_SHIFT_MM, PEAK_SHIFT_MM):
            step = np.eye(4)
            step[axis, 3] = shift
            around.append(nmi(scan_from_mni @ step))
    sharpness = (at_fit - 1) / max(float(np.median(around)) - 1, 1e-4)
    return round(sharpness, 2), at_fit


def _otsu(data: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold: the intensity that best splits the histogram into two classes
    (a few lines of numpy: scipy has none, and scikit-image is not worth a dependency)."""
    counts, edges = np.histogram(data, bins)
    centres = (edges[1:] + edges[:-1]) / 2
    weight = np.cumsum(counts)[:-1]
    mass = np.cumsum(counts * centres)[:-1]
    total, total_mass = counts.sum(), (counts * centres).sum()
    between = (total_mass * weight / total - mass) ** 2 / (weight * (total - weight) + 1e-9)
    return float(centres[np.argmax(between)])


def _rough_brain(data: np.ndarray) -> np.ndarray:
    """A crude brain mask of a scan resampled to 2 mm: voxels above Otsu's threshold, opened by
    SKULL_GAP_VOXELS so that the scalp lets go of the brain, the largest piece kept and its
    holes (dark white matter or CSF) filled slice by slice. On a brain-extracted scan it is
    about the whole brain; on a whole head it drops skull, scalp, eyes and neck."""
    bright = data > _otsu(data)
    cross = ndimage.generate_binary_structure(3, 1)
    core = ndimage.binary_erosion(bright, cross, iterations=SKULL_GAP_VOXELS)
    labels, count = ndimage.label(core)
    if count == 0:
        return np.ones(data.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = ndimage.binary_dilation(labels == sizes.argmax(), cross,
                                    iterations=SKULL_GAP_VOXELS) & bright
    for axis in range(3):
        brain = np.stack([ndimage.binary_fill_holes(plane)
                          for plane in np.moveaxis(brain, axis, 0)], axis)
    return brain


def _as_affine(rigid):
    """A rigid SimpleITK transform as a 12-dof one with the same map."""
    import SimpleITK as sitk

    out = sitk.AffineTransform(3)
    out.SetCenter(rigid.GetCenter())
    out.SetMatrix(rigid.GetMatrix())
    out.SetTranslation(rigid.GetTranslation())
    return out


def _optimise(fixed, moving, fixed_mask, initial):
    """One Mattes-MI gradient-descent stage at two resolutions; returns the fitted transform
    of the initial transform's type."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=1)  # deterministic sampling
    method.SetInterpolator(sitk.sitkLinear)
    method.SetMetricFixedMask(fixed_mask)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=False)
    out = method.Execute(fixed, moving)
    if isinstance(out, sitk.CompositeTransform):
        out = out.GetNthTransform(0)
    return type(initial)(out)


def _matrix(transform) -> np.ndarray:
    """4x4 matrix (LPS) of a SimpleITK affine or rigid transform."""
    linear = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = np.array(transform.GetTranslation()) + centre - linear @ centre
    return out


def to_mni(data: np.ndarray, affine: np.ndarray, scan_from_mni: np.ndarray,
           order: int = 1) -> np.ndarray:
    """A scan-space array resampled onto the MNI grid (0 outside the scan). Only the MNI box
    that the array's nonzero voxels map into is resampled, from the array's own nonzero box
    (with the one voxel of zeros that the interpolation reaches): elsewhere it reads zeros
    only, so a lesion mask costs a small part of either grid."""
    space = mni_space()
    out = np.zeros(space.shape, np.float32)
    spans = [np.flatnonzero(np.any(data, axis=tuple(a for a in range(3) if a != axis)))
             for axis in range(3)]
    if any(len(span) == 0 for span in spans):
        return out
    # the interpolation reaches one voxel past the nonzero ones
    corners = np.array(list(itertools.product(*[(s[0] - 1, s[-1] + 1) for s in spans]))).T
    mni = (np.linalg.inv(space.affine) @ np.linalg.inv(scan_from_mni) @ affine
           @ np.vstack([corners, np.ones(corners.shape[1])]))[:3]
    start = np.clip(np.floor(mni.min(1)).astype(int), 0, space.shape)
    stop = np.clip(np.ceil(mni.max(1)).astype(int) + 1, 0, space.shape)
    if (stop <= start).any():
        return out
    low = [max(span[0] - 1, 0) for span in spans]
    source = data[tuple(slice(lo, span[-1] + 2) for lo, span in zip(low, spans))]
    out[tuple(map(slice, start, stop))] = _resample(source, affine @ _shift(low),
                                                    space.affine @ _shift(start),
                                                    scan_from_mni, tuple(stop - start), order)
    return out


def _shift(voxels) -> np.ndarray:
    """The voxel-to-voxel affine of a box starting at `voxels` (3 indices)."""
    out = np.eye(4)
    out[:3, 3] = voxels
    return out


def _scan_voxels(affine: np.ndarray, scan_from_mni: np.ndarray,
                 index: tuple[np.ndarray, ...]) -> np.ndarray:
    """Scan voxel coordinates (3xN) of MNI grid voxels `index` (as np.nonzero gives)."""
    mni = np.vstack([*index, np.ones(len(index[0]))])
    return (np.linalg.inv(affine) @ scan_from_mni @ mni_space().affine @ mni)[:3]


def _resample(data: np.ndarray, source: np.ndarray, target: np.ndarray, source_from_target:
              np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """`data` (voxel-to-world `source`) on the grid (`target`, `shape`) whose world maps to
    the source world by `source_from_target`."""
    voxels = np.linalg.inv(source) @ source_from_target @ target
    return ndimage.affine_transform(np.asarray(data, np.float32), voxels, output_shape=shape,
                                    order=order)


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Studholme's normalised mutual information (H(A) + H(B)) / H(A, B) of paired samples:
    1 when independent, 2 when one determines the other; contrast-agnostic, so it scores
    T2, FLAIR and T1 alike."""
    if not a.any() or a.max() == a.min():
        return 1.0
    p = _joint_histogram(a, b, bins) / a.size

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return round((entropy(p.sum(0)) + entropy(p.sum(1))) / entropy(p), 4)


def _joint_histogram(a: np.ndarray, b: np.ndarray, bins: int) -> np.ndarray:
    """np.histogram2d's counts (`bins` equal bins over each sample's range, the top edge
    included) from one bincount: histogram2d's searchsorted was a third of fit_quality."""

    def bin_of(x: np.ndarray) -> np.ndarray:
        low, high = float(x.min()), float(x.max())
        scale = bins / (high - low) if high > low else 0.0
        return np.minimum(((x - low) * scale).astype(np.int64), bins - 1)

    return np.bincount(bin_of(a) * bins + bin_of(b), minlength=bins * bins).reshape(bins, bins)


# --- location ----------------------------------------------------------------------------


def locate(mask: np.ndarray, volume: Volume, registration: Registration) -> dict:
    """Side, territories and per-lesion figures (`lesions`, largest first) of a scan-space 0/1
    mask, with the mask on the MNI grid under key "mni_mask" (the caller pops it to write
    --mni)."""
    space = mni_space()
    mni_mask = to_mni(mask, volume.affine, registration.scan_from_mni, order=1) >= 0.5
    report: dict = {"registration_quality": registration.quality,
                    "registration_nmi": registration.nmi,
                    "registration_seconds": registration.seconds}
    report.update(hemispheres(mni_mask, space.affine))
    report["lesions"] = lesions(mask, volume.affine, registration.scan_from_mni)
    report["largest_centroid_mni"] = (report["lesions"][0]["centroid_mni"]
                                      if report["lesions"] else None)
    report["territories"] = territories(mni_mask, space)
    report["mni_mask"] = mni_mask.astype(np.uint8)
    return report


def lesions(mask: np.ndarray, affine: np.ndarray, scan_from_mni: np.ndarray) -> list[dict]:
    """One row per 26-connected lesion, largest first: its mL, side, MNI centroid and
    territories. Lesions are found on the scan's own grid (where they are what the model
    drew), so their mL add up to the scan's; each is carried to MNI as the label it gives
    its nearest voxels (one resampling for all of them). A lesion too small to keep an MNI
    voxel takes its side from its centroid and has no territory rows."""
    labels, count = label_lesions(mask)
    if count == 0:
        return []
    space = mni_space()
    index = np.arange(1, count + 1)
    centres, sizes = _centroids(labels, count)
    mni_labels = np.rint(to_mni(labels, affine, scan_from_mni, order=0)).astype(np.int32)
    boxes = ndimage.find_objects(mni_labels, max_label=count)  # each lesion's part of MNI
    volumes = split_rounded(sizes * voxel_ml(affine), 2)
    rows = []
    for i in np.argsort(-sizes, kind="stable"):
        centroid = [round(float(v), 1)
                    for v in (np.linalg.inv(scan_from_mni) @ affine @ [*centres[i], 1.0])[:3]]
        side, where = "none", []
        if boxes[i] is not None:
            region = mni_labels[boxes[i]] == index[i]
            side = hemispheres(region, space.affine @ _shift([s.start for s in boxes[i]]))["side"]
            where = territories(region, space, boxes[i])
        if side == "none":
            side = "left" if centroid[0] < 0 else "right"
        rows.append({"ml": volumes[i], "side": side, "centroid_mni": centroid,
                     "territories": where})
    return rows


def _centroids(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxel centroid of each label 1..count, as (count, 3); its voxel count), from the
    labelled voxels' coordinates alone: ndimage.center_of_mass over a grid of ones read
    every voxel of the scan (a third of a second)."""
    index = np.nonzero(labels)
    which = labels[index] - 1
    sizes = np.bincount(which, minlength=count)
    sums = np.stack([np.bincount(which, weights=axis, minlength=count) for axis in index], 1)
    return sums / sizes[:, None], sizes


def split_rounded(values: np.ndarray, decimals: int) -> list[float]:
    """`values` rounded to `decimals` so that they still add up to their rounded total
    (largest remainders get the leftover steps), as a per-lesion table must."""
    step = 10.0 ** -decimals
    scaled = np.asarray(values, float) / step
    floors = np.floor(scaled)
    short = int(round(round(float(scaled.sum())) - floors.sum()))
    floors[np.argsort(floors - scaled, kind="stable")[:short]] += 1
    return [round(float(v) * step, decimals) for v in floors]


def hemispheres(mni_mask: np.ndarray, affine: np.ndarray) -> dict:
    """Percent of the lesion left (MNI x < 0) and right (x > 0; x = 0 counts half to each),
    and the side: left, right, bilateral (BILATERAL_SHARE) or none."""
    total = int(mni_mask.sum())
    if total == 0:
        return {"left_pct": 0.0, "right_pct": 0.0, "side": "none"}
    index = np.nonzero(mni_mask)
    x = affine[0, :3] @ np.array(index, dtype=float) + affine[0, 3]
    left = float((x < 0).sum() + 0.5 * (x == 0).sum()) / total
    side = ("bilateral" if min(left, 1 - left) >= BILATERAL_SHARE
            else "left" if left > 0.5 else "right")
    return {"left_pct": round(100 * left, 1), "right_pct": round(100 * (1 - left), 1),
            "side": side}


def territories(mni_mask: np.ndarray, space: MniSpace,
                box: tuple[slice, ...] | None = None) -> list[dict]:
    """Each territory the lesion touches, largest share first: percent of the lesion in it
    and percent of the territory damaged; the lesion outside every territory as index 0.
    `mni_mask` covers the MNI grid, or only its part `box` when given."""
    total = int(mni_mask.sum())
    if total == 0:
        return []
    labels = space.labels if box is None else space.labels[box]
    hit = np.bincount(labels[mni_mask].ravel(), minlength=len(space.territories) + 1)
    size = space.territory_voxels
    rows = []
    outside = Territory(0, "outside", "outside every territory")
    for index in np.flatnonzero(hit):
        territory = space.territories.get(int(index), outside)
        rows.append({"abbreviation": territory.abbreviation, "name": territory.name,
                     "lesion_pct": round(100 * float(hit[index]) / total, 1),
                     "territory_pct": round(100 * float(hit[index]) / float(size[index]), 1)
                     if index else None})
    return sorted(rows, key=lambda row: -row["lesion_pct"])


def write_mni_mask(mni_mask: np.ndarray, path: Path) -> None:
    """The lesion mask on the MNI grid (uint8), atomically."""
    save_array(mni_mask.astype(np.uint8), mni_space().affine, path)
