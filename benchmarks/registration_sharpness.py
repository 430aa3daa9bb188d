"""Calibration of the `poor_registration` flag: the sharpness (location.fit_quality) of each
scan's own fit, and of that fit deliberately spoiled: moved 15 mm along x and along z, turned
20 degrees about x and about y, scaled by 0.88 (docs/location.md, "Why sharpness, not NMI").
The flag's threshold must lie between the good fits and the moved or turned ones.

Usage: python benchmarks/registration_sharpness.py ../shared/real-scans/*.nii.gz head1.nii.gz
(synthetic heads from `meshseg example --seed 1 head1.nii.gz`)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from meshseg.io import load_volume
from meshseg.qc import location


def turned(axis: int, degrees: float) -> np.ndarray:
    """A rotation about MNI axis `axis` through the MNI origin."""
    a, b = [i for i in range(3) if i != axis]
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    out = np.eye(4)
    out[[a, a, b, b], [a, b, a, b]] = c, -s, s, c
    return out


def moved(axis: int, mm: float) -> np.ndarray:
    """A shift along MNI axis `axis`."""
    out = np.eye(4)
    out[axis, 3] = mm
    return out


SPOILED = {"moved 15 mm x": moved(0, 15.0), "moved 15 mm z": moved(2, 15.0),
           "turned 20 deg x": turned(0, 20.0), "turned 20 deg y": turned(1, 20.0),
           "scaled 0.88": np.diag([0.88, 0.88, 0.88, 1.0])}


def main(paths: list[str]) -> None:
    location.mni_space()  # load once, outside the timings
    print("| scan | registration s | NMI | good fit | " + " | ".join(SPOILED) + " |")
    print("| --- " * (4 + len(SPOILED)) + "|")
    for path in paths:
        volume = load_volume(path)
        start = time.perf_counter()
        fit = location.register(volume)
        seconds = time.perf_counter() - start
        spoiled = [location.fit_quality(volume, fit.scan_from_mni @ change)[0]
                   for change in SPOILED.values()]
        print(f"| {Path(path).name} | {seconds:.1f} | {fit.nmi:.4f} | {fit.quality:.2f} | "
              + " | ".join(f"{value:.2f}" for value in spoiled) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
