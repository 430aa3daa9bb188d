"""Images from label maps: a random intensity per label, then the scanner's artefacts.

SynthSeg's recipe (Billot et al., MedIA 2023), written for meshseg: every label of a head
gets a Gaussian intensity of its own, so a network trained on the result cannot rely on one
contrast. `contrast` narrows the draw to a look (T2, FLAIR, T1) by ordering the brain's
tissue classes as that sequence does, with wide jitter; "any" draws every label freely
(means U[25, 225], std U[5, 25], as SynthSeg). The lesion labels follow the same draw, so a
lesion's intensity is independent of the tissue around it (SynthStroke's point), within the
look's rules (a T2 cavity is fluid-bright, a FLAIR cavity fluid-dark with a bright rim).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from meshseg.training.synth import smooth_noise

CONTRASTS = ("t2", "flair", "t1", "any")

# FreeSurfer aseg labels by tissue class (SynthSeg's maps use this numbering).
CSF = (4, 5, 14, 15, 24, 43, 44, 72)
GREY = (3, 8, 17, 18, 26, 42, 47, 53, 54, 58, 136, 137, 163, 164)
DEEP_GREY = (10, 11, 12, 13, 49, 50, 51, 52)
WHITE = (2, 7, 16, 28, 41, 46, 60, 85)
LESION_CAVITY = 1001  # painted labels of a chronic stroke (not in the aseg numbering)
LESION_RIM = 1002

# Mean intensity ranges (0..255) of each class by look: the order of tissues each sequence
# shows, wide enough that a head's contrast varies as scanners and protocols do. T2's are
# set from real conformed T2s (../shared/real-scans: brain tissue at 0.25-0.35 of the CSF
# level, CSF near the top of the 0..1 range after min-max scaling).
_CLASS_MEANS = {
    "t2": {"csf": (180, 240), "grey": (65, 105), "deep": (55, 90), "white": (45, 75),
           "cavity": (170, 245), "rim": (100, 170)},
    "flair": {"csf": (10, 45), "grey": (95, 140), "deep": (80, 120), "white": (65, 105),
              "cavity": (10, 60), "rim": (150, 230)},
    "t1": {"csf": (10, 45), "grey": (80, 120), "deep": (100, 140), "white": (140, 200),
           "cavity": (10, 50), "rim": (50, 100)},
}
# Labels outside the brain classes (scalp, muscle, bone, fat, eyes...) are drawn freely, as
# SynthSeg does, except on T2, where the realism check (benchmarks/synth_realism.py) saw the
# ARC-trained model call fluid-bright face and neck tissue lesion: real T2 soft tissue is
# darker than CSF, so there they stay below the CSF range.
_OTHER_MEANS = {"t2": (15, 130), "flair": (25, 225), "t1": (25, 225), "any": (25, 225)}


def _class_of(label: int) -> str | None:
    """The tissue class whose look-rule sets `label`'s mean; None: drawn freely."""
    for name, members in (("csf", CSF), ("grey", GREY), ("deep", DEEP_GREY),
                          ("white", WHITE), ("cavity", (LESION_CAVITY,)),
                          ("rim", (LESION_RIM,))):
        if label in members:
            return name
    return None


def draw_intensities(rng: np.random.Generator, labels: np.ndarray, contrast: str
                     ) -> np.ndarray:
    """A float32 image with a Gaussian intensity per label (label 0, air, stays near 0)."""
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r}: one of {', '.join(CONTRASTS)}")
    values = np.unique(labels)
    means = np.empty(values.size, np.float32)
    stds = np.empty(values.size, np.float32)
    for k, value in enumerate(values):
        kind = _class_of(int(value)) if contrast != "any" else None
        if value == 0:
            means[k], stds[k] = rng.uniform(0, 10), rng.uniform(0, 5)
        elif kind is None:
            means[k], stds[k] = rng.uniform(*_OTHER_MEANS[contrast]), rng.uniform(5, 25)
        else:
            means[k], stds[k] = rng.uniform(*_CLASS_MEANS[contrast][kind]), rng.uniform(3, 15)
    index = np.searchsorted(values, labels)
    image = means[index] + stds[index] * rng.standard_normal(labels.shape, np.float32)
    return np.clip(image, 0, None, out=image)


def scanner(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur (anisotropic, as a thick-slice acquisition resliced), bias field, gamma and
    noise; scaled 0..1 as the model space expects."""
    sigma = np.full(3, rng.uniform(0.0, 0.8))
    if rng.random() < 0.5:  # thick slices along one axis: 2-6 mm
        sigma[rng.integers(3)] = rng.uniform(2.0, 6.0) / 2.355
    image = ndimage.gaussian_filter(image, sigma)
    image *= np.exp(rng.uniform(0, 0.3) * smooth_noise(rng, image.shape, max(image.shape) / 4))
    image += rng.normal(0, rng.uniform(0, 8), image.shape).astype(np.float32)
    np.clip(image, 0, None, out=image)
    top = float(np.percentile(image[image > 0], 99.9)) if np.any(image > 0) else 1.0
    image = np.clip(image / max(top, 1e-6), 0, 1)
    return (image ** np.float32(np.exp(rng.normal(0, 0.25)))).astype(np.float32)
