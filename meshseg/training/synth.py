"""Synthetic T2-weighted heads with chronic stroke lesions, from the MNI152 maps nilearn ships.

Used for the example scan, for tests, and to train the bundled model without patient data, so
the heads aim at what a real, not skull-stripped T2 scan of a chronic stroke looks like. Each
head is fully determined by its seed (one numpy Generator, no global state):

1. Anatomy on the template grid (ICBM 2009a, RAS, 1 mm; computed once per process): grey and
   white matter fractions, CSF (the sulci-filled brain envelope minus both), deep grey matter
   (darker on T2), the lateral ventricles; around the brain, layers by distance from it:
   subarachnoid CSF, skull (dark tables, marrow), scalp (skin, bright fat); below it a neck and
   face (muscle/fat mixture, fluid-bright eyes in orbital fat, air-dark sinuses and pharynx).
2. A chronic stroke in one hemisphere (in a tenth of the heads a smaller, older one in the
   other too), in a vascular territory (MCA most often; see TERRITORIES): an irregular region
   (a wedge from the cortex, or a deep ellipsoid, plus smooth noise at three scales,
   thresholded to the drawn volume) of grey matter, white matter and the sulci between them
   turned into a fluid cavity lined and crossed by gliosis, with ex-vacuo widening of the
   ventricle on its side. Unlabelled look-alikes are added too: periventricular white-matter
   hyperintensities, sulci and ventricles widened by age.
3. T2 contrast drawn per head (SynthSeg-style domain randomisation): CSF > GM > WM, except in
   `SynthOptions.random_contrast` of the heads (random brain intensities); the cavity always
   stays fluid-like. Multiplicative texture noise within tissues.
4. A random affine (head size, pose) and a smooth random deformation map the head into a
   scanner grid: native-like (axial/sagittal/coronal, oblique, 0.5-1.2 mm in-plane, 1-5 mm
   slices with a box slice profile, any axis order) or FreeSurfer-conformed-like (256^3 1 mm
   LIA, half of them blurred like a resliced 2-5 mm acquisition); then bias field, Rician
   noise, float32 or int16 storage.

The lesion mask is cavity plus gliotic rim, i.e. all tissue the stroke made abnormal on T2, as
lesions are traced on T2 in ARC. It is the lesion fraction resampled exactly as the image is
and thresholded at one half, so mask and image share grid, affine and partial volume.
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

NECK_MM = 30  # the template stops at the medulla: continue cord and neck this far below it
BILATERAL_SHARE = 0.1  # heads with a second, older and smaller infarct on the other side
LEFT_SHARE = 0.75  # ARC is an aphasia cohort: mostly left-hemisphere strokes
# Vascular territories of the left hemisphere (x mirrored for the right): centre (MNI mm),
# lesion shape (relative radii along x, y, z), largest lesion they hold (mL), share.
TERRITORIES = (
    ("mca", (-42.0, -10.0, 10.0), (18.0, 40.0, 30.0), 1000.0, 0.55),
    ("lenticulostriate", (-24.0, 2.0, 6.0), (8.0, 14.0, 10.0), 30.0, 0.12),
    ("aca", (-8.0, 18.0, 40.0), (7.0, 38.0, 24.0), 120.0, 0.08),
    ("pca", (-20.0, -76.0, 4.0), (15.0, 22.0, 18.0), 160.0, 0.12),
    ("thalamic", (-12.0, -18.0, 6.0), (6.0, 8.0, 6.0), 8.0, 0.05),
    ("cerebellar", (-24.0, -64.0, -34.0), (16.0, 16.0, 13.0), 60.0, 0.08),
)
# Cortical territories: a point deep in the territory (left); lesions grow in from the
# surface along the ray from it through the drawn centre.
CORTICAL = {"mca": (-22.0, -12.0, 8.0), "aca": (-4.0, 0.0, 20.0), "pca": (-12.0, -40.0, 4.0),
            "cerebellar": (-10.0, -55.0, -28.0)}
BRAIN_CENTRE_MM = (0.0, -17.0, 5.0)  # centre of the template brain's bounding box
WARP_NODE_MM = 48.0  # spacing of the smooth deformation's control points


@dataclass(frozen=True)
class SynthOptions:
    """What to draw: lesion presence and size range (mL), and the kind of scan grid."""

    lesion: bool = True
    lesion_ml: tuple[float, float] = (ARC_QUARTILES_ML[0], ARC_QUARTILES_ML[-1])
    native_grid: bool = True  # random scanner grid; False: 256^3 1 mm LIA (conformed-like)
    random_contrast: float = 0.15  # share of heads with random (not T2-ordered) brain contrast
    # A folder of binary lesion masks in MNI space (e.g. a lesion atlas of real patients):
    # lesions are drawn from it instead of being made up. Read at generation time, never
    # bundled.
    lesions: Path | None = None
    skull_stripped: float = 0.0  # share of heads brain-extracted (zero outside the brain)


EXAMPLE = SynthOptions(random_contrast=0.0)  # what `meshseg example` writes: a T2 head


@dataclass(frozen=True)
class SynthHead:
    """One synthetic scan: image (float32 or int16), lesion mask and optional brain mask
    (uint8), all on the same grid and affine."""

    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    brain: nib.Nifti1Image | None

    @property
    def lesion_ml(self) -> float:
        """Lesion volume on the scan grid (mL)."""
        return float(np.asarray(self.mask.dataobj).sum() * voxel_ml(self.mask.affine))


def synth_head(seed: int, options: SynthOptions = SynthOptions()
               ) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(T2-weighted image, lesion mask) on one scan grid, fully determined by `seed`."""
    head = draw_head(seed, options)
    return head.image, head.mask


def write_pair(seed: int, image_path: Path, mask_path: Path | None = None,
               options: SynthOptions = EXAMPLE) -> float:
    """Write one synthetic scan (and its mask), atomically; returns the lesion volume in mL.

    The default options make the example scan: always T2 contrast."""
    head = draw_head(seed, options)
    save_array(np.asarray(head.image.dataobj), head.image.affine, image_path)
    if mask_path is not None:
        save_array(np.asarray(head.mask.dataobj), head.mask.affine, mask_path)
    return head.lesion_ml


