"""Synthetic heads: aligned masks, CSF-like lesions in the brain, sizes, determinism, grids."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from meshseg.errors import MeshsegError
from meshseg.metrics import ARC_QUARTILES_ML
from meshseg.training.data import read_manifest
from meshseg.training.synth import (
    SynthOptions,
    _atlas,
    _atlas_lesion,
    _conformed_grid,
    _draw_pose,
    _native_grid,
    draw_head,
    lesion_volume_ml,
    make_dataset,
    synth_head,
)

T2 = SynthOptions(lesion_ml=(20.0, 60.0), random_contrast=0.0)  # always T2-ordered contrast


def voxel_ml(img) -> float:
    return abs(np.linalg.det(img.affine[:3, :3])) / 1000


@pytest.fixture(scope="module")
def head():
    return draw_head(7, T2, brain=True)


def test_image_mask_and_brain_share_one_grid(head):
    for other in (head.mask, head.brain):
        assert other.shape == head.image.shape
        np.testing.assert_allclose(other.affine, head.image.affine)
        assert other.get_data_dtype() == np.uint8
    assert head.image.get_data_dtype() in (np.float32, np.int16)
    data = np.asarray(head.image.dataobj, dtype=np.float32)
    assert np.isfinite(data).all() and data.min() >= 0
    assert set(np.unique(np.asarray(head.mask.dataobj))) == {0, 1}


def test_lesion_is_a_csf_like_cavity_inside_the_brain(head):
    data = np.asarray(head.image.dataobj, dtype=np.float32)
    lesion = np.asarray(head.mask.dataobj) > 0
    brain = np.asarray(head.brain.dataobj) > 0
    assert 20.0 * 0.6 < lesion.sum() * voxel_ml(head.mask) < 60.0 * 1.4
    assert head.lesion_ml == pytest.approx(lesion.sum() * voxel_ml(head.mask))
    assert (lesion & ~brain).sum() <= 0.01 * lesion.sum()  # partial-volume edge at most
    # On T2 the cavity is bright like CSF, brighter than the brain tissue around it.
    shell = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion)
    assert np.median(data[lesion]) > 1.5 * np.median(data[shell & brain])
    assert np.median(data[lesion]) > 1.5 * np.median(data[brain])
    # Real scans are not skull-stripped: there is bright head (scalp) outside the brain.
    outside = ~ndimage.binary_dilation(brain, iterations=3)
    assert np.percentile(data[outside], 99) > np.median(data[brain])


def test_same_seed_same_head_other_seed_other_head(head):
    image, mask = synth_head(7, T2)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(head.image.dataobj))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(head.mask.dataobj))
    other, other_mask = synth_head(8, SynthOptions(lesion=False))
    assert not np.asarray(other_mask.dataobj).any()  # no lesion: empty mask
    assert other.shape != image.shape or not np.allclose(other.affine, image.affine)


def test_conformed_grid_is_freesurfer_like():
    rng = np.random.default_rng(0)
    shape, affine = _conformed_grid(rng, _draw_pose(rng))
    assert shape == (256, 256, 256)
    assert nib.aff2axcodes(affine) == ("L", "I", "A")
    np.testing.assert_allclose(np.abs(affine[:3, :3]).sum(0), 1.0)


@pytest.mark.parametrize("seed, limits", [(3, (0.2, 1.0)), (4, (250.0, 360.0))])
def test_lesion_volume_stays_near_the_requested_range(seed, limits):
    head = draw_head(seed, SynthOptions(lesion_ml=limits))
    assert 0.5 * limits[0] <= head.lesion_ml <= 1.2 * limits[1]


def test_native_grids_vary_like_scanners():
    rng = np.random.default_rng(0)
    grids = [_native_grid(rng, _draw_pose(rng)) for _ in range(40)]
    zooms = np.array([np.sqrt((affine[:3, :3] ** 2).sum(0)) for _, affine in grids])
    assert zooms.min() >= 0.5 and zooms.max() <= 5.0
    assert (zooms.max(1) / zooms.min(1) > 2).sum() >= 10  # thick-slice 2-D scans
    assert (zooms.max(1) / zooms.min(1) < 1.3).sum() >= 5  # near-isotropic 3-D scans
    directions = [affine[:3, :3] / z for (_, affine), z in zip(grids, zooms)]
    oblique = [np.abs(d - np.round(d)).max() > 0.05 for d in directions]
    assert 10 <= sum(oblique) < 40
    assert len({nib.aff2axcodes(affine) for _, affine in grids}) >= 8  # orders and flips
    for shape, affine in grids:  # the field of view covers the head
        extent = np.array(shape) * np.sqrt((affine[:3, :3] ** 2).sum(0))
        assert extent.max() >= 200 and extent.min() >= 120


def test_lesion_sizes_follow_arc_quartiles_within_limits():
    rng = np.random.default_rng(0)
    sizes = np.array([lesion_volume_ml(rng, (ARC_QUARTILES_ML[0], ARC_QUARTILES_ML[-1]))
                      for _ in range(2000)])
    np.testing.assert_allclose(np.percentile(sizes, [25, 50, 75]), ARC_QUARTILES_ML[1:4],
                               rtol=0.15)
    narrow = [lesion_volume_ml(rng, (1.0, 5.0)) for _ in range(200)]
    assert 1.0 <= min(narrow) and max(narrow) <= 5.0


def test_an_empty_size_range_is_refused():
    with pytest.raises(MeshsegError, match="lesion size range"):
        synth_head(0, SynthOptions(lesion_ml=(5.0, 1.0)))


@pytest.mark.slow
def test_dataset_manifest_reads_back(tmp_path):
    manifest = make_dataset(tmp_path / "d", 2, seed=5, jobs=2)
    pairs = read_manifest(manifest)
    assert [p.subject for p in pairs] == ["synth00005", "synth00006"]
    assert all(p.image.exists() and p.mask.exists() for p in pairs)
    again = make_dataset(tmp_path / "e", 2, seed=5, jobs=1)
    assert again.read_text() == manifest.read_text()


def write_atlas(folder, radii_mm=(7.0, 9.0, 11.0), centre_mm=(40.0, -10.0, 10.0)):
    """Ball-shaped lesion masks in MNI space on the SOOP atlas grid (1 mm LAS), one per radius,
    all in the right hemisphere."""
    folder.mkdir()
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (78.0, -112.0, -50.0)
    index = np.linalg.solve(affine[:3, :3], np.array(centre_mm) - affine[:3, 3])
    grid = np.indices((157, 189, 136), dtype=np.float32)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, index)))
    for radius in radii_mm:
        nib.save(nib.Nifti1Image((distance <= radius).astype(np.uint8), affine),
                 folder / f"ball{int(radius)}_lesion.nii.gz")
    return folder


def test_atlas_lesions_keep_their_shape_size_and_place(tmp_path):
    folder = write_atlas(tmp_path / "atlas")
    atlas = _atlas()
    balls_ml = {4 / 3 * np.pi * r**3 / 1000 for r in (7.0, 9.0, 11.0)}
    sides = set()
    for seed in range(6):
        lesion = _atlas_lesion(np.random.default_rng(seed), atlas, folder, (0.2, 400.0))
        assert min(abs(lesion.ml - ml) / ml for ml in balls_ml) < 0.1
        core = np.argwhere(lesion.extent >= 0.5) + [s.start for s in lesion.box]
        x_mm = (core * np.diag(atlas.affine)[:3] + atlas.affine[:3, 3]).mean(0)
        assert abs(abs(x_mm[0]) - 40.0) < 2.0 and abs(x_mm[1] + 10.0) < 2.0
        assert np.sign(x_mm[0]) == lesion.side
        sides.add(lesion.side)
    assert sides == {-1.0, 1.0}  # mirrored to the left in some heads (ARC is mostly left)
    with pytest.raises(MeshsegError, match="no lesion masks"):
        _atlas_lesion(np.random.default_rng(0), atlas, tmp_path, (0.2, 400.0))


def test_skull_stripped_head_with_an_atlas_lesion(tmp_path):
    options = SynthOptions(lesions=write_atlas(tmp_path / "atlas", radii_mm=(12.0,)),
                           skull_stripped=1.0, random_contrast=0.0)
    head = draw_head(5, options, brain=True)
    data = np.asarray(head.image.dataobj, dtype=np.float32)
    brain = np.asarray(head.brain.dataobj) > 0
    lesion = np.asarray(head.mask.dataobj) > 0
    assert not data[~ndimage.binary_dilation(brain, iterations=4)].any()  # no skull, no scalp
    assert (data[brain] > 0).mean() > 0.99
    ball_ml = 4 / 3 * np.pi * 12.0**3 / 1000  # the head's pose scales it by 0.6-1.0
    assert 0.5 * ball_ml < head.lesion_ml < 1.1 * ball_ml
    assert np.median(data[lesion]) > 1.5 * np.median(data[brain])
