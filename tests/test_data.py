"""Training data: manifest and BIDS discovery, up-front checks, the conformed cache, the Dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meshseg.errors import InputError
from meshseg.io import load_volume
from meshseg.pipeline.conform import CONFORMED_SHAPE, to_unit_range
from meshseg.training import data
from meshseg.training.data import (
    TEACHER_LEVELS,
    ConformedCache,
    LesionDataset,
    Pair,
    check_pairs,
    crop_start,
    downsample,
    find_bids_pairs,
    load_dataset,
    read_manifest,
    soft_target,
    split_by_subject,
    write_manifest,
)
from tests.conftest import blob, grid_affine

SHAPE = (24, 24, 24)


def write_pair(folder: Path, stem: str, shape=SHAPE, center=(12, 12, 12), radius=4,
               affine=None, seed=0) -> Pair:
    """A noisy scan with a bright ball and the ball as its mask: ``<stem>.nii.gz`` and
    ``<stem>_mask.nii.gz`` in `folder`."""
    affine = np.eye(4) if affine is None else affine
    lesion = blob(shape, center, radius)
    scan = np.random.default_rng(seed).uniform(20, 60, shape).astype(np.float32)
    scan[lesion] += 150
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = folder / f"{stem}.nii.gz", folder / f"{stem}_mask.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), image)
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), mask)
    return Pair(image, mask, stem)


def fake_conform_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for `data.conform_pair` that keeps the scan's own small grid (tests stay fast)."""
    scan = load_volume(pair.image).data
    return (np.clip(scan, 0, 255).astype(np.uint8),
            load_volume(pair.mask).data.astype(np.uint8))


