"""meshseg eval: pairing by subject, metrics per pair, grid checks, CSV."""

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from meshseg.cli import main
from meshseg.errors import InputError
from meshseg.evaluate import match, score, subject_key
from tests.conftest import blob


@pytest.mark.parametrize("name, key", [
    ("sub-M2001_ses-1_acq-spc_T2w_lesion.nii.gz", "sub-M2001_ses-1"),
    ("synth01000_lesion.nii.gz", "synth01000"),
    ("case7_T2w_lesion_mask.nii", "case7"),
])
def test_subject_keys(name, key):
    assert subject_key(Path(name)) == key


def test_eval_folders_csv_and_unmatched(tmp_path, write_nifti):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    shape = (20, 20, 20)
    truth = blob(shape, (10, 10, 10), 4)
    write_nifti(truth, name="truth/sub-01_lesion.nii.gz", dtype=np.uint8)
    write_nifti(truth, name="pred/sub-01_T2w_lesion.nii.gz", dtype=np.uint8)
    shifted = np.roll(truth, 2, axis=0)
    write_nifti(truth, name="truth/sub-02_lesion.nii.gz", dtype=np.uint8)
    write_nifti(shifted, name="pred/sub-02_T2w_lesion.nii.gz", dtype=np.uint8)
    write_nifti(truth, name="pred/sub-03_T2w_lesion.nii.gz", dtype=np.uint8)
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(main, ["eval", str(pred_dir), str(truth_dir), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert "sub-03_T2w_lesion.nii.gz: no matching mask" in result.stderr
    rows = {r["subject"]: r for r in csv.DictReader(out.open())}
    assert float(rows["sub-01"]["dice"]) == 1.0
    overlap = (truth & shifted).sum()
    assert float(rows["sub-02"]["dice"]) == pytest.approx(2 * overlap / (2 * truth.sum()))
    assert {"subject", "dice", "avd", "mcc", "vol_true_ml", "vol_pred_ml"} <= set(rows["sub-01"])


def test_different_grids_need_resample(tmp_path, write_nifti):
    truth = write_nifti(blob((20, 20, 20), (10, 10, 10), 5), name="t.nii.gz", dtype=np.uint8)
    pred = write_nifti(blob((10, 10, 10), (5, 5, 5), 2.5), np.diag([2.0, 2, 2, 1]),
                       name="p.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="p.nii.gz and .*t.nii.gz: masks are on different grids"):
        score(pred, truth)
    assert score(pred, truth, resample=True).dice > 0.8


def test_duplicate_keys_are_refused(tmp_path):
    a, b = tmp_path / "x_lesion.nii.gz", tmp_path / "x_mask.nii.gz"
    with pytest.raises(InputError, match="same subject key"):
        match([a, b], [a])
