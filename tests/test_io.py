"""Reading scans, one-line errors for bad files, and atomic writes."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meshseg import io
from meshseg.errors import InputError, OutputError
from meshseg.io import atomic_path, bids_entities, load_volume, save_like, write_csv
from meshseg.pipeline.validate import check_volume
from tests.conftest import grid_affine


@pytest.mark.parametrize("name, expected", [
    ("sub-01_ses-2_acq-spc3p2_run-7_T2w.nii.gz", {"sub": "01", "ses": "2", "acq": "spc3p2",
                                                  "run": "7"}),
    ("sub-M2001_T2w.NII.GZ", {"sub": "M2001"}),  # suffixes in any case
    ("sub-01_desc-lesion-mask.nii", {"sub": "01", "desc": "lesion-mask"}),
    ("scan.nii.gz", {}),
])
def test_bids_entities_of_a_file_name(name, expected):
    assert bids_entities(Path("ds") / name) == expected


def test_load_applies_scaling_and_keeps_affine(write_nifti):
    affine = grid_affine(zooms=(0.9, 0.9, 3.0), angles_deg=(10, 0, 5), origin=(5, -20, 30))
    data = np.arange(10 * 12 * 8, dtype=np.int16).reshape(10, 12, 8)
    path = write_nifti(data, affine, slope=2.0, inter=1.0)
    vol = load_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, data * 2.0 + 1.0)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)


def test_4d_with_one_volume_becomes_3d(write_nifti):
    vol = load_volume(write_nifti(np.ones((9, 9, 9, 1), np.float32)))
    assert vol.data.shape == (9, 9, 9)


@pytest.mark.parametrize("shape", [(9, 9), (9, 9, 9, 2)])
def test_not_3d_is_refused(write_nifti, shape):
    path = write_nifti(np.ones(shape, np.float32))
    with pytest.raises(InputError, match=f"{path.name}.*3-D"):
        load_volume(path)


def test_missing_non_nifti_and_corrupted(tmp_path, write_nifti):
    with pytest.raises(InputError, match="no such file"):
        load_volume(tmp_path / "absent.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI file"):
        load_volume(text)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(InputError, match="fake.nii.gz"):
        load_volume(fake)
    good = write_nifti(np.random.default_rng(0).random((30, 30, 30), dtype=np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated.nii.gz: corrupted or truncated"):
        load_volume(truncated)


@pytest.mark.parametrize("data, zooms, message", [
    (np.full((20, 20, 20), np.nan, np.float32), 1.0, "NaN or Inf"),
    (np.zeros((20, 20, 20), np.float32), 1.0, "all zero"),
    (np.ones((20, 20, 3), np.float32), 1.0, "implausible dimensions"),
    (np.ones((20, 20, 20), np.float32) * np.arange(20), 50.0, "implausible voxel size"),
])
def test_validation_refuses_unusable_scans(write_nifti, data, zooms, message):
    path = write_nifti(data, np.diag([zooms, zooms, zooms, 1.0]))
    with pytest.raises(InputError, match=message):
        check_volume(load_volume(path))


def test_save_like_keeps_grid_and_codes(write_nifti, tmp_path):
    affine = grid_affine(zooms=(1.1, 0.9, 2.5), angles_deg=(0, 12, 0), perm=(1, 0, 2))
    src = write_nifti(np.ones((8, 9, 10, 1), np.int16), affine, slope=3.0)
    vol = load_volume(src)
    out = tmp_path / "mask.nii.gz"
    save_like(np.ones((8, 9, 10)), vol, out, np.uint8)
    img = nib.load(out)
    assert img.shape == (8, 9, 10) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    assert np.asarray(img.dataobj).max() == 1  # no scaling carried over from the input


def test_failed_write_leaves_nothing(write_nifti, tmp_path, monkeypatch):
    vol = load_volume(write_nifti(np.ones((8, 8, 8), np.float32)))
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"previous result")

    def broken_save(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OutputError, match="mask.nii.gz: cannot write"):
        save_like(np.ones((8, 8, 8)), vol, out, np.uint8)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "scan.nii.gz"]


def test_any_write_in_an_atomic_path_that_fails_is_one_line(tmp_path):
    """Callers (cv's summary.md, cohort's report.json, ...) write inside atomic_path without
    catching OSError themselves: a full disk must still be one line, the old file whole."""
    out = tmp_path / "summary.md"
    out.write_text("previous")
    with pytest.raises(OutputError, match=r"summary.md: cannot write \(No space left on "
                                          r"device\)"):
        with atomic_path(out, suffix=".part.md") as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_csv_rows_by_column_and_atomic(tmp_path):
    out = tmp_path / "t.csv"
    assert write_csv(out, ["a", "b"], [{"a": 1, "b": "x,y"}, {"a": 2}]) == out
    assert out.read_bytes() == b'a,b\r\n1,"x,y"\r\n2,\r\n'
    with pytest.raises(ValueError, match="not in fieldnames"):  # a misspelt column is a bug
        write_csv(out, ["a"], [{"a": 3}, {"c": 4}])
    assert out.read_text(encoding="utf-8").startswith("a,b")  # the old file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_unwritable_folder(write_nifti, tmp_path):
    vol = load_volume(write_nifti(np.ones((8, 8, 8), np.float32)))
    with pytest.raises(OutputError, match="cannot write here"):
        save_like(np.ones((8, 8, 8)), vol, tmp_path / "missing" / "m.nii.gz", np.uint8)


def test_outputs_get_ordinary_permissions(write_nifti, tmp_path):
    import os

    vol = load_volume(write_nifti(np.ones((8, 8, 8), np.float32)))
    out = tmp_path / "mask.nii.gz"
    save_like(np.ones((8, 8, 8)), vol, out, np.uint8)
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_csv_cells_never_run_as_formulas(tmp_path):
    """Issue 20 item 17: a cell such as `=1+1.nii.gz` is written as text; numbers stay."""
    path = write_csv(tmp_path / "t.csv", ["input", "lesion_ml", "note"],
                     [{"input": "=1+1.nii.gz", "lesion_ml": -1.5, "note": "@SUM(A1)"},
                      {"input": "a.nii.gz", "lesion_ml": 2, "note": "+cmd"}])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1:] == ["'=1+1.nii.gz,-1.5,'@SUM(A1)", "a.nii.gz,2,'+cmd"]


def test_kept_arrays_are_made_once_remade_when_damaged_and_never_in_the_way(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("MESHSEG_HOME", str(tmp_path / "home"))
    made = []

    def make():
        made.append(1)
        return np.arange(6, dtype=np.int16).reshape(2, 3), np.ones(4, bool)

    first = io.kept_arrays("maps", "k1", make)
    again = io.kept_arrays("maps", "k1", make)
    assert len(made) == 1 and [a.dtype for a in again] == [np.int16, bool]
    np.testing.assert_array_equal(again[0], first[0])
    stored = tmp_path / "home" / "arrays" / "maps-k1.npz"
    stored.write_bytes(b"half a file")  # damaged: made again, and rewritten
    np.testing.assert_array_equal(io.kept_arrays("maps", "k1", make)[1], first[1])
    assert len(made) == 2 and io.kept_arrays("maps", "k1", make) and len(made) == 2
    io.kept_arrays("maps", "k2", make)  # a new key replaces the old file
    assert sorted(p.name for p in stored.parent.iterdir()) == ["maps-k2.npz"]
    monkeypatch.setenv("MESHSEG_HOME", str(tmp_path / "a file"))
    (tmp_path / "a file").write_text("not a folder")  # nothing can be kept: still the arrays
    assert io.kept_arrays("maps", "k3", make)[0].shape == (2, 3)