def touch_nifti(path: Path, shape=(4, 4, 4)) -> Path:
    """An empty NIfTI file at `path` (folders created): for discovery tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)), path)
    return path


# ---------------------------------------------------------------------------- manifest


def test_manifest_resolves_relative_paths_and_fills_subject_and_acq(tmp_path):
    (tmp_path / "lists").mkdir()
    csv_path = tmp_path / "lists" / "train.csv"
    csv_path.write_text("image,mask,subject,acq\n"
                        "../a/sub-01_ses-1_acq-spc3_T2w.nii.gz,../a/m1.nii.gz,,\n"
                        "/abs/scan.nii,/abs/scan_mask.nii,patient7,tse\n"
                        "b/other.nii.gz,b/other_mask.nii.gz,,\n")
    pairs = read_manifest(csv_path)
    assert pairs[0] == Pair(tmp_path / "lists/../a/sub-01_ses-1_acq-spc3_T2w.nii.gz",
                            tmp_path / "lists/../a/m1.nii.gz", "sub-01", "spc3")
    assert pairs[1] == Pair(Path("/abs/scan.nii"), Path("/abs/scan_mask.nii"), "patient7", "tse")
    assert pairs[2].subject == "other" and pairs[2].acq is None


@pytest.mark.parametrize("text, message", [
    ("scan,label\na.nii,b.nii\n", "needs columns image and mask"),
    ("image,mask\n", "lists no"),
    ("image,mask\na.nii,\n", "line 2: empty"),
])
def test_manifest_problems_are_named(tmp_path, text, message):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(csv_path)


def test_load_dataset_dispatches_and_refuses_other_files(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,mask\na.nii,b.nii\n")
    assert load_dataset(csv_path)[0].image == tmp_path / "a.nii"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected a .csv manifest or a BIDS folder"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        load_dataset(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------- BIDS


def test_bids_pairs_arc_layout_sessions_runs_acq_and_sidecar(tmp_path):
    root = tmp_path / "ds"
    anat1 = root / "sub-M2001/ses-1253/anat"
    arc_scan = touch_nifti(anat1 / "sub-M2001_ses-1253_acq-spc3p2_run-7_T2w.nii.gz")
    touch_nifti(anat1 / "sub-M2001_ses-1253_acq-spc3p2_run-8_T2w.nii.gz")  # unmasked 2nd run
    arc_mask = touch_nifti(root / "derivatives/lesion_masks/sub-M2001/ses-1253/anat/"
                           "sub-M2001_ses-1253_acq-spc3p2_run-7_T2w_desc-lesion_mask.nii.gz")
    touch_nifti(root / "sub-M2001/ses-2000/anat/sub-M2001_ses-2000_T2w.nii.gz")  # no mask
    side_scan = touch_nifti(root / "sub-M2002/ses-1/anat/sub-M2002_ses-1_T2w.nii.gz")
    side_scan.with_name("sub-M2002_ses-1_T2w.json").write_text(json.dumps(
        {"SequenceName": "*spc_282ns", "ParallelReductionFactorInPlane": 2}))
    side_mask = touch_nifti(root / "derivatives/lesions/sub-M2002/ses-1/anat/"
                            "sub-M2002_ses-1_label-lesion_roi.nii.gz")
    flat_scan = touch_nifti(root / "sub-M2003/anat/sub-M2003_T2w.nii")
    flat_mask = touch_nifti(root / "derivatives/manual/sub-M2003/sub-M2003_desc-lesion_mask.nii")
    touch_nifti(root / "derivatives/lesion_masks/sub-M2003/anat/sub-M2003_desc-brain_mask.nii")

    pairs = find_bids_pairs(root)

    assert sorted(pairs, key=lambda p: p.subject) == [
        Pair(arc_scan, arc_mask, "sub-M2001", "spc3p2"),
        Pair(side_scan, side_mask, "sub-M2002", "spcp2"),
        Pair(flat_scan, flat_mask, "sub-M2003", None),
    ]
    assert load_dataset(root) == pairs


def test_bids_mask_matching_several_scans_is_an_error(tmp_path):
    root = tmp_path / "ds"
    for run in (1, 2):
        touch_nifti(root / f"sub-01/ses-a/anat/sub-01_ses-a_run-{run}_T2w.nii.gz")
    touch_nifti(root / "derivatives/lesion_masks/sub-01/ses-a/anat/"
                "sub-01_ses-a_desc-lesion_mask.nii.gz")
    orphan = touch_nifti(root / "derivatives/lesion_masks/sub-09/anat/"
                         "sub-09_desc-lesion_mask.nii.gz")
    with pytest.raises(InputError, match="2 unmatched") as err:
        find_bids_pairs(root)
    assert "run-1_T2w.nii.gz, sub-01_ses-a_run-2_T2w.nii.gz" in str(err.value)
    assert f"{orphan}: needs exactly one matching T2w scan (found none)" in str(err.value)


def test_bids_without_masks_is_an_error(tmp_path):
    touch_nifti(tmp_path / "sub-01/anat/sub-01_T2w.nii.gz")
    with pytest.raises(InputError, match="no lesion masks"):
        find_bids_pairs(tmp_path)


# ---------------------------------------------------------------------------- checks, split


def test_check_pairs_reports_every_problem_with_file_names(tmp_path):
    good = write_pair(tmp_path, "good")
    other_shape = write_pair(tmp_path, "s1")
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 20), np.uint8), np.eye(4)), other_shape.mask)
    shifted = write_pair(tmp_path, "s2")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), grid_affine(origin=(0, 0, 2))),
             shifted.mask)
    soft = write_pair(tmp_path, "s3")
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), np.eye(4)), soft.mask)
    missing = Pair(tmp_path / "absent.nii.gz", good.mask, "x")

    problems = check_pairs([good, other_shape, shifted, soft, missing, good])

    assert problems == [
        f"{other_shape.mask}: shape (24, 24, 20) differs from its scan s1.nii.gz (24, 24, 24)",
        f"{shifted.mask}: affine differs from its scan s2.nii.gz (not on the same grid)",
        f"{soft.mask}: mask is not binary (values other than 0 and 1)",
        f"{missing.image}: no such file",
        f"{good.image}: listed more than once",
    ]
    assert check_pairs([good]) == []


def test_split_keeps_subjects_together_and_repeats_with_seed():
    pairs = [Pair(Path(f"{s}_{k}.nii"), Path("m.nii"), s) for s in "abcdefghij" for k in (1, 2)]
    train, val = split_by_subject(pairs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not {p.subject for p in train} & {p.subject for p in val}
    assert (train, val) == split_by_subject(pairs, 0.2, seed=3)
    assert split_by_subject(pairs[:4], 0.01, seed=0)[1]  # at least one held out
    with pytest.raises(InputError, match="at least two subjects"):
        split_by_subject(pairs[:2], 0.5, seed=0)


# ---------------------------------------------------------------------------- cache


def test_cache_conforms_image_and_mask_onto_one_grid_then_hits(tmp_path, monkeypatch):
    affine = grid_affine(zooms=(2.0, 2.0, 3.0), angles_deg=(10, 0, 5), origin=(-20, -20, -30))
    pair = write_pair(tmp_path / "in", "scan", center=(8, 14, 10), radius=4, affine=affine)
    cache = ConformedCache(tmp_path / "cache")

    image, mask = cache.get(pair)

    assert image.shape == mask.shape == CONFORMED_SHAPE
    assert image.dtype == mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    # 4-voxel ball of 2x2x3 mm voxels: roughly 4/3 pi (8 * 8 * 12) mm^3 after conforming.
    assert 2000 < mask.sum() < 4500
    inside, rim = image[mask == 1], image[(mask == 0) & (image > 0)]
    assert inside.mean() > 5 * rim.mean()  # the mask sits on the bright ball (7x; 6 mm off: 2x)
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / f"{cache.key(pair)}.npy"]

    def refuse(_pair):
        raise AssertionError("conformed again despite a cached entry")

    monkeypatch.setattr(data, "conform_pair", refuse)
    hit_image, hit_mask = ConformedCache(tmp_path / "cache").get(pair)
    np.testing.assert_array_equal(hit_image, image)
    np.testing.assert_array_equal(hit_mask, mask)


def test_cache_key_follows_content_and_settings_not_location(tmp_path, monkeypatch):
    pair = write_pair(tmp_path / "a", "scan")
    copy = Pair(*(Path(shutil.copy(p, tmp_path / f"copy_{p.name}")) for p in (pair.image,
                                                                            pair.mask)), "c")
    cache = ConformedCache(tmp_path / "cache")
    key = cache.key(pair)
    assert cache.key(copy) == key
    changed = write_pair(tmp_path / "b", "scan", radius=3)
    assert cache.key(Pair(pair.image, changed.mask, "x")) != key
    monkeypatch.setattr(data, "CACHE_FORMAT", data.CACHE_FORMAT + 1)
    assert ConformedCache(tmp_path / "cache").key(pair) != key


# ---------------------------------------------------------------------------- dataset


@pytest.fixture
def small_set(tmp_path, monkeypatch):
    """Two 24^3 pairs, cached on their own grid via `fake_conform_pair`."""
    monkeypatch.setattr(data, "conform_pair", fake_conform_pair)
    pairs = [write_pair(tmp_path, "a", center=(5, 6, 7), radius=3),
             write_pair(tmp_path, "b", center=(17, 12, 16), radius=2, seed=1)]
    return pairs, ConformedCache(tmp_path / "cache")


def test_dataset_whole_volume_is_the_unit_scaled_scan(small_set):
    pairs, cache = small_set
    image, mask = LesionDataset(pairs, cache)[0]
    scan, lesion = cache.get(pairs[0])
    assert image.shape == (1, *SHAPE) and mask.shape == SHAPE
    assert image.dtype == torch.float32 and mask.dtype == torch.int64
    np.testing.assert_array_equal(image[0].numpy(), to_unit_range(scan))
    np.testing.assert_array_equal(mask.numpy(), lesion)


def test_dataset_crops_hold_lesion_and_repeat_per_key(small_set):
    pairs, cache = small_set
    dataset = LesionDataset(pairs, cache, crop=8, lesion_p=1.0, seed=4)
    crops = [dataset[(1, draw)] for draw in range(12)]
    assert all(img.shape == (1, 8, 8, 8) and msk.shape == (8, 8, 8) for img, msk in crops)
    assert all(msk.sum() > 0 for _, msk in crops)
    assert len({img.numpy().tobytes() for img, _ in crops}) > 1  # draws differ
    again = LesionDataset(pairs, cache, crop=8, lesion_p=1.0, seed=4)
    for key in (0, (1, 3)):
        np.testing.assert_array_equal(again[key][0].numpy(), dataset[key][0].numpy())
    np.testing.assert_array_equal(dataset[0][0].numpy(), dataset[0][0].numpy())


def test_dataset_flip_mirrors_left_right_only(small_set):
    pairs, cache = small_set
    base_image, base_mask = LesionDataset(pairs, cache)[0]
    flipping = LesionDataset(pairs, cache, flip_lr=True)
    seen = set()
    for draw in range(16):
        image, mask = flipping[(0, draw)]
        if np.array_equal(mask.numpy(), base_mask.numpy()):
            seen.add("same")
        else:
            np.testing.assert_array_equal(mask.numpy(), base_mask.numpy()[::-1])
            np.testing.assert_array_equal(image.numpy(), base_image.numpy()[:, ::-1])
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_teacher_targets_mix_mask_and_teacher_in_the_crop_and_flip(small_set, tmp_path):
    """The teacher's map is the scan itself here, so the lesion target minus the weighted
    image must leave exactly the weighted mask: the same window, the same flip."""
    pairs, cache = small_set
    maps = []
    for pair in pairs:
        maps.append(tmp_path / f"{pair.subject}.teacher.npy")
        unit = to_unit_range(cache.get(pair)[0])
        np.save(maps[-1], np.round(unit * TEACHER_LEVELS).astype(np.uint8))
    dataset = LesionDataset(pairs, cache, crop=12, lesion_p=0.5, flip_lr=True, teacher=maps,
                            teacher_weight=0.25)
    lesion_seen = False
    for draw in range(12):
        image, target = dataset[(draw % 2, draw)]
        assert target.shape == (2, 12, 12, 12) and target.dtype == torch.float32
        np.testing.assert_allclose(target.sum(0).numpy(), 1.0, atol=1e-6)
        rest = (target[1] - 0.25 * image[0]).numpy() / 0.75
        assert np.abs(rest - np.round(rest)).max() < 0.25 * 0.51 / TEACHER_LEVELS / 0.75 + 1e-6
        assert set(np.unique(np.round(rest))) <= {0.0, 1.0}
        lesion_seen |= bool(np.round(rest).any())
    assert lesion_seen  # crops over lesion carry the mask
    assert soft_target(np.array([0, 1]), np.array([255, 0], np.uint8), 1.0)[1].tolist() == [1, 0]


def test_intensity_aug_varies_training_draws_only(small_set):
    pairs, cache = small_set
    plain = LesionDataset(pairs, cache)
    varied = LesionDataset(pairs, cache, intensity_aug=True)
    np.testing.assert_array_equal(varied[0][0].numpy(), plain[0][0].numpy())  # validation
    base, base_mask = plain[0]
    draws = [varied[(0, draw)] for draw in range(8)]
    assert all(np.array_equal(mask.numpy(), base_mask.numpy()) for _, mask in draws)
    images = [image.numpy() for image, _ in draws]
    assert len({image.tobytes() for image in images}) == 8
    for image in images:
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image[base.numpy() == 0].max() == 0.0  # background stays black
        # A monotonic change: brighter voxels stay at least as bright.
        order = np.argsort(base.numpy().ravel(), kind="stable")
        assert np.all(np.diff(image.ravel()[order]) >= -1e-6)


def test_vary_intensity_spans_its_ranges():
    rng = np.random.default_rng(0)
    half = np.full((2, 2, 2), 0.5, np.float32)
    values = [float(data.vary_intensity(half, rng)[0, 0, 0]) for _ in range(400)]
    low = 0.5 ** data.GAMMA_RANGE[1] * data.SCALE_RANGE[0]
    high = 0.5 ** data.GAMMA_RANGE[0] * data.SCALE_RANGE[1]
    assert low <= min(values) < low * 1.3 and high / 1.3 < max(values) <= high


def test_dataset_downsample_and_refusals(small_set):
    pairs, cache = small_set
    image, mask = LesionDataset(pairs, cache, downsample=2)[0]
    assert image.shape == (1, 12, 12, 12) and mask.shape == (12, 12, 12)
    with pytest.raises(InputError, match="crop 13: must be between 1 and the volume side 12"):
        LesionDataset(pairs, cache, downsample=2, crop=13)
    with pytest.raises(InputError, match="downsample 5"):
        LesionDataset(pairs, cache, downsample=5)


def test_downsample_block_mean_and_half_lesion_rule():
    image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[0] = 1  # exactly half of the block
    small, lesion = downsample(image, mask, 2)
    assert small.shape == (1, 1, 1) and small[0, 0, 0] == pytest.approx(3.5)
    assert lesion[0, 0, 0] == 1
    mask[0, 0] = 0
    assert downsample(image, mask, 2)[1][0, 0, 0] == 0


def test_crop_start_contains_the_lesion_voxel_and_stays_inside():
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[19, 0, 20] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        start = crop_start(mask.shape, 10, mask, 1.0, rng)
        assert all(0 <= s <= n - 10 for s, n in zip(start, mask.shape))
        assert start[0] <= 19 < start[0] + 10 and start[1] == 0 and start[2] <= 20 < start[2] + 10
    empty = np.zeros_like(mask)
    assert all(0 <= s <= n - 10 for s, n in zip(crop_start(empty.shape, 10, empty, 1.0, rng),
                                                   empty.shape))


def test_manifest_round_trips_through_read_manifest(tmp_path):
    pairs = [Pair(tmp_path / "a.nii.gz", tmp_path / "a_mask.nii.gz", "sub-1", "spc3p2"),
             Pair(tmp_path / "b.nii.gz", tmp_path / "b_mask.nii.gz", "sub-2")]
    write_manifest(pairs, tmp_path / "x.csv")
    assert read_manifest(tmp_path / "x.csv") == pairs
