"""Shared fixtures: small synthetic NIfTI files on any grid, the shared model's path, a
stand-in for a killed process, and a MeshNet whose output is known (threshold_model)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MODEL = SHARED / "models" / "brainchop-t2-lesion-11ch"
REAL_SCANS = SHARED / "real-scans"


class Killed(BaseException):
    """Stands in for the process dying, e.g. raised by an on_epoch callback right after an
    epoch was saved; a BaseException, as KeyboardInterrupt, so no `except Exception` (such as
    segment_file's safety net) can take it for an ordinary error."""


def grid_affine(zooms=(1.0, 1.0, 1.0), angles_deg=(0.0, 0.0, 0.0), axcodes_flip=(1, 1, 1),
                origin=(0.0, 0.0, 0.0), perm=(0, 1, 2)) -> np.ndarray:
    """A voxel-to-RAS affine: axis permutation, flips, rotation (oblique) and zooms."""
    from scipy.spatial.transform import Rotation

    base = np.eye(3)[:, list(perm)] * np.asarray(axcodes_flip, float)
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ base @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def blob(shape, center, radius) -> np.ndarray:
    """A solid ball (bool array) in voxel units."""
    grid = np.indices(shape).astype(np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius**2


@pytest.fixture
def write_nifti(tmp_path):
    """Write an array as NIfTI: write_nifti(data, affine=None, name=..., dtype=None, slope=None)."""

    def _write(data, affine=None, name="scan.nii.gz", dtype=None, slope=None, inter=None) -> Path:
        affine = np.eye(4) if affine is None else affine
        data = np.asarray(data)
        img = nib.Nifti1Image(data.astype(dtype) if dtype else data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
        if slope is not None:
            img.header.set_slope_inter(slope, inter or 0.0)
        path = tmp_path / name
        nib.save(img, path)
        return path

    return _write


@pytest.fixture
def shared_model() -> Path:
    """The brainchop model.json from ../shared; skip when that folder is not beside the repo."""
    path = SHARED_MODEL / "model.json"
    if not path.exists():
        pytest.skip(f"shared brainchop model not found at {path}")
    return path


THRESHOLD = 0.6


@pytest.fixture(scope="session")
def threshold_model(tmp_path_factory):
    """A hand-set MeshNet that marks voxels brighter than THRESHOLD (of the 0..1 range).

    Every 3x3x3 conv passes channel 0 through its centre tap; the last layer compares it
    with THRESHOLD. Its output is known exactly, so geometry errors show up in tests.
    """
    model = MeshNet(MeshNetConfig(channels=2))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.zero_()
                module.bias.zero_()
                if module.kernel_size == (3, 3, 3):
                    module.weight[0, 0, 1, 1, 1] = 1.0
            elif isinstance(module, torch.nn.BatchNorm3d):
                module.reset_parameters()
                module.eps = 0.0
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.weight[1, 0] = 50.0
        last.bias[1] = -50.0 * THRESHOLD
    path = tmp_path_factory.mktemp("model") / "threshold.safetensors"
    save_checkpoint(path, model.eval(), {"note": "test fixture, not a trained model"})
    return str(path)


def head(shape=(40, 44, 24), center=(20, 22, 12), seed=0):
    """A dim ellipsoid 'head' with a bright ball inside; returns (image, ball mask)."""
    rng = np.random.default_rng(seed)
    image = np.where(blob(shape, center, 14), 300.0, 0.0) + rng.random(shape) * 5
    ball = blob(shape, (center[0] + 3, center[1] - 2, center[2]), 5)
    image[ball] = 1000.0
    return image.astype(np.float32), ball


@pytest.fixture(scope="session")
def wheel_files(tmp_path_factory) -> list[str]:
    """The names inside a wheel built from this checkout (built once, for the tests that
    check what the package ships)."""
    import subprocess
    import sys
    import zipfile

    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(Path(__file__).parents[1]),
                    "--no-deps", "-q", "-w", str(folder)], check=True)
    return zipfile.ZipFile(next(folder.glob("meshseg-*.whl"))).namelist()


@pytest.fixture
def restore_threads(monkeypatch):
    """Undo `set_threads` after a test: torch's thread count and the variables it sets."""
    from meshseg.pipeline.infer import ITK_THREADS_VARIABLE

    for name in ("OMP_NUM_THREADS", ITK_THREADS_VARIABLE):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
