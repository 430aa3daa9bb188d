"""Quality checks after inference: flags that say which results to look at first, and the
lesion's location. `review` (before the outputs are written) and `write_review` (the QC
picture and MNI mask) are what predict calls; `assess` is the same check on arrays.

Each flag carries its measured value and the threshold it crossed. The thresholds are named
constants below, each with where its value comes from (docs/qc.md gives the measurements).
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from meshseg.errors import InputError, MeshsegError
from meshseg.io import Volume, kept_arrays, record_path
from meshseg.qc import location, picture

if TYPE_CHECKING:
    from meshseg.pipeline.predict import Outputs
    from meshseg.pipeline.record import Result

# Not T2-weighted: median intensity in the ventricles over that in deep white matter (MNI
# priors carried to the scan by the registration). T2 makes CSF bright: 1.05-3.2 on the
# T2 scans of ../shared/real-scans and synthetic T2 heads; T1 and FLAIR make it dark:
# 0.21-0.51 on healthy_T1w, lesion_FLAIR and synthetic T1 heads. 0.75 lies between
# (nearest to the weakest T2, healthy_T2w at 1.05, whose CSF is barely brighter than grey).
NOT_T2_CSF_WM = 0.75
VENTRICLE_PRIOR = 0.6  # CSF prior above this, deeper than VENTRICLE_DEPTH_MM in the brain:
VENTRICLE_DEPTH_MM = 15.0  # the lateral ventricles, not sulcal CSF (which partial-volumes)
WHITE_MATTER_PRIOR = 0.9  # white-matter prior above this: deep white matter
# Above the largest chronic lesion of ARC (363.9 mL, metrics.ARC_QUARTILES_ML), rounded up.
LARGE_LESION_ML = 400.0
# 26-connected lesions: ARC's chronic strokes are one territory's infarct, sometimes with an
# older one; more than 10 pieces is speckle rather than infarcts (our choice).
MANY_FRAGMENTS = 10
# Lesion voxels on the scan's outer face: the lesion may continue outside the field of view.
EDGE_VOXELS = 1
UNCERTAIN = (0.2, 0.8)  # probabilities the model is unsure of (the range)
# Share of the lesion's probability mass (voxels above 0.2) that lies between 0.2 and 0.8.
# The ARC-trained brainchop model is soft even on a clear lesion: 0.59 on stroke_T2w_mni's
# 41 mL infarct (median probability in the mask 0.78), 1.0 on lesion_FLAIR's doubtful 3 mL
# (no voxel above 0.69). 0.75 flags the second and not the first.
LOW_CONFIDENCE_SHARE = 0.75
# Sharpness of the registration metric's peak at the fit (location.fit_quality), measured on
# the five real scans and synthetic heads seeds 1-2 (docs/location.md; re-measured 2026-12-02
# with the NMI read at 1/8 of the brain voxels): fits that look right 1.98-8.39 (lesion_FLAIR
# 1.98); good fits moved 15 mm or turned 20 degrees 0.96-1.69 (healthy_T1w moved along z);
# visibly wrong fits of an older pipeline scored 1.19 and 1.33. A size error of 12% scores
# 1.03-1.92 and is not always caught.
POOR_REGISTRATION = 1.8
# A missed lesion (issue 21 item 5): chronic T2 (and FLAIR) infarcts are brighter than the
# same place in the other hemisphere. The registered scan, over the median of the template's
# brain, smoothed by ASYMMETRY_SIGMA_MM, minus its mirror image across x = 0; the largest
# region brighter by ASYMMETRY_CONTRAST, ASYMMETRY_DEPTH_MM inside the brain, away from the
# lateral ventricles, not touching the mask. Measured on ../shared/real-scans (docs/qc.md):
# M2208_T2w (a stroke the model misses) 33.7 mL; healthy_T2w 2.5 mL, healthy_T1w none;
# lesion_FLAIR 0.4 mL and stroke_T2w_mni 1.2 mL outside their masks; the example head 0.6 mL.
# ASYMMETRY_ML lies between the healthy heads and M2208 (3-4x from each); five scans are
# thin evidence: docs/qc.md says so.
ASYMMETRY_SIGMA_MM = 3.0
ASYMMETRY_CONTRAST = 0.5
ASYMMETRY_DEPTH_MM = 5
# The lateral ventricles and this margin around them are left out: a chronic stroke widens
# the ventricle on its side (ex vacuo), which is one-sided fluid-bright too; the example head
# of `meshseg example` (such a widened ventricle, its lesion found) was flagged for it.
ASYMMETRY_VENTRICLE_MARGIN_MM = 6
ASYMMETRY_ML = 10.0
TITLE_WIDTH = 140  # characters of a QC picture's title line (the picture is 960 px wide)


@dataclass(frozen=True)
class Checks:
    """Which checks a run makes (the same for every input)."""

    strict_contrast: bool = False  # a scan that does not look T2-weighted fails


@dataclass(frozen=True)
class Flag:
    """One QC finding: what, its measured value, the threshold crossed, a sentence."""

    name: str
    value: float
    threshold: float
    message: str


@dataclass
class Assessment:
    """QC flags and location of one result, and the lesion mask on the MNI grid."""

    flags: list[Flag] = field(default_factory=list)
    location: dict = field(default_factory=dict)
    mni_mask: np.ndarray | None = None

    def flag(self, name: str) -> Flag | None:
        """The flag of that name, if raised."""
        return next((f for f in self.flags if f.name == name), None)


def review(volume: Volume, prob: np.ndarray, mask: np.ndarray, result: Result,
           checks: Checks) -> Assessment:
    """Assess one result and fill its record's flags and location.

    Raises:
        InputError: `checks.strict_contrast` and the scan does not look T2-weighted.
    """
    assessment = assess(volume, prob, mask, result.lesion_ml or 0.0, result.components or 0)
    result.flags = [asdict(f) for f in assessment.flags]  # plain JSON types for the record
    result.location = assessment.location
    contrast = assessment.flag("not_t2")
    if checks.strict_contrast and contrast is not None:
        raise InputError(f"{volume.name}: {contrast.message} (--strict-contrast)")
    return assessment


def write_review(assessment: Assessment, volume: Volume, prob: np.ndarray, mask: np.ndarray,
                 outputs: Outputs, result: Result, shown: picture.Scene | None = None) -> None:
    """Write the QC picture (with the model's low-confidence band of `prob`; `shown`: its
    scene, when already found) and the MNI-space mask where `outputs` asks for them."""
    if outputs.picture is not None:
        picture.draw(volume.data, volume.affine, mask, picture_title(result), outputs.picture,
                     prob=prob, low=UNCERTAIN[0], threshold=result.threshold, shown=shown)
        result.picture = record_path(outputs.picture)
    if outputs.mni is not None and assessment.mni_mask is not None:
        location.write_mni_mask(assessment.mni_mask, outputs.mni)
        result.mni = record_path(outputs.mni)


def summary_line(result: Result) -> str:
    """The side and flags of a result, for its terminal line ("" when not checked)."""
    side = result.location.get("side")
    text = f", {side}" if side and side != "none" else ""
    if result.flags:
        text += "; QC: " + "; ".join(f["message"] for f in result.flags)
    return text


def picture_title(result: Result) -> str:
    """File, model, lesion volume and side on the first line, then each QC flag's message
    in words, for the QC picture."""
    side = result.location.get("side")
    model = Path(result.model)  # a path (a checkpoint, a model.json) shows its last two parts
    model_name = result.model if len(model.parts) <= 2 else str(Path(*model.parts[-2:]))
    head = (f"{Path(result.input).name}  |  {model_name}  |  {result.lesion_ml or 0:.1f} mL"
            f"{f'  |  {side}' if side and side != 'none' else ''}")
    flags = "; ".join(f["message"] for f in result.flags) or "none"
    return head + "\n" + textwrap.fill(f"QC: {flags}", TITLE_WIDTH)


def assess(volume: Volume, prob: np.ndarray, mask: np.ndarray, lesion_ml: float,
           components: int) -> Assessment:
    """Flags and location of one segmentation (registering the scan to MNI)."""
    flags = lesion_flags(prob, mask, lesion_ml, components)
    try:
        registration = location.register(volume)
    except MeshsegError as err:  # the mask is still good: flag it, do not fail the input
        flags.append(Flag("poor_registration", 0.0, POOR_REGISTRATION, str(err)))
        return Assessment(flags)
    image = registration.image  # the asymmetry hint compares it with its mirror image
    ratio = csf_to_white_matter(image)
    if ratio < NOT_T2_CSF_WM:
        flags.insert(0, Flag("not_t2", ratio, NOT_T2_CSF_WM,
                             f"CSF/white matter {ratio:.2f} < {NOT_T2_CSF_WM}: "
                             "does not look T2-weighted"))
    if registration.quality < POOR_REGISTRATION:
        flags.append(Flag("poor_registration", registration.quality, POOR_REGISTRATION,
                          f"registration sharpness {registration.quality:.2f} < "
                          f"{POOR_REGISTRATION}: location unreliable"))
    where = location.locate(mask, volume, registration)
    mni_mask = where.pop("mni_mask")
    where["csf_wm_ratio"] = ratio
    hint = missed_lesion(image, mni_mask.astype(bool))
    if hint is not None:
        flags.append(hint)
    return Assessment(flags, where, mni_mask)


def missed_lesion(image_mni: np.ndarray, mni_mask: np.ndarray) -> Flag | None:
    """The `asymmetry` flag: a region of the registered scan brighter than its mirror image
    (see ASYMMETRY_ML) that the mask does not touch, or None. Cheap and crude: it sees
    bright one-sided lesions (chronic T2/FLAIR infarcts), not dark ones (T1) nor
    symmetric ones, and a registration error can mimic one."""
    space = location.mni_space()
    brain = _asymmetry_region()
    level = float(np.median(image_mni[brain]))
    if level <= 0:
        return None
    smooth = ndimage.gaussian_filter(image_mni / level, ASYMMETRY_SIGMA_MM)
    labels, count = ndimage.label((smooth - smooth[::-1] > ASYMMETRY_CONTRAST) & brain)
    if count == 0:  # axis 0 of the atlas grid runs from x = +78 to -78 mm: [::-1] mirrors
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    sizes[np.unique(labels[mni_mask])] = 0  # regions the mask reaches: the lesion it found
    biggest = int(sizes.argmax())
    ml = float(sizes[biggest]) / 1000  # 1 mm grid
    if ml <= ASYMMETRY_ML:
        return None
    x, y, z = (space.affine @ [*ndimage.center_of_mass(labels == biggest), 1.0])[:3]
    side = "left" if x < 0 else "right"
    return Flag("asymmetry", round(ml, 1), ASYMMETRY_ML,
                f"a {ml:.0f} mL {side} region (MNI {x:.0f}, {y:.0f}, {z:.0f}) is brighter "
                "than the other side and outside the mask: look for a missed lesion")


def csf_to_white_matter(image_mni: np.ndarray) -> float:
    """Median intensity of the registered scan in the ventricles over that in white matter."""
    ventricles, white = _tissue_masks()
    white_level = float(np.median(image_mni[white]))
    if white_level <= 0:
        return 0.0
    return round(float(np.median(image_mni[ventricles])) / white_level, 3)


@functools.lru_cache(maxsize=1)
def _asymmetry_region() -> np.ndarray:
    """Where the asymmetry hint looks, on the MNI grid: ASYMMETRY_DEPTH_MM inside the brain,
    away from the lateral ventricles (ASYMMETRY_VENTRICLE_MARGIN_MM)."""
    def make() -> tuple[np.ndarray]:
        ventricles = ndimage.binary_dilation(_tissue_masks()[0],
                                             iterations=ASYMMETRY_VENTRICLE_MARGIN_MM)
        brain = location.mni_space().brain
        return (ndimage.binary_erosion(brain, iterations=ASYMMETRY_DEPTH_MM) & ~ventricles,)

    return kept_arrays("asymmetry-region", location.maps_key(), make)[0]


@functools.lru_cache(maxsize=1)
def _tissue_masks() -> tuple[np.ndarray, np.ndarray]:
    """(ventricles, deep white matter) on the MNI grid."""
    def make() -> tuple[np.ndarray, np.ndarray]:
        white, csf = location.tissue_priors()
        return (deeper_than(location.mni_space().brain, csf > VENTRICLE_PRIOR,
                            VENTRICLE_DEPTH_MM), white > WHITE_MATTER_PRIOR)

    ventricles, white = kept_arrays("tissue-masks", location.maps_key(), make)
    return ventricles, white


def deeper_than(brain: np.ndarray, where: np.ndarray, mm: float) -> np.ndarray:
    """The voxels of `where` more than `mm` inside `brain` (a 1 mm grid), within about 1.6 mm.

    Hand-written because scipy's exact distance transform of the whole grid took 0.9 s (in
    every process, before QC's maps were kept on disk): the distance is computed at 2 mm (a
    2 mm voxel is brain where all eight of its 1 mm voxels are) and read, linearly
    interpolated, at the `where` voxels only. A distance
    map changes by at most its step between samples, so the error stays under one 2 mm
    voxel's half-diagonal; the ventricles of the template kept 97% of their voxels."""
    even = [n + n % 2 for n in brain.shape]
    padded = np.zeros(even, bool)
    padded[tuple(map(slice, brain.shape))] = brain
    coarse = padded.reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2).all((1, 3, 5))
    depth = ndimage.distance_transform_edt(coarse, sampling=2)
    index = np.nonzero(where)
    # 1 mm voxel i lies at 2 mm coordinate (i - 0.5) / 2: 2 mm voxel j covers 2j and 2j + 1
    inside = ndimage.map_coordinates(depth, (np.array(index) - 0.5) / 2, order=1,
                                     mode="nearest") > mm
    out = np.zeros(brain.shape, bool)
    out[tuple(axis[inside] for axis in index)] = True
    return out


