"""meshseg eval: pairing by subject, metrics per pair, grid checks, CSV, bins, figure."""

import csv
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from meshseg.benchmark.evaluate import (
    VOLUME_BINS,
    Score,
    by_volume_bin,
    match,
    score,
    subject_key,
    summary,
    summary_table,
    write_scores,
)
from meshseg.cli import main
from meshseg.errors import InputError
from meshseg.metrics import hd95
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


def test_lesion_figures_hd95_and_bins_in_csv(tmp_path, write_nifti):
    """Two lesions on a 2 mm grid: one found and shifted by one voxel, one missed."""
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # 27 voxels of 8 mm^3
    truth[12:14, 12:14, 12:14] = 1
    pred = np.zeros_like(truth)
    pred[3:6, 2:5, 2:5] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t = write_nifti(truth, affine, name="sub-01_lesion.nii.gz")
    p = write_nifti(pred, affine, name="sub-01_pred.nii.gz")
    s = score(p, t)
    assert (s.lesions_true, s.lesions_detected, s.lesions_missed,
            s.lesions_false_positive) == (2, 1, 1, 0)
    assert s.vol_true_ml == pytest.approx(35 * 8 / 1000)
    assert s.hd95_mm == pytest.approx(hd95(pred > 0, truth > 0, (2.0, 2.0, 2.0)))
    assert s.volume_bin == VOLUME_BINS[0]
    out = tmp_path / "scores.csv"
    write_scores([s], out)
    header = out.read_text().splitlines()[0].split(",")
    assert header[:7] == ["subject", "dice", "avd", "mcc", "vol_true_ml", "vol_pred_ml",
                          "hd95_mm"]


@pytest.mark.parametrize("ml, label", [(0.0, "Q1 < 33.6 mL"), (33.618, "Q1 < 33.6 mL"),
                                       (33.619, "Q2 33.6-67.9 mL"), (100, "Q3 67.9-128.3 mL"),
                                       (128.314, "Q4 >= 128.3 mL"), (900, "Q4 >= 128.3 mL")])
def test_volume_bins_are_the_papers_quartiles(ml, label):
    s = Score("x", 1, 0, 1, ml, ml, 0, 1, 1, 0, 0, "p", "t")
    assert s.volume_bin == label
    assert by_volume_bin([s])[label] == [s]
    assert list(by_volume_bin([s])) == list(VOLUME_BINS)


def test_summary_leaves_out_infinite_and_nan_values():
    rows = [Score("a", 0.0, math.inf, 0.0, 0.0, 1.0, math.nan, 0, 0, 0, 1, "p", "t"),
            Score("b", 0.5, 0.5, 0.4, 2.0, 1.0, 4.0, 1, 1, 0, 0, "p", "t"),
            Score("c", 1.0, 0.0, 1.0, 2.0, 2.0, 0.0, 1, 1, 0, 0, "p", "t")]
    stats = summary(rows)
    assert stats["dice"] == pytest.approx({"mean": 0.5, "std": 0.5, "median": 0.5, "q1": 0.25,
                                           "q3": 0.75, "n": 3})
    assert stats["avd"]["n"] == 2 and stats["avd"]["mean"] == pytest.approx(0.25)
    assert stats["hd95_mm"]["n"] == 2 and stats["hd95_mm"]["median"] == pytest.approx(2.0)
    assert summary([]) == {}


def test_eval_prints_bins_and_writes_a_figure(tmp_path, write_nifti):
    truth = blob((20, 20, 20), (10, 10, 10), 4)
    write_nifti(truth, name="t.nii.gz", dtype=np.uint8)
    write_nifti(np.roll(truth, 1, axis=0), name="p.nii.gz", dtype=np.uint8)
    args = ["eval", str(tmp_path / "p.nii.gz"), str(tmp_path / "t.nii.gz"),
            "--figure", str(tmp_path / "dice.png")]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"\n Q4 +0 +- ", result.output) and "Q4 >= 128.3 mL" in result.output
    assert (tmp_path / "dice.png").read_bytes().startswith(b"\x89PNG")


