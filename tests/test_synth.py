"""Synthetic heads: aligned masks, lesion sizes, determinism, scanner-like grids."""

import numpy as np
import pytest
from scipy import ndimage

from meshseg.data import read_manifest
from meshseg.synth import ARC_QUARTILES_ML, SynthOptions, lesion_volume_ml, make_dataset, synth_head


def voxel_ml(img) -> float:
    return abs(np.linalg.det(img.affine[:3, :3])) / 1000


@pytest.fixture(scope="module")
def pair():
    return synth_head(7, SynthOptions(lesion_ml=(20.0, 60.0)))


def test_same_seed_same_head_other_seed_other_head(pair):
    image, mask = pair
    again_image, again_mask = synth_head(7, SynthOptions(lesion_ml=(20.0, 60.0)))
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(again_image.dataobj))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(again_mask.dataobj))
    other, _ = synth_head(8, SynthOptions(lesion=False))
    assert other.shape != image.shape or not np.allclose(other.affine, image.affine)


def test_mask_is_aligned_with_a_csf_like_cavity(pair):
    image, mask = pair
    assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
    data, lesion = np.asarray(image.dataobj), np.asarray(mask.dataobj) > 0
    assert np.isfinite(data).all() and data.min() >= 0
    ml = lesion.sum() * voxel_ml(mask)
    assert 20.0 * 0.6 < ml < 60.0 * 1.5, ml  # the random head scaling changes volumes a little
    shell = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion)
    # On T2 the cavity is bright like CSF, brighter than the tissue around it.
    assert np.median(data[lesion]) > 1.3 * np.median(data[shell])
    # ... and it lies inside the head, far from the background.
    assert np.median(data[shell]) > 5 * np.median(data[data < np.percentile(data, 20)])


def test_scanner_grid_is_not_the_template_grid(pair):
    image, _ = pair
    linear = image.affine[:3, :3]
    zooms = np.sqrt((linear**2).sum(0))
    off_diagonal = np.abs(linear / zooms - np.round(linear / zooms)).max()
    assert off_diagonal > 1e-3 or not np.allclose(zooms, zooms[0])


def test_lesion_sizes_follow_arc_quartiles_within_limits():
    rng = np.random.default_rng(0)
    sizes = np.array([lesion_volume_ml(rng, (ARC_QUARTILES_ML[0], ARC_QUARTILES_ML[-1]))
                      for _ in range(2000)])
    np.testing.assert_allclose(np.percentile(sizes, [25, 50, 75]), ARC_QUARTILES_ML[1:4],
                               rtol=0.15)
    narrow = [lesion_volume_ml(rng, (1.0, 5.0)) for _ in range(200)]
    assert 1.0 <= min(narrow) and max(narrow) <= 5.0


def test_no_lesion_gives_an_empty_mask():
    _, mask = synth_head(3, SynthOptions(lesion=False, native_grid=False))
    assert not np.asarray(mask.dataobj).any()


@pytest.mark.slow
def test_dataset_manifest_reads_back(tmp_path):
    manifest = make_dataset(tmp_path / "d", 2, seed=5, jobs=2)
    pairs = read_manifest(manifest)
    assert [p.subject for p in pairs] == ["synth00005", "synth00006"]
    assert all(p.image.exists() and p.mask.exists() for p in pairs)