def make_dataset(folder: Path, n: int, seed: int, options: SynthOptions = SynthOptions(),
                 jobs: int = 1) -> Path:
    """Write n pairs (seeds seed .. seed+n-1) and a manifest.csv (image,mask,subject,lesion_ml).

    Paths in the manifest are relative to its folder. `jobs` worker processes draw heads in
    parallel; the result does not depend on it.
    """
    folder = Path(folder)
    make_folder(folder)
    subjects = [f"synth{seed + index:05d}" for index in range(n)]
    images = [folder / f"{subject}_T2w.nii.gz" for subject in subjects]
    masks = [folder / f"{subject}_lesion.nii.gz" for subject in subjects]
    seeds = [seed + index for index in range(n)]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            volumes = list(track(pool.map(write_pair, seeds, images, masks, [options] * n), n,
                                 "synth"))
    else:  # no pool: keeps the per-process anatomy cache and plain tracebacks
        volumes = list(track(map(write_pair, seeds, images, masks, [options] * n), n, "synth"))
    rows = ["image,mask,subject,lesion_ml"] + [
        f"{image.name},{mask.name},{subject},{ml:.3f}"
        for image, mask, subject, ml in zip(images, masks, subjects, volumes)]
    manifest = folder / "manifest.csv"
    with atomic_path(manifest) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return manifest


def lesion_volume_ml(rng: np.random.Generator, limits: tuple[float, float]) -> float:
    """A lesion volume with ARC's quartiles, restricted to `limits` (mL): drawn
    log-uniformly within a quartile chosen at random, so the training data has ARC's spread
    rather than a log-uniform one dominated by tiny lesions."""
    quartile = int(rng.integers(4))
    low = max(ARC_QUARTILES_ML[quartile], limits[0])
    high = min(ARC_QUARTILES_ML[quartile + 1], limits[1])
    if low >= high:  # the chosen quartile lies outside the limits: draw within the limits
        low, high = limits
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_head(seed: int, options: SynthOptions = SynthOptions(), brain: bool = False
              ) -> SynthHead:
    """One synthetic head; `brain` also resamples the brain envelope (for checks, ~0.5 s)."""
    low, high = options.lesion_ml
    if not 0 < low <= high:
        raise MeshsegError(f"lesion size range {low}-{high} mL: need 0 < min <= max")
    for name in ("random_contrast", "skull_stripped"):
        if not 0 <= getattr(options, name) <= 1:
            raise MeshsegError(f"{name} {getattr(options, name)}: need a share in 0..1")
    rng = np.random.default_rng(seed)
    atlas = _atlas()
    pose = _draw_pose(rng)
    gm, wm = atlas.gm.copy(), atlas.wm.copy()
    lesions = _draw_lesions(rng, atlas, options, abs(np.linalg.det(pose[:3, :3])))
    _widen_ventricles(rng, atlas, gm, wm, lesions)
    image = _render(rng, atlas, gm, wm, lesions, options.random_contrast)
    grid_shape, grid_affine = (_native_grid(rng, pose) if options.native_grid
                               else _conformed_grid(rng, pose))
    scan = _Scan(rng, atlas.affine, pose, grid_shape, grid_affine, not options.native_grid)
    intensity = _scanner(rng, scan.resample(image, (slice(None),) * 3))
    mask = np.zeros(grid_shape, np.uint8)
    for lesion in lesions:
        mask |= scan.resample(lesion.extent, lesion.box) >= 0.5
    if options.skull_stripped and rng.random() < options.skull_stripped:
        intensity[scan.resample(*_brain_extraction(rng, atlas)) < 0.5] = 0
    brain_img = None
    if brain:
        envelope = atlas.envelope[atlas.brain_box].astype(np.float32)
        brain_img = nib.Nifti1Image(
            (scan.resample(envelope, atlas.brain_box) >= 0.5).astype(np.uint8), grid_affine)
    return SynthHead(nib.Nifti1Image(intensity, grid_affine),
                     nib.Nifti1Image(mask, grid_affine), brain_img)