def test_eval_tables_fit_80_columns(tmp_path, write_nifti):
    """No cell cut with an ellipsis, and each summary cell keeps mean (std) on one line."""
    truth = blob((20, 20, 20), (10, 10, 10), 4)
    names = ["sub-M2001_ses-1253", "sub-M2002_ses-3019"]
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    for name, shift in zip(names, (1, 3)):
        write_nifti(truth, name=f"t/{name}_lesion.nii.gz", dtype=np.uint8)
        write_nifti(np.roll(truth, shift, axis=0), name=f"p/{name}_lesion.nii.gz",
                    dtype=np.uint8)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["eval", str(tmp_path / "p"),
                                                             str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and all(name in result.output for name in names)
    assert max(map(len, result.output.splitlines())) <= 80
    assert re.search(r"\n all +2 +0\.\d{3} \(0\.\d{3}\) +", result.output), result.output

    wide = [Score(f"sub-{i}", 0.5, 12.3456 * i, -0.25, 1.0, 1.0, 100 * i, 2, 1, 1, 12, "", "")
            for i in range(3)]
    wide[0].avd = math.inf
    console = Console(width=80, record=True)
    console.print(summary_table(wide))
    text = console.export_text()
    assert "…" not in text and "n=2" in text
    assert re.search(r"18\.518 \(8\.730\) +-0\.250 \(0\.000\) +100\.0 \(100\.0\)", text)


def _eval(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_folders_never_pair_different_subjects_but_two_files_do(tmp_path, write_nifti):
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    mask = blob((20, 20, 20), (10, 10, 10), 4)
    a = write_nifti(mask, name="p/a_lesion.nii.gz", dtype=np.uint8)
    b = write_nifti(mask, name="t/b_lesion.nii.gz", dtype=np.uint8)
    result = _eval(tmp_path / "p", tmp_path / "t")
    assert result.exit_code == 2, result.output
    assert "no pairs of masks" in result.stderr and "b_lesion.nii.gz: no matching" in result.stderr
    result = _eval(a, b)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value, dice", [(0.3, 0.0), (0.7, 1.0), (3.0, 1.0), (-1.0, 0.0)])
def test_non_binary_masks_are_reported_and_cut_at_half(tmp_path, write_nifti, value, dice):
    truth_mask = blob((20, 20, 20), (10, 10, 10), 4)
    truth = write_nifti(truth_mask, name="t.nii.gz", dtype=np.uint8)
    pred = write_nifti(truth_mask * np.float32(value), name="p.nii.gz", dtype=np.float32)
    out = tmp_path / "s.csv"
    result = _eval(pred, truth, "--csv", out)
    assert result.exit_code == 0, result.output
    assert re.search(r"p\.nii\.gz: mask holds \d+ voxels other than 0 and 1 .*lesion taken as "
                     r"> 0\.5", result.stderr), result.stderr
    assert float(next(csv.DictReader(out.open()))["dice"]) == dice


def test_unreadable_pairs_are_listed_and_the_rest_scored(tmp_path, write_nifti):
    for side in ("p", "t"):
        (tmp_path / side).mkdir()
    mask = blob((20, 20, 20), (10, 10, 10), 4)
    for subject in ("sub-01", "sub-02", "sub-03", "sub-04"):
        write_nifti(mask, name=f"t/{subject}_lesion.nii.gz", dtype=np.uint8)
        write_nifti(mask, name=f"p/{subject}_lesion.nii.gz", dtype=np.uint8)
    broken = tmp_path / "p" / "sub-02_lesion.nii.gz"
    data = bytearray(broken.read_bytes())
    data[-8] ^= 0xFF  # the gzip CRC
    broken.write_bytes(bytes(data))
    nan_mask = mask.astype(np.float32)
    nan_mask[0, 0, 0] = np.nan
    write_nifti(nan_mask, name="p/sub-03_lesion.nii.gz")
    sform_nan = tmp_path / "p" / "sub-04_lesion.nii.gz"
    img = nib.load(sform_nan)
    img.header["srow_x"] = [np.nan] * 4
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, img.header), sform_nan)
    out = tmp_path / "s.csv"
    result = _eval(tmp_path / "p", tmp_path / "t", "--csv", out, "--resample")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshseg: error")]
    assert len(errors) == 4, result.stderr
    assert "sub-02_lesion.nii.gz: corrupted or truncated file (CRC check failed" in errors[0]
    assert "sub-03_lesion.nii.gz: 1 voxels are NaN or Inf" in errors[1]
    assert "sub-04_lesion.nii.gz: affine contains NaN or Inf" in errors[2]
    assert errors[3].endswith("3 of 4 pairs could not be scored (listed above)")
    assert [r["subject"] for r in csv.DictReader(out.open())] == ["sub-01"]


def test_mni_masks_and_probability_maps_are_not_subjects(tmp_path, write_nifti):
    """Issue 20 item 5: `meshseg eval out/ out/` over a predict -o out/ --mni --prob folder
    scores each scan's mask once, without the MNI masks or probability maps."""
    truth = blob((20, 20, 20), (10, 10, 10), 4)
    (tmp_path / "out").mkdir()
    for name in ("a", "b"):
        for end in ("_lesion", "_lesion_mni", "_lesion_prob"):
            write_nifti(truth, name=f"out/{name}{end}.nii.gz", dtype=np.uint8)
        write_nifti(truth, name=f"out/sub-{name}_space-orig_desc-lesion_mask_mni.nii.gz",
                    dtype=np.uint8)
    write_nifti(truth, name="out/sub-c_space-orig_desc-lesion_mask.nii.gz", dtype=np.uint8)
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "out"), str(tmp_path / "out"),
                                       "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert "no matching mask" not in result.stderr
    assert sorted(r["subject"] for r in csv.DictReader(out.open())) == ["a", "b", "sub-c"]


def test_a_prediction_outside_the_truths_grid_is_warned(tmp_path, write_nifti):
    """Issue 20 item 17: with --resample, a lesion that lands wholly outside the truth's grid
    is named in a warning, not silently scored as an empty prediction."""
    truth = write_nifti(blob((20, 20, 20), (10, 10, 10), 5), name="t.nii.gz", dtype=np.uint8)
    far = np.eye(4)
    far[:3, 3] = 500.0  # half a metre away
    pred = write_nifti(blob((20, 20, 20), (10, 10, 10), 5), far, name="p.nii.gz",
                       dtype=np.uint8)
    warnings = []
    assert score(pred, truth, resample=True, warn=warnings.append).dice == 0.0
    assert len(warnings) == 1 and "entirely outside" in warnings[0]
    warnings.clear()
    score(write_nifti(np.zeros((20, 20, 20), np.uint8), far, name="e.nii.gz", dtype=np.uint8),
          truth, resample=True, warn=warnings.append)
    assert warnings == []  # an empty prediction is simply empty
