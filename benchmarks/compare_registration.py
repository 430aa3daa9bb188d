"""Registration to MNI152 with SimpleITK (what meshseg uses) against dipy, on real scans.

Both register the same 3 mm images (location._coarse) with Mattes/Parzen mutual information,
rigid then 12-dof affine, two resolution levels, the template's brain mask as the metric's
region. SimpleITK runs meshseg's location.register (which adds a third, brain-masked affine
stage); dipy runs the rigid and affine stages of its AffineRegistration. For each scan it
prints the seconds, the normalised mutual information meshseg reports (registration_nmi, in
the template's brain, location.fit_quality), and the mean distance in mm between the two
results at brain points. Also the timing of QC as a whole: picture and the rest of checks.assess.

Usage: python benchmarks/compare_registration.py ../shared/real-scans/*.nii.gz
(needs dipy: pip install dipy; it is not a meshseg dependency)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from meshseg.io import load_volume
from meshseg.qc import checks, location, picture


def dipy_register(volume) -> tuple[np.ndarray, float]:
    """(scan_from_mni in RAS mm, seconds) from dipy on the same coarse images."""
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D
    from scipy import ndimage

    start = time.perf_counter()
    space = location.mni_space()
    brain = ndimage.binary_dilation(space.brain, iterations=location.BRAIN_MARGIN_MM)
    static, static_affine = location._coarse(space.t1, space.affine, location.REGISTRATION_MM)
    mask, _ = location._coarse(brain.astype(np.float32), space.affine,
                               location.REGISTRATION_MM)
    moving, moving_affine = location._coarse(volume.data, volume.affine,
                                             location.REGISTRATION_MM)
    static, moving = static.astype(np.float64), moving.astype(np.float64)
    centre = transform_centers_of_mass(static, static_affine, moving, moving_affine)
    method = AffineRegistration(metric=MutualInformationMetric(32, None), level_iters=[100, 100],
                                sigmas=[1.0, 0.0], factors=[2, 1], verbosity=0)
    fit = centre
    for transform in (RigidTransform3D(), AffineTransform3D()):
        fit = method.optimize(static, moving, transform, None, static_grid2world=static_affine,
                              moving_grid2world=moving_affine,
                              starting_affine=fit.affine,
                              static_mask=(mask > 0.5).astype(np.int32))
    return fit.affine, time.perf_counter() - start


def main(paths: list[str]) -> None:
    location.mni_space()  # load once, outside the timings
    checks._tissue_masks()
    points = np.argwhere(location.mni_space().brain)[::500]
    points = location.mni_space().affine @ np.c_[points, np.ones(len(points))].T
    print("| scan | SimpleITK s | SimpleITK NMI | dipy s | dipy NMI | mean distance mm "
          "| QC picture s | QC total s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        volume = load_volume(path)
        ours = location.register(volume)
        theirs, seconds = dipy_register(volume)
        nmi = location.fit_quality(volume, theirs)[1]
        distance = np.linalg.norm((ours.scan_from_mni @ points - theirs @ points)[:3], axis=0)
        empty = np.zeros(volume.data.shape, np.uint8)
        start = time.perf_counter()
        checks.assess(volume, empty.astype(np.float32), empty, 0.0, 0)
        total = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            picture.draw(volume.data, volume.affine, empty, Path(path).name,
                         Path(folder) / "qc.png")
            drawing = time.perf_counter() - start
        print(f"| {Path(path).name} | {ours.seconds:.1f} | {ours.nmi:.4f} | {seconds:.1f} "
              f"| {nmi:.4f} | {distance.mean():.1f} | {drawing:.2f} | {total + drawing:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