def lesion_flags(prob: np.ndarray, mask: np.ndarray, lesion_ml: float,
                 components: int) -> list[Flag]:
    """The flags read from the mask and probabilities alone."""
    if not mask.any():
        return [Flag("no_lesion", 0.0, 0.0, "no lesion found")]
    flags = []
    if lesion_ml > LARGE_LESION_ML:
        flags.append(Flag("large_lesion", round(lesion_ml, 1), LARGE_LESION_ML,
                          f"{lesion_ml:.0f} mL > {LARGE_LESION_ML:.0f} mL: implausibly large"))
    edge = edge_voxels(mask)
    if edge >= EDGE_VOXELS:
        flags.append(Flag("edge", edge, EDGE_VOXELS,
                          f"{edge} lesion voxels on the edge of the field of view"))
    if components > MANY_FRAGMENTS:
        flags.append(Flag("fragments", components, MANY_FRAGMENTS,
                          f"{components} separate lesions > {MANY_FRAGMENTS}"))
    share = uncertain_share(prob)
    if share > LOW_CONFIDENCE_SHARE:
        flags.append(Flag("low_confidence", share, LOW_CONFIDENCE_SHARE,
                          f"{100 * share:.0f}% of the lesion's probability lies in "
                          f"{UNCERTAIN[0]}-{UNCERTAIN[1]}"))
    return flags


def edge_voxels(mask: np.ndarray) -> int:
    """Lesion voxels on the six outer faces of the array: all of them but the inner ones."""
    inner = mask[1:-1, 1:-1, 1:-1] if min(mask.shape) > 2 else mask[:0]
    return int(np.count_nonzero(mask) - np.count_nonzero(inner))


def uncertain_share(prob: np.ndarray) -> float:
    """Share of the probability mass above UNCERTAIN[0] that lies below UNCERTAIN[1]."""
    low, high = UNCERTAIN
    mass = prob[prob > low]
    total = float(mass.sum())
    return round(float(mass[mass < high].sum()) / total, 3) if total else 0.0