# --- anatomy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Atlas:
    """Template-space maps (RAS voxel order, 1 mm), shared by every head of a process."""

    affine: np.ndarray  # voxel -> MNI mm
    gm: np.ndarray  # grey-matter fraction, float32
    wm: np.ndarray  # white-matter fraction, float32
    envelope: np.ndarray  # bool: brain with sulci and ventricles filled
    brain_box: tuple[slice, slice, slice]  # bounding box of the envelope
    outside_mm: np.ndarray  # float32 distance outside the envelope (0 inside)
    deep: np.ndarray  # float32 0..1: how much grey matter here is deep (basal ganglia...)
    ventricle_box: tuple[slice, slice, slice]  # lateral ventricles with a margin
    ventricle_mm: np.ndarray  # float32 distance to the lateral ventricles, on ventricle_box

    def mm(self, axis: int, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """MNI coordinate (mm) of each voxel along `axis` (within `box`), as float32."""
        return _mm(self.affine, self.gm.shape, axis, box)

    def ventricle_distance(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Distance to the lateral ventricles (mm) on `box`; 100 where not computed."""
        out = np.full([s.stop - s.start for s in box], 100.0, np.float32)
        inner = tuple(slice(max(a.start, b.start), min(a.stop, b.stop))
                      for a, b in zip(box, self.ventricle_box))
        if all(s.stop > s.start for s in inner):
            out[tuple(slice(i.start - a.start, i.stop - a.start) for i, a in zip(inner, box))] = (
                self.ventricle_mm[tuple(slice(i.start - b.start, i.stop - b.start)
                                        for i, b in zip(inner, self.ventricle_box))])
        return out


def _mm(affine: np.ndarray, shape: tuple[int, ...], axis: int,
        box: tuple[slice, ...] | None = None) -> np.ndarray:
    """MNI coordinate (mm) along `axis` of an axis-aligned grid, optionally within `box`."""
    index = np.arange(shape[axis])[box[axis] if box is not None else slice(None)]
    return (index * affine[axis, axis] + affine[axis, 3]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    """Load the MNI152 maps and derive what every head needs (about 5 s, once per process)."""
    gm_img = mni152_map("gm")
    pad = ((0, 0), (0, 0), (NECK_MM, 0))
    gm = np.pad(_unit(gm_img), pad, mode="edge")
    wm = np.pad(_unit(mni152_map("wm")), pad, mode="edge")
    mask = np.pad(_unit(mni152_map("t1")) > 0.2, pad, mode="edge")  # nilearn's brain mask
    affine = gm_img.affine.copy()
    affine[2, 3] -= NECK_MM
    # The envelope closes the sulci: the CSF in them comes from envelope minus tissue.
    envelope = ndimage.binary_fill_holes(
        mask | (ndimage.gaussian_filter(gm + wm, 2.0) > 0.35))
    outside = ndimage.distance_transform_edt(~envelope).astype(np.float32)
    brain = _bounding_box(envelope, 1)
    depth = ndimage.distance_transform_edt(envelope[brain]).astype(np.float32)
    deep = np.zeros(gm.shape, np.float32)
    deep[brain] = np.clip((depth - 14.0) / 6.0, 0.0, 1.0)
    csf = envelope[brain] - gm[brain] - wm[brain]
    x, y, z = (_mm(affine, gm.shape, axis, brain) for axis in range(3))
    # Lateral ventricles' box (|x| < 34 leaves out the Sylvian cisterns).
    region = (((np.abs(x) >= 2) & (np.abs(x) < 34))[:, None, None]
              & ((y > -50) & (y < 35))[None, :, None] & ((z > -15) & (z < 40))[None, None, :])
    ventricles = (csf > 0.5) & (depth > 12) & region
    labels, count = ndimage.label(ventricles)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    ventricles = sizes[labels] >= 500  # the two lateral ventricles, not sulcal specks
    box = _bounding_box(ventricles, 14)
    distance = ndimage.distance_transform_edt(~ventricles[box]).astype(np.float32)
    box = tuple(slice(b.start + a.start, b.start + a.stop) for a, b in zip(box, brain))
    return _Atlas(affine, gm, wm, envelope, brain, outside, deep, box, distance)


def _unit(img: nib.Nifti1Image) -> np.ndarray:
    """The map as float32 scaled to 0..1 (the files store 0..255), as nilearn's loaders do."""
    data = np.asarray(img.dataobj, np.float32)
    return data / data.max()


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Index box around the True voxels of a 3-D mask, grown by `margin` and clipped."""
    found = np.argwhere(mask)
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _brain_extraction(rng: np.random.Generator, atlas: _Atlas
                      ) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """(float32 mask, template box) of what a brain-extraction tool keeps: the brain envelope
    with a ragged margin of 0-3 mm of the CSF and meninges around it (real scans of stroke
    patients are often shared skull-stripped, e.g. after normalisation to MNI space)."""
    box = tuple(slice(max(b.start - 4, 0), min(b.stop + 4, n))
                for b, n in zip(atlas.brain_box, atlas.outside_mm.shape))
    margin = rng.uniform(0.0, 2.0) + 0.7 * smooth_noise(rng, atlas.outside_mm[box].shape, 20.0)
    return (atlas.outside_mm[box] <= np.clip(margin, 0.0, 3.0)).astype(np.float32), box


# --- smooth random fields -------------------------------------------------------------------


def _spline_matrix(n: int, nodes: int) -> np.ndarray:
    """(n, nodes) cubic B-spline weights placing `nodes` control points evenly along n voxels."""
    position = np.linspace(1.0, nodes - 2.0, n)
    t = np.abs(position[:, None] - np.arange(nodes)[None, :])
    weights = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return weights.astype(np.float32)


def _separable(coef: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """Apply one matrix per leading axis of `coef` (axis k: matrices[k] @ ...).

    Used for every smooth field and for slice profiles: three matrix products are ~10x faster
    than ndimage.zoom or map_coordinates over a head volume.
    """
    out = np.ascontiguousarray(coef)
    # Last axis first: while the leading axes are still small the batched products are few.
    for axis in reversed(range(len(matrices))):
        matrix = matrices[axis]
        if matrix is None:
            continue
        before, after = math.prod(out.shape[:axis]), math.prod(out.shape[axis + 1:])
        shape = (*out.shape[:axis], matrix.shape[0], *out.shape[axis + 1:])
        if after == 1:  # reshapes below are views: no copies of the volume
            out = (out.reshape(before, -1) @ matrix.T).reshape(shape)
        else:
            out = np.matmul(matrix, out.reshape(before, -1, after)).reshape(shape)
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: float
                  ) -> np.ndarray:
    """Smooth Gaussian noise (std ~1) varying over `spacing` voxels: a cubic B-spline through
    random control points, or for fine noise (where that costs more) blurred white noise."""
    if spacing <= 4:
        sigma = spacing / 2
        white = rng.standard_normal(shape, dtype=np.float32)
        # std of white noise after a 3-D Gaussian blur: (2 sqrt(pi) sigma)^(-3/2)
        scale = np.float32((2 * math.sqrt(math.pi) * sigma) ** 1.5)
        return ndimage.gaussian_filter(white, sigma, truncate=3.0) * scale
    nodes = [int(math.ceil(n / spacing)) + 3 for n in shape]
    matrices = [_spline_matrix(n, k) for n, k in zip(shape, nodes)]
    variance = np.prod([float((m**2).sum(1).mean()) for m in matrices])
    coef = rng.standard_normal(nodes, dtype=np.float32) / np.float32(math.sqrt(variance))
    return _separable(coef, matrices)


# --- lesion -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lesion:
    """A chronic infarct on a box of the template grid."""

    box: tuple[slice, slice, slice]
    extent: np.ndarray  # float32 fraction of each voxel's tissue that is lesion (cavity + rim)
    cavity: np.ndarray  # float32 fraction of each voxel's tissue that is fluid cavity
    side: float  # -1 left, +1 right
    ml: float  # volume on the template grid


def _draw_lesions(rng: np.random.Generator, atlas: _Atlas, options: SynthOptions,
                  scaling: float) -> list[_Lesion]:
    """The head's infarcts: one, or in some heads a smaller old one in the other hemisphere
    too; together of a volume drawn from `options` (divided by the head's volume `scaling`,
    so the scan shows the drawn size)."""
    if not options.lesion:
        return []
    if options.lesions is not None:
        lesion = _atlas_lesion(rng, atlas, options.lesions, options.lesion_ml)
        return [] if lesion is None else [lesion]
    total_ml = lesion_volume_ml(rng, options.lesion_ml) / scaling
    side = -1.0 if rng.random() < LEFT_SHARE else 1.0
    share = rng.uniform(0.05, 0.3) if rng.random() < BILATERAL_SHARE else 0.0
    drawn = [_draw_lesion(rng, atlas, total_ml * (1 - share), side)]
    if share > 0:
        drawn.append(_draw_lesion(rng, atlas, total_ml * share, -side))
    return [lesion for lesion in drawn if lesion is not None]


def _draw_lesion(rng: np.random.Generator, atlas: _Atlas, volume_ml: float, side: float
                 ) -> _Lesion | None:
    """An irregular infarct of about `volume_ml` in a vascular territory of one hemisphere
    (`side` -1 left, +1 right); None if it has no room."""
    fits = [t for t in TERRITORIES if t[3] >= volume_ml]
    shares = np.array([t[4] for t in fits])
    name, centre, shape, _, _ = fits[int(rng.choice(len(fits), p=shares / shares.sum()))]
    shape = np.array(shape)
    centre = np.array(centre) * [-side, 1, 1] + rng.normal(0, 0.25, 3) * shape
    # An ellipsoid of the wanted volume, with the territory's proportions.
    radii = shape * (volume_ml * 1000 * 3 / (4 * math.pi * np.prod(shape))) ** (1 / 3)
    axis = None
    if name in CORTICAL:  # a wedge from the surface inwards, narrowing with depth
        inner = np.array(CORTICAL[name]) * [-side, 1, 1]
        axis = (centre - inner) / np.linalg.norm(centre - inner)
        depth_mm = radii.mean() * rng.uniform(1.0, 1.6)
        centre = _surface_point(atlas, inner, axis) - rng.uniform(0.0, 0.3) * depth_mm * axis
        radii = np.append(radii, depth_mm)
    box = _box_around(atlas, centre, 1.8 * radii.max() + 6, side)
    x, y, z = (atlas.mm(k, box) for k in range(3))
    offsets = (x - centre[0], y - centre[1], z - centre[2])
    shape_box = tuple(s.stop - s.start for s in box)
    # Irregular at every scale: lobes, gyri, ragged edges.
    score = -_shape_distance(offsets, radii, axis)
    for spacing, low, high in ((max(radii.mean() * 0.7, 4.0), 0.15, 0.35), (8.0, 0.08, 0.2),
                               (3.0, 0.04, 0.12)):
        score += rng.uniform(low, high) * smooth_noise(rng, shape_box, spacing)
    below = _infratentorial(x, y, z)
    compartment = below if name == "cerebellar" else ~below
    # Grey and white matter, and the sulci between them: a chronic infarct is one cavity.
    candidates = (atlas.envelope[box] & (atlas.ventricle_distance(box) > 1.5)
                  & (x * side >= 1)[:, None, None] & compartment)
    values = score[candidates]
    voxels = int(round(volume_ml * 1000))
    if values.size == 0 or voxels == 0:
        return None
    threshold = np.partition(values, max(values.size - voxels, 0))[max(values.size - voxels, 0)]
    core = candidates & (score >= threshold)
    labels, count = ndimage.label(core)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    core = sizes[labels] >= max(0.05 * sizes.max(), 8)  # one stroke, maybe with satellites
    return _chronic(rng, core, box, side)


def _chronic(rng: np.random.Generator, core: np.ndarray, box: tuple[slice, slice, slice],
             side: float) -> _Lesion:
    """The infarct `core` (bool, on `box` of the template grid) as a chronic lesion: a fluid
    cavity lined and crossed by gliosis."""
    around = _bounding_box(core, 3)  # from here on only the lesion's own box
    core = core[around]
    depth = ndimage.distance_transform_edt(np.pad(core, 1))[1:-1, 1:-1, 1:-1]
    # Gliosis lines the cavity and remains in strands and patches inside it.
    strands = smooth_noise(rng, core.shape, 3.0) > rng.uniform(1.0, 2.5)
    cavity = core & (depth > rng.uniform(0.5, 2.0)) & ~strands
    extent = ndimage.gaussian_filter(core.astype(np.float32), 0.5)
    cavity_frac = ndimage.gaussian_filter(cavity.astype(np.float32), 0.5)
    return _Lesion(tuple(slice(b.start + a.start, b.start + a.stop) for a, b in zip(around, box)),
                   extent, np.minimum(cavity_frac, extent), side, float(core.sum()) / 1000)


@functools.lru_cache(maxsize=4)
def lesion_atlas(folder: Path) -> tuple[tuple[Path, ...], np.ndarray]:
    """The NIfTI masks of a lesion folder, sorted (a seed always draws the same), and their
    volumes (mL); reading 1,449 masks takes about 50 s, once per process."""
    try:
        files = tuple(sorted(p for p in Path(folder).iterdir()
                             if p.name.endswith((".nii", ".nii.gz"))))
    except OSError as err:
        raise MeshsegError(f"{folder}: cannot read lesion folder ({err.strerror or err})") from err
    if not files:
        raise MeshsegError(f"{folder}: no lesion masks (.nii or .nii.gz files) in it")
    volumes = []
    for path in files:
        drawn, affine = read_mask(path)
        volumes.append(np.count_nonzero(drawn) * voxel_ml(affine))
    return files, np.array(volumes)


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D lesion mask (bool, nonzero = lesion) and its affine."""
    try:
        img = nib.load(path)
        drawn = np.asarray(img.dataobj) > 0
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MeshsegError(f"{path}: unreadable lesion mask ({err})") from err
    if drawn.ndim != 3:
        raise MeshsegError(f"{path}: a lesion mask must be 3-D, not of shape {drawn.shape}")
    return drawn, img.affine


ATLAS_NEAREST = 8  # a lesion is drawn among the masks nearest in volume to the drawn size


def _atlas_lesion(rng: np.random.Generator, atlas: _Atlas, folder: Path,
                  limits: tuple[float, float]) -> _Lesion | None:
    """A real lesion's shape, size and place: a mask of `folder` (MNI space, any grid), among
    those nearest in volume to a size drawn as for made-up lesions (ARC's quartiles within
    `limits`), mirrored to the left in LEFT_SHARE of the heads, on the template grid. None if
    it misses the brain."""
    drawn, affine = draw_atlas_mask(rng, folder, limits)
    placed = place_mni_mask(rng, drawn, affine, atlas.affine, atlas.gm.shape)
    if placed is None:
        return None
    box, fraction = placed
    core = (fraction >= 0.5) & atlas.envelope[box] & (atlas.ventricle_distance(box) > 1.0)
    if not core.any():
        return None
    side = -1.0 if atlas.mm(0, box)[np.nonzero(core)[0]].mean() < 0 else 1.0
    return _chronic(rng, core, box, side)


def draw_atlas_mask(rng: np.random.Generator, folder: Path, limits: tuple[float, float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mask, affine) of a lesion of `folder`, among the ATLAS_NEAREST nearest in volume to a
    size drawn with ARC's quartiles within `limits` (mL)."""
    files, volumes = lesion_atlas(folder)
    distance = np.abs(np.log(volumes) - math.log(lesion_volume_ml(rng, limits)))
    nearest = np.argsort(distance, kind="stable")[:ATLAS_NEAREST]
    return read_mask(files[int(nearest[rng.integers(len(nearest))])])


def place_mni_mask(rng: np.random.Generator, drawn: np.ndarray, mask_affine: np.ndarray,
                   grid_to_mni: np.ndarray, shape: tuple[int, ...]
                   ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """An MNI lesion mask resampled (linear, as a lesion fraction) onto a grid whose voxels
    `grid_to_mni` maps to MNI mm, mirrored so that LEFT_SHARE of the lesions lie on the left:
    (the grid's box around it, the fraction in that box), or None if it misses the grid.
    Only the mask's box is resampled, which keeps a 1,449-mask atlas cheap to draw from."""
    found = np.argwhere(drawn)
    if found.size == 0:
        return None
    centre_x = nib.affines.apply_affine(mask_affine, found.mean(0))[0]
    want_left = rng.random() < LEFT_SHARE
    mirror = np.diag([-1.0 if (centre_x < 0) != want_left else 1.0, 1.0, 1.0, 1.0])
    to_mask = np.linalg.inv(mask_affine) @ mirror @ grid_to_mni  # grid voxel -> mask voxel
    corners = np.array([[(found.min(0) - 1, found.max(0) + 1)[bit][k] for k, bit in
                         enumerate(bits)] for bits in np.ndindex(2, 2, 2)], float)
    inside = nib.affines.apply_affine(np.linalg.inv(to_mask), corners)
    lo = np.maximum(np.floor(inside.min(0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(inside.max(0)) + 2, shape).astype(int)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    fraction = ndimage.affine_transform(drawn.astype(np.float32), to_mask[:3, :3],
                                        to_mask[:3, :3] @ lo + to_mask[:3, 3],
                                        output_shape=tuple(hi - lo), order=1)
    return box, fraction


def _box_around(atlas: _Atlas, centre: np.ndarray, half_mm: float, side: float
                ) -> tuple[slice, slice, slice]:
    """Template index box of half-width `half_mm` around `centre` (MNI mm), cut at the
    midline to the hemisphere of `side` (-1 left, +1 right) with 2 mm to spare."""
    voxel = np.linalg.solve(atlas.affine[:3, :3], centre - atlas.affine[:3, 3])
    lo = np.maximum(np.floor(voxel - half_mm), 0).astype(int)
    hi = np.minimum(np.ceil(voxel + half_mm), atlas.gm.shape).astype(int)
    midline = int(round(-atlas.affine[0, 3] / atlas.affine[0, 0]))  # x = 0
    if side < 0:
        hi[0] = min(hi[0], midline + 2)
    else:
        lo[0] = max(lo[0], midline - 2)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _shape_distance(offsets: tuple[np.ndarray, np.ndarray, np.ndarray], radii: np.ndarray,
                    axis: np.ndarray | None) -> np.ndarray:
    """Normalised distance (1 at the shape's edge) from the lesion centre on a box.

    `offsets` are the x, y, z offsets (mm) along the box axes. Without `axis`: an ellipsoid of
    `radii` (x, y, z). With the surface's inward `axis` and radii (x, y, z, depth): a wedge,
    `depth` deep along the axis, its cross-section shrinking with depth.
    """
    dx, dy, dz = offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]
    if axis is None:
        return np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    along = dx * axis[0] + dy * axis[1] + dz * axis[2]  # < 0: deeper than the centre
    taper = np.clip(1.0 + 0.6 * along / radii[3], 0.35, 1.3)
    across = ((dx - along * axis[0]) / radii[0]) ** 2 + ((dy - along * axis[1]) / radii[1]) ** 2
    across += ((dz - along * axis[2]) / radii[2]) ** 2
    return np.sqrt((along / radii[3]) ** 2 + across / taper**2)


def _surface_point(atlas: _Atlas, start: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Last point (MNI mm) inside the brain envelope on the ray from `start` along
    `direction`, in 1 mm steps."""
    unit = direction / np.linalg.norm(direction)
    inverse = np.linalg.inv(atlas.affine)
    point = start
    for step in range(1, 150):
        ahead = start + step * unit
        voxel = np.round(inverse[:3, :3] @ ahead + inverse[:3, 3]).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= atlas.envelope.shape) or not atlas.envelope[
                tuple(voxel)]:
            break
        point = ahead
    return point


def _infratentorial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Rough MNI region below the tentorium (cerebellum and brainstem), as a (X,Y,Z) mask."""
    # The tentorium is a tent: highest at the midline, sloping down to the back and sides.
    tentorium = -8.0 + 0.22 * (y + 40.0)[None, :] - 0.2 * np.abs(x)[:, None]
    cerebellum = (y < -40)[None, :, None] & (z[None, None, :] < tentorium[:, :, None])
    stem = ((np.abs(x) < 14)[:, None, None] & ((y > -45) & (y < -15))[None, :, None]
            & (z < -8)[None, None, :])
    return cerebellum | stem


def _widen_ventricles(rng: np.random.Generator, atlas: _Atlas, gm: np.ndarray, wm: np.ndarray,
                      lesions: list[_Lesion]) -> None:
    """Turn tissue around the lateral ventricles into CSF, in place: some widening with age on
    both sides, more on the side of each stroke (ex-vacuo, growing with its volume)."""
    box = atlas.ventricle_box
    x = atlas.mm(0, box)
    both = rng.uniform(0.0, 2.5)
    radius = np.full(x.shape, both, np.float32)
    for lesion in lesions:
        ex_vacuo = rng.uniform(1.5, 4.0) * (lesion.ml / 100.0) ** (1 / 3)
        radius[x * lesion.side > 0] += min(ex_vacuo, 7.0)
    radius[np.abs(x) < 1.5] = 0.0  # the septum stays
    csf = np.clip(radius[:, None, None] - atlas.ventricle_mm + 0.5, 0.0, 1.0)
    gm[box] *= 1 - csf
    wm[box] *= 1 - csf


# --- contrast and rendering -----------------------------------------------------------------


def _draw_contrast(rng: np.random.Generator, random_share: float) -> dict[str, float]:
    """Mean T2 intensity per tissue (0..1). Brain tissues follow T2 order (CSF > GM > WM)
    except in `random_share` of the heads, where they are random so a model cannot lean on
    one contrast; the cavity stays fluid-like either way."""
    if rng.random() >= random_share:
        wm = rng.uniform(0.15, 0.35)
        gm = wm + rng.uniform(0.06, 0.25)
        csf = rng.uniform(max(gm + 0.2, 0.7), 1.0)
    else:
        wm, gm, csf = rng.uniform(0.05, 1.0, 3)
    deep = wm + rng.uniform(-0.05, 1.0) * (gm - wm)  # pallidum, putamen: iron darkens T2
    return {
        "wm": wm, "gm": gm, "csf": csf, "deep": deep,
        "cavity": csf * rng.uniform(0.9, 1.0),
        "rim": gm + rng.uniform(0.35, 0.8) * (csf - gm),
        "wmh": gm + rng.uniform(-0.2, 0.4) * (csf - gm),
        "bone": rng.uniform(0.0, 0.08), "marrow": rng.uniform(0.2, 0.65),
        "fat": rng.uniform(0.45, 0.95), "muscle": rng.uniform(0.12, 0.3),
        "skin": rng.uniform(0.2, 0.5), "eye": csf * rng.uniform(0.75, 1.05),
        "lens": rng.uniform(0.05, 0.25), "texture": rng.uniform(0.0, 0.06),
    }


def _render(rng: np.random.Generator, atlas: _Atlas, gm: np.ndarray, wm: np.ndarray,
            lesions: list[_Lesion], random_contrast: float) -> np.ndarray:
    """T2-weighted intensities of the whole head on the template grid (float32, 0..~1)."""
    c = _draw_contrast(rng, random_contrast)
    brain = atlas.brain_box  # tissue lies within it: half the voxels of the template
    _atrophy(rng, gm[brain], wm[brain])
    deep = gm[brain] * atlas.deep[brain]
    image = np.zeros(gm.shape, np.float32)
    image[brain] = (gm[brain] - deep) * c["gm"] + deep * c["deep"] + wm[brain] * c["wm"]
    _add_white_matter_hyperintensities(rng, atlas, image, wm, c)
    for lesion in lesions:  # the stroke replaces tissue (whatever its signal) by cavity + rim
        box = lesion.box
        tissue = gm[box] + wm[box]
        rim = lesion.extent - lesion.cavity
        image[box] = (image[box] * (1 - lesion.extent)
                      + tissue * (lesion.cavity * c["cavity"] + rim * c["rim"]))
    image[brain] += np.clip(atlas.envelope[brain] - gm[brain] - wm[brain], 0.0, 1.0) * c["csf"]
    _add_head(rng, atlas, image, c)
    # Within-tissue variation; resampling to the scan grid smooths it.
    image *= 1 + c["texture"] * rng.standard_normal(image.shape, dtype=np.float32)
    return np.maximum(image, 0.0, out=image)


def _atrophy(rng: np.random.Generator, gm: np.ndarray, wm: np.ndarray) -> None:
    """Widen sulci by age, in place: voxels that are partly CSF lose tissue, voxels full of
    tissue keep it."""
    loss = np.float32(rng.uniform(0.0, 0.4))
    tissue = gm + wm
    keep = np.clip((tissue - loss) / (0.9 - loss), 0.0, 1.0) / np.maximum(tissue, 1e-6)
    gm *= keep
    wm *= keep


def _add_white_matter_hyperintensities(rng: np.random.Generator, atlas: _Atlas,
                                       image: np.ndarray, wm: np.ndarray,
                                       c: dict[str, float]) -> None:
    """Unlabelled small-vessel disease in half the heads: periventricular caps and deep
    patches, bright like gliosis, so a model learns they are not the stroke."""
    if rng.random() < 0.5:
        return
    box = atlas.ventricle_box
    shape = atlas.ventricle_mm.shape
    reach = rng.uniform(1.5, 6.0)
    score = (1.0 - atlas.ventricle_mm / reach + 0.5 * smooth_noise(rng, shape, 5.0)
             + np.maximum(smooth_noise(rng, shape, 3.0) - rng.uniform(2.0, 3.0), 0.0) * 3)
    fraction = np.clip(score * 2.0, 0.0, 1.0) * wm[box]
    image[box] += fraction * (c["wmh"] - c["wm"])


def _add_head(rng: np.random.Generator, atlas: _Atlas, image: np.ndarray,
              c: dict[str, float]) -> None:
    """Add CSF, skull, scalp, neck and face around the brain, in place (intensities)."""
    # Skull and scalp thickness vary over the head (not at the brain's surface itself).
    d = atlas.outside_mm
    d = d + np.minimum(d / 4.0, 1.0) * rng.uniform(0.5, 2.0) * smooth_noise(rng, d.shape, 25.0)
    # Layer boundaries (mm from the envelope): subarachnoid CSF | inner table | marrow | outer
    # table; each crossing is a 1 mm linear ramp, which is the partial volume.
    b1 = 0.5 + rng.uniform(1.2, 4.5)
    b2 = b1 + rng.uniform(1.2, 2.5)
    b3 = b2 + rng.uniform(1.1, 5.0)
    b4 = b3 + rng.uniform(1.2, 2.5)
    knots = [0.0, 1.0, b1 - 0.5, b1 + 0.5, b2 - 0.5, b2 + 0.5, b3 - 0.5, b3 + 0.5, b4 - 0.5,
             b4 + 0.5]
    values = [0.0, c["csf"], c["csf"], c["bone"], c["bone"], c["marrow"], c["marrow"],
              c["bone"], c["bone"], 0.0]
    image += np.interp(d, knots, values).astype(np.float32)
    skin, scalp = rng.uniform(1.0, 2.5), rng.uniform(4.0, 9.0)
    # Head surface: the scalp over the skull, joined below the brain by a rounded neck/face.
    x, y, z = (atlas.mm(axis) for axis in range(3))
    ax, ay, y0 = rng.uniform(62, 72), rng.uniform(84, 94), rng.uniform(-6, 2)
    az, z0 = rng.uniform(75, 85), -100.0
    narrowing = 1.0 - rng.uniform(0.1, 0.3) * np.clip((-55.0 - z) / 35.0, 0.0, 1.0)  # neck
    lower = np.sqrt(((x / ax)[:, None] ** 2 + ((y - y0) / ay)[None, :] ** 2)[:, :, None]
                    / (narrowing**2)[None, None, :] + ((z - z0) / az)[None, None, :] ** 4)
    depth = -np.minimum(d - (b4 + scalp), (lower - 1.0) * 60.0)  # mm under the skin
    soft = np.clip(d - b4 + 0.5, 0.0, 1.0) * np.clip(depth + 0.5, 0.0, 1.0)
    layers = np.interp(depth, [0.0, skin - 0.5, skin + 0.5, scalp - 0.5, scalp + 0.5],
                       [c["skin"], c["skin"], c["fat"], c["fat"], 0.0]).astype(np.float32)
    # Deeper soft tissue (neck and face, below the brain): muscle with fat between, in patches.
    deeper = np.clip(depth - scalp + 0.5, 0.0, 1.0)
    layers += deeper * c["muscle"]
    face = (slice(None), slice(None), slice(0, int(np.searchsorted(z, -10.0))))
    fat_share = np.clip(smooth_noise(rng, deeper[face].shape, 10.0) * 0.5
                        + rng.uniform(-0.1, 0.4), 0.0, 1.0)
    layers[face] += deeper[face] * fat_share * (c["fat"] - c["muscle"])
    image += soft * layers
    _add_face(rng, atlas, image, c, b1)


def _add_face(rng: np.random.Generator, atlas: _Atlas, image: np.ndarray, c: dict[str, float],
              bone_start: float) -> None:
    """Orbits (fat, fluid globes, dark lenses) and air spaces (sinuses, nose, pharynx)."""
    jitter = rng.normal(0, 2, 3)
    for side in (-1.0, 1.0):
        eye = np.array([31.0 * side, 56.0, -40.0]) + jitter + rng.normal(0, 1, 3)
        radius = rng.uniform(11.0, 12.5)
        _blend_ellipsoid(atlas, image, eye + [0, -12, 2], (15, 22, 13), c["fat"], bone_start)
        _blend_ellipsoid(atlas, image, eye, (radius,) * 3, c["eye"], bone_start)
        _blend_ellipsoid(atlas, image, eye + [0, radius - 2.5, 0], (4.5, 2.0, 4.5), c["lens"],
                         bone_start)
    air = [((0, 66, 10), np.array((14, 6, 12)) * rng.uniform(0.0, 1.2)),  # frontal sinus
           ((0, 50, -50), (9, 20, 24)),  # ethmoid cells and nasal cavity
           ((0, 18, -38), np.array((10, 10, 9)) * rng.uniform(0.5, 1.2)),  # sphenoid sinus
           ((-26, 44, -66), (13, 16, 14)), ((26, 44, -66), (13, 16, 14)),  # maxillary
           ((0, 8, -90), (9, 8, 22))]  # pharynx
    for centre, radii in air:
        if min(radii) > 1.0:
            _blend_ellipsoid(atlas, image, np.array(centre, float) + jitter, radii, 0.0,
                             bone_start)


def _blend_ellipsoid(atlas: _Atlas, image: np.ndarray, centre: np.ndarray,
                     radii: tuple[float, ...] | np.ndarray, value: float, bone_start: float
                     ) -> None:
    """Paint a soft-edged ellipsoid (MNI mm) of `value` into the image, outside the brain's
    CSF layer only."""
    radii = np.asarray(radii, float)
    voxel = np.linalg.solve(atlas.affine[:3, :3], np.asarray(centre) - atlas.affine[:3, 3])
    lo = np.maximum(np.floor(voxel - radii - 2), 0).astype(int)
    hi = np.minimum(np.ceil(voxel + radii + 2), image.shape).astype(int)
    if np.any(hi <= lo):
        return
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    x, y, z = (atlas.mm(axis, box) for axis in range(3))
    rho = np.sqrt(((x - centre[0]) / radii[0])[:, None, None] ** 2
                  + ((y - centre[1]) / radii[1])[None, :, None] ** 2
                  + ((z - centre[2]) / radii[2])[None, None, :] ** 2)
    fraction = (np.clip((1 - rho) * radii.min() + 0.5, 0.0, 1.0)
                * np.clip(atlas.outside_mm[box] - bone_start, 0.0, 1.0))
    image[box] += fraction * (value - image[box])


# --- pose, scan grid, resampling ------------------------------------------------------------


def _draw_pose(rng: np.random.Generator) -> np.ndarray:
    """4x4 map from MNI mm to scanner mm: head size (the template is ~10% larger than most
    adults), small shear, tilt and offset."""
    scale = rng.uniform(0.84, 0.98) * rng.uniform(0.96, 1.04, 3)
    shear = np.eye(3) + np.triu(rng.normal(0, 0.02, (3, 3)), 1)
    rotation = Rotation.from_euler("xyz", rng.normal(0, [8.0, 5.0, 5.0]), degrees=True)
    pose = np.eye(4)
    pose[:3, :3] = rotation.as_matrix() @ shear @ np.diag(scale)
    pose[:3, 3] = rng.normal(0, 5, 3) - pose[:3, :3] @ BRAIN_CENTRE_MM
    return pose


def _native_grid(rng: np.random.Generator, pose: np.ndarray
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
    """A scanner grid: axial, sagittal or coronal slices, oblique, 3-D (near 1 mm isotropic)
    or 2-D (fine in-plane, 2-5 mm slices), any axis order and flips."""
    normal = int(rng.choice([2, 0, 1], p=[0.5, 0.25, 0.25]))  # world axis across the slices
    in_plane = [axis for axis in (0, 1, 2) if axis != normal]
    if rng.random() < 0.4:
        pixel = rng.uniform(0.8, 1.2)
        zooms = np.array([pixel, pixel, pixel * rng.uniform(1.0, 1.25)])
    else:
        pixel = rng.uniform(0.5, 1.0)
        zooms = np.array([pixel, pixel * rng.uniform(1.0, 1.2), rng.uniform(2.0, 5.0)])
    coverage = {2: (130.0, 190.0), 0: (140.0, 180.0), 1: (170.0, 220.0)}[normal]
    extent = np.array([rng.uniform(200, 250), rng.uniform(200, 250), rng.uniform(*coverage)])
    shape = np.maximum(np.round(extent / zooms), 1).astype(int)
    columns = np.eye(3)[:, in_plane + [normal]] * rng.choice([-1.0, 1.0], 3)
    order = rng.permutation(3) if rng.random() < 0.3 else np.arange(3)
    axis = rng.normal(size=3)
    tilt = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(0, 20)))
    linear = tilt.as_matrix() @ columns[:, order] @ np.diag(zooms[order])
    shape = shape[order]
    centre = pose[:3, :3] @ BRAIN_CENTRE_MM + pose[:3, 3] + rng.normal(0, 5, 3)
    return tuple(int(n) for n in shape), _affine(linear, centre, shape / 2 - 0.5)


def _conformed_grid(rng: np.random.Generator, pose: np.ndarray
                    ) -> tuple[tuple[int, int, int], np.ndarray]:
    """FreeSurfer's conformed grid (256^3, 1 mm, LIA) centred near the brain."""
    linear = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    centre = pose[:3, :3] @ BRAIN_CENTRE_MM + pose[:3, 3] + rng.normal(0, 6, 3)
    return (256, 256, 256), _affine(linear, centre, np.full(3, 128.0))


def _affine(linear: np.ndarray, centre: np.ndarray, centre_voxel: np.ndarray) -> np.ndarray:
    """4x4 voxel->world affine with `linear` columns that puts `centre_voxel` at `centre`."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ centre_voxel
    return affine


@dataclass(frozen=True)
class _AxisPlan:
    """How one scan axis is sampled, in that axis's voxel units: samples start, start + step,
    ... (count of them); voxels average `box` consecutive samples (thick voxels), or
    interpolate linearly between samples (`step` > 1: voxels finer than the samples)."""

    start: float
    step: float
    count: int
    box: int = 1

    def to_voxels(self, samples: np.ndarray, axis: int, n: int) -> np.ndarray:
        """Samples along `axis` (all `count` of them) -> the axis's n voxels."""
        if self.box > 1:
            shape = (*samples.shape[:axis], n, self.box, *samples.shape[axis + 1:])
            return samples.reshape(shape).mean(axis=axis + 1, dtype=np.float32)
        if self.step > 1:
            position = np.arange(n) / self.step
            lo = np.minimum(position.astype(int), self.count - 2)
            frac = (position - lo).astype(np.float32).reshape(
                [-1 if k == axis else 1 for k in range(samples.ndim)])
            return (samples.take(lo, axis) * (1 - frac) + samples.take(lo + 1, axis) * frac)
        return samples


def _axis_plan(n: int, zoom: float) -> _AxisPlan:
    """Thick voxels (> 1.3 mm): k sub-slices ~1 mm apart, averaged (a box slice profile, i.e.
    partial volume across the slice). Fine voxels (< 0.8 mm): samples 1 mm apart, interpolated
    (the template holds no finer detail). Otherwise one sample per voxel centre."""
    if zoom > 1.3:
        k = int(round(zoom))
        return _AxisPlan(-0.5 + 0.5 / k, 1.0 / k, n * k, k)
    if zoom < 0.8:
        step = 1.0 / zoom
        return _AxisPlan(0.0, step, int(math.floor((n - 1) / step)) + 2)
    return _AxisPlan(0.0, 1.0, n)


class _Scan:
    """Resampling of template-grid maps onto a scan grid through the head's pose and a smooth
    deformation, with the scanner's slice profile (see `_axis_plan`).

    A resliced grid (conformed-like) is, half the time, given the through-plane blur of a
    2-5 mm slice acquisition resliced to it, as real conformed scans mostly are.
    """

    CHUNK_POINTS = 2_000_000  # bounds memory of the coordinate arrays

    def __init__(self, rng: np.random.Generator, template_affine: np.ndarray,
                 pose: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
                 resliced: bool) -> None:
        self.thick = ((int(rng.integers(3)), int(rng.integers(2, 6)))
                      if resliced and rng.random() < 0.5 else None)  # (axis, slice voxels)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
        self.shape = shape
        self.plans = [_axis_plan(n, zoom) for n, zoom in zip(shape, zooms)]
        self.counts = np.array([p.count for p in self.plans])
        # template index = linear @ sample index + offset (+ deformation, in template voxels)
        sample_to_voxel = np.eye(4)
        sample_to_voxel[:3, :3] = np.diag([p.step for p in self.plans])
        sample_to_voxel[:3, 3] = [p.start for p in self.plans]
        full = np.linalg.inv(template_affine) @ np.linalg.inv(pose) @ affine @ sample_to_voxel
        self.linear, self.offset = full[:3, :3], full[:3, 3]
        nodes = [int(math.ceil(p.count * p.step * zoom / WARP_NODE_MM)) + 3
                 for p, zoom in zip(self.plans, zooms)]
        self.amplitude = rng.uniform(0.0, 2.5)  # std of the displacement (mm)
        self.warp = rng.standard_normal((*nodes, 3)).astype(np.float32) * np.float32(
            self.amplitude / 0.33)  # 0.33: std of a 3-D cubic B-spline of unit-variance nodes
        self.warp_matrices = [_spline_matrix(p.count, k) for p, k in zip(self.plans, nodes)]

    def resample(self, volume: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
        """`volume` (float32, lying on `box` of the template grid) on the scan grid."""
        lo, hi = self._sample_box(volume.shape, box)
        samples = np.zeros(self.counts, np.float32)
        if np.all(hi > lo):
            samples[tuple(slice(a, b) for a, b in zip(lo, hi))] = self._sample(volume, box, lo, hi)
        for axis in sorted(range(3), key=lambda a: self.plans[a].box == 1):  # shrink first
            samples = self.plans[axis].to_voxels(samples, axis, self.shape[axis])
        if self.thick is not None:  # average into thick slices, interpolate back
            axis, k = self.thick
            n = samples.shape[axis]
            slices = n // k + 2
            widths = [(0, 0)] * 3
            widths[axis] = (0, slices * k - n)
            thick = _AxisPlan(0.0, 1.0, slices * k, k).to_voxels(np.pad(samples, widths), axis,
                                                                   slices)
            samples = _AxisPlan(0.0, float(k), slices).to_voxels(thick, axis, n)
        return samples

    def _sample(self, volume: np.ndarray, box: tuple[slice, slice, slice], lo: np.ndarray,
                hi: np.ndarray) -> np.ndarray:
        """Linear interpolation of `volume` at the sample points of the index box [lo, hi)."""
        corner = np.array([s.start or 0 for s in box], float)
        index = [np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)]
        # The deformation over the box, contracted along the last two axes once.
        warp = _separable(self.warp, [None] + [m[a:b] for m, a, b in
                                               zip(self.warp_matrices[1:], lo[1:], hi[1:])])
        samples = np.empty([b - a for a, b in zip(lo, hi)], np.float32)
        step = max(1, self.CHUNK_POINTS // (samples.shape[1] * samples.shape[2]))
        for first in range(0, samples.shape[0], step):
            rows = slice(first, min(first + step, samples.shape[0]))
            shift = _separable(warp, [self.warp_matrices[0][lo[0] + rows.start:
                                                            lo[0] + rows.stop]])
            coords = np.empty((3, rows.stop - rows.start, *samples.shape[1:]), np.float32)
            for k in range(3):
                coords[k] = (self.linear[k, 0] * index[0][rows, None, None]
                             + self.linear[k, 1] * index[1][None, :, None]
                             + self.linear[k, 2] * index[2][None, None, :]
                             + (self.offset[k] - corner[k]) + shift[..., k])
            ndimage.map_coordinates(volume, coords, output=samples[rows], order=1,
                                    mode="constant", cval=0.0, prefilter=False)
        return samples

    def _sample_box(self, shape: tuple[int, ...], box: tuple[slice, slice, slice]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Range of sample indices whose points can land on the box (with the deformation)."""
        start = np.array([s.start or 0 for s in box], float)
        corners = np.array([[start[k] - 1 + (shape[k] + 1) * bit for k, bit in
                             enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
        inverse = np.linalg.inv(self.linear)
        points = (corners - self.offset) @ inverse.T
        margin = (4 * self.amplitude + 2) * np.abs(inverse).sum(1)
        lo = np.maximum(np.floor(points.min(0) - margin), 0).astype(int)
        hi = np.minimum(np.ceil(points.max(0) + margin) + 1, self.counts).astype(int)
        return lo, hi


def _scanner(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Receive-coil bias, Rician magnitude noise and a scanner's storage (float32 or int16)."""
    spacing = max(image.shape) / 3.0
    image *= np.exp(rng.uniform(0.0, 0.3) * smooth_noise(rng, image.shape, spacing))
    head = image[::3, ::3, ::3]  # a subsample sets the noise level at a fraction of the cost
    head = head[head > 0.05]
    sigma = np.float32((float(np.median(head)) if head.size else 1.0) * rng.uniform(0.01, 0.06))
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= sigma
    real += image
    imaginary = rng.standard_normal(image.shape, dtype=np.float32)
    imaginary *= sigma
    image = np.hypot(real, imaginary, out=real)  # magnitude of complex Gaussian noise
    peak = float(image.max()) or 1.0
    if rng.random() < 0.5:
        return np.round(image * (rng.uniform(500, 4000) / peak)).astype(np.int16)
    return (image * np.float32(rng.uniform(0.5, 2000) / peak)).astype(np.float32)
