"""Heads from label maps: the painted lesion is the truth, in brain tissue, on the map's grid."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meshseg.training import appearance
from meshseg.training.labelmaps import LabelMapOptions, draw_label_head, make_label_dataset


def _toy_map(path: Path) -> Path:
    """A 64^3 2 mm head: white matter in grey matter, ventricles, scalp (label 507)."""
    x, y, z = np.indices((64, 64, 64)) - 31.5
    r = np.sqrt((x / 1.1) ** 2 + (y / 1.3) ** 2 + z ** 2)
    labels = np.zeros((64, 64, 64), np.float32)
    labels[r < 30] = 507
    labels[r < 26] = 3
    labels[r < 22] = np.where(x[r < 22] > 0, 2, 41)  # LIA: +x voxel is left
    labels[(r < 5) & (x > 0)] = 4
    affine = np.array([[-2, 0, 0, 64], [0, 0, 2, -64], [0, -2, 0, 64], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(labels, affine), path)
    return path


def _toy_lesions(folder: Path) -> Path:
    folder.mkdir()
    mask = np.zeros((91, 109, 91), np.uint8)
    mask[25:40, 55:70, 40:55] = 1  # left MCA-ish, MNI 2 mm grid
    affine = np.array([[2, 0, 0, -90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(mask, affine), folder / "a_lesion.nii.gz")
    return folder


@pytest.mark.parametrize("contrast", ["t2", "flair", "t1"])
def test_painted_lesion_is_the_truth_in_brain(tmp_path, contrast):
    maps = _toy_map(tmp_path / "map.nii.gz")
    options = LabelMapOptions(lesions=_toy_lesions(tmp_path / "les"), contrast=contrast)
    image, mask, affine, look = draw_label_head(1, maps, options)
    assert look == contrast and image.shape == mask.shape == (64, 64, 64)
    assert 0 <= image.min() and image.max() <= 1
    assert mask.sum() > 20
    inside, outside = image[mask > 0].mean(), image[(mask == 0) & (image > 0.05)].mean()
    if contrast == "t2":
        assert inside > outside  # fluid-bright cavity on T2


def test_dataset_manifest_and_no_lesion(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    _toy_map(maps / "m.nii.gz")
    manifest = make_label_dataset(tmp_path / "out", maps, 2, 0,
                                  LabelMapOptions(lesions=None, contrast="any"))
    rows = manifest.read_text().splitlines()
    assert rows[0] == "image,mask,subject,lesion_ml,contrast" and len(rows) == 3
    assert all(r.split(",")[3] == "0.000" for r in rows[1:])
    assert {r.split(",")[4] for r in rows[1:]} <= set(appearance.CONTRASTS)


def test_skull_stripped_heads_are_zero_outside_the_brain(tmp_path):
    maps = _toy_map(tmp_path / "map.nii.gz")
    whole = draw_label_head(3, maps, LabelMapOptions(lesions=None, contrast="t1"))[0]
    stripped = draw_label_head(3, maps, LabelMapOptions(lesions=None, contrast="t1",
                                                        skull_stripped=1.0))[0]
    # the same head (same seed) without its scalp shell: far fewer bright voxels
    assert (stripped > 0.1).sum() < 0.8 * (whole > 0.1).sum()


def test_synth_command_with_label_maps(tmp_path):
    from click.testing import CliRunner

    from meshseg.cli import main

    maps = tmp_path / "maps"
    maps.mkdir()
    _toy_map(maps / "m.nii.gz")
    lesions = _toy_lesions(tmp_path / "les")
    runner = CliRunner()
    done = runner.invoke(main, ["synth", str(tmp_path / "out"), "-n", "1", "--label-maps",
                                str(maps), "--lesions", str(lesions), "--contrast", "flair"])
    assert done.exit_code == 0, done.output
    row = (tmp_path / "out" / "manifest.csv").read_text().splitlines()[1].split(",")
    assert row[4] == "flair" and float(row[3]) > 0
    missing = runner.invoke(main, ["synth", str(tmp_path / "o2"), "--label-maps", str(maps)])
    assert missing.exit_code == 2 and "--lesions" in missing.output
    mixed = runner.invoke(main, ["synth", str(tmp_path / "o3"), "--label-maps", str(maps),
                                 "--no-lesion", "--conformed-grid"])
    assert mixed.exit_code == 2 and "template generator" in mixed.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
