"""The bundled default on real scans (../shared/real-scans): it must find a real stroke, leave a
healthy head empty, and give the same masks as brainchop's original TF.js files.

Synthetic heads once chose a default that found nothing on patients, so these checks run on
real data. Each scan is segmented once per model for the whole module (about 20 s each)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from meshseg.io import Volume, load_volume
from meshseg.metrics import largest_lesion_side
from meshseg.models import catalog
from meshseg.pipeline.predict import lesion_stats, runner, segment, to_mask
from meshseg.training.synth import EXAMPLE, draw_head
from tests.conftest import REAL_SCANS, SHARED_MODEL

pytestmark = pytest.mark.skipif(not (REAL_SCANS.is_dir() and SHARED_MODEL.is_dir()),
                                reason=f"real scans or the brainchop model not found in "
                                       f"{REAL_SCANS.parent}")


@functools.cache
def _mask(model_spec: str | None, scan: str) -> tuple[np.ndarray, np.ndarray]:
    """(0/1 mask, affine) of one scan (a file in real-scans, or "example") by one model."""
    model = catalog.load(model_spec)
    volume = _example() if scan == "example" else load_volume(REAL_SCANS / f"{scan}.nii.gz")
    prob = segment(volume, model, runner(model, torch.device("cpu")))
    return to_mask(prob, model.postprocess), volume.affine


@functools.cache
def _example() -> Volume:
    image = draw_head(0, EXAMPLE).image  # `meshseg example`'s head
    return Volume(np.asarray(image.dataobj, dtype=np.float32), image.affine, image.header)


@pytest.mark.parametrize("scan", ["stroke_T2w_mni", "example"])
def test_bundled_default_equals_the_original_tfjs_model(scan):
    ours, _ = _mask(None, scan)
    theirs, _ = _mask(str(SHARED_MODEL / "model.json"), scan)
    assert ours.any() and np.array_equal(ours, theirs)


def test_default_finds_the_left_stroke():
    mask, affine = _mask(None, "stroke_T2w_mni")
    ml, _, _ = lesion_stats(mask, affine)
    assert ml >= 20, f"{ml:.1f} mL"
    assert largest_lesion_side(mask, affine) == "left"


def test_default_marks_under_1_ml_on_a_healthy_head():
    mask, affine = _mask(None, "healthy_T2w")
    ml, _, _ = lesion_stats(mask, affine)
    assert ml < 1, f"{ml:.2f} mL"
