"""The predict command end to end: outputs, cohorts, resume, reports, errors, exit codes."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from meshseg.cli import main
from tests.conftest import grid_affine, head


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_predict_writes_native_grid_mask(write_nifti, tmp_path, threshold_model):
    affine = grid_affine(zooms=(1.1, 0.9, 2.5), angles_deg=(8, -12, 5), perm=(0, 2, 1),
                         axcodes_flip=(-1, 1, 1), origin=(10, -5, 20))
    image, ball = head()
    src = write_nifti(image, affine, dtype=np.int16)
    out = tmp_path / "out" / "mask.nii.gz"
    out.parent.mkdir()
    result = run("predict", src, "-o", out, "-m", threshold_model, "--prob", "--device", "cpu")
    assert result.exit_code == 0, result.output
    img = nib.load(out)
    assert img.shape == image.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
    mask = np.asarray(img.dataobj) > 0
    dice = 2 * (mask & ball).sum() / (mask.sum() + ball.sum())
    assert dice > 0.85, dice
    prob = nib.load(out.parent / "mask_prob.nii.gz")  # named after the mask, as mask_qc.png
    assert prob.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(prob.dataobj) > 0.5, mask)
    record = json.loads((out.parent / "mask.json").read_text())
    assert record["threads"] == torch.get_num_threads()
    stages = record["stage_seconds"]  # where the time went, QC included
    assert set(stages) == {"load", "conform", "layers", "unconform", "qc", "write"}
    assert 0 < sum(stages.values()) <= record["seconds"] + 0.0005 * (len(stages) + 1)  # rounded


def test_bf16_on_a_cpu_without_bf16_is_one_line(write_nifti, threshold_model, monkeypatch):
    from meshseg.pipeline import infer

    monkeypatch.setattr(infer, "cpu_has_bf16", lambda: False)  # as on the CI machine
    result = run("predict", write_nifti(head()[0]), "-m", threshold_model, "--device", "cpu",
                 "--precision", "bf16")
    assert result.exit_code == 2 and "no bf16 instructions" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_default_backend_is_torch_with_or_without_openvino(threshold_model):
    """OpenVINO is chosen, never defaulted to (its whole-volume run needs over 1 GB)."""
    from meshseg.models import catalog
    from meshseg.pipeline import predict

    model = catalog.load(threshold_model)
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert predict.default_backend(model, device) == "torch"


def test_threads_limits_torch_and_is_recorded(write_nifti, tmp_path, threshold_model,
                                              restore_threads):
    """--threads N (shared nodes, SLURM): torch and SimpleITK use N threads; the record says N."""
    src = write_nifti(head()[0])
    out = tmp_path / "mask.nii.gz"
    result = run("predict", src, "-o", out, "-m", threshold_model, "--device", "cpu",
                 "--no-qc", "--threads", "1")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "mask.json").read_text())
    assert record["threads"] == 1 and "qc" not in record["stage_seconds"]
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    zero = run("predict", src, "-o", out, "-m", threshold_model, "--threads", "0")
    assert zero.exit_code == 2 and "--threads" in zero.output


def test_cohort_report_resume_and_bad_inputs(write_nifti, tmp_path, threshold_model):
    good_a = write_nifti(head()[0], name="a.nii.gz")
    write_nifti(head(seed=1)[0], grid_affine(zooms=(2, 2, 2)), name="b.nii")
    bad = {
        "nan.nii.gz": "NaN or Inf",
        "zero.nii.gz": "all zero",
        "flat.nii.gz": "3-D",
        "multi.nii.gz": "3-D",
        "huge_voxels.nii.gz": "voxel size",
        "corrupt.nii.gz": "corrupted or truncated",
        "text.nii.gz": "not a readable NIfTI",
    }
    image = head()[0]
    write_nifti(np.full(image.shape, np.nan, np.float32), name="nan.nii.gz")
    write_nifti(np.zeros(image.shape, np.float32), name="zero.nii.gz")
    write_nifti(image[:, :, 0], name="flat.nii.gz")
    write_nifti(np.stack([image, image], -1), name="multi.nii.gz")
    write_nifti(image, np.diag([40.0, 40, 40, 1]), name="huge_voxels.nii.gz")
    whole = good_a.read_bytes()
    (tmp_path / "corrupt.nii.gz").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello"))
    missing = tmp_path / "missing.nii.gz"
    report = tmp_path / "report.csv"

    result = run("predict", tmp_path, missing, "-m", threshold_model, "--report", report, "-q")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line]
    assert "Traceback" not in result.output
    for name, problem in bad.items():
        hits = [line for line in errors if name in line]
        assert len(hits) == 1 and problem in hits[0], (name, errors)
    assert any("missing.nii.gz: no such file" in line for line in errors)
    mask_a = tmp_path / "a_lesion.nii.gz"
    assert mask_a.exists() and (tmp_path / "b_lesion.nii.gz").exists()

    import csv
    rows = {os.path.basename(r["input"]): r for r in csv.DictReader(report.open())}
    assert rows["a.nii.gz"]["status"] == "ok" and float(rows["a.nii.gz"]["lesion_ml"]) > 0
    assert rows["a.nii.gz"]["components"] == "1"
    assert rows["nan.nii.gz"]["status"] == "failed" and "NaN" in rows["nan.nii.gz"]["error"]
    assert len(rows) == 2 + len(bad) + 1  # outputs of an earlier run are never inputs

    before = mask_a.stat().st_mtime_ns
    again = run("predict", good_a, "-m", threshold_model, "--report", tmp_path / "r.json")
    assert again.exit_code == 0 and "skipped" in again.output
    assert mask_a.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "r.json").read_text())[0]["status"] == "skipped"
    redo = run("predict", good_a, "-m", threshold_model, "--overwrite", "-q")
    assert redo.exit_code == 0 and mask_a.stat().st_mtime_ns != before


def test_output_folder_and_unwritable_output(write_nifti, tmp_path, threshold_model):
    src = write_nifti(head()[0])
    result = run("predict", src, "-o", tmp_path / "results", "-m", threshold_model, "-q",
                 "--report", tmp_path / "results" / "report.csv")  # folder made by -o
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "scan_lesion.nii.gz").exists()
    assert (tmp_path / "results" / "report.csv").exists()
    made = run("predict", src, "-o", tmp_path / "new" / "m.nii.gz", "-m", threshold_model)
    assert made.exit_code == 0 and (tmp_path / "new" / "m.nii.gz").exists()  # folder made
    result = run("predict", src, "-o", src / "m.nii.gz", "-m", threshold_model)  # under a file
    assert result.exit_code == 2 and "cannot create folder" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-o", "x.nii.gz", "{a}", "{b}"], "2 inputs"),
    (["{empty}"], "no NIfTI files"),
    (["{a}", "--device", "cuda"], "CUDA is not available"),
    (["{a}", "--report", "r.txt"], ".json, .csv or .html"),
    (["{a}", "--mni", "--no-qc"], "needs --qc"),
    (["{a}", "-m", "no-such-model"], "no such model"),
])
def test_usage_errors(write_nifti, tmp_path, threshold_model, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    names = {"a": write_nifti(head()[0], name="a.nii.gz"),
             "b": write_nifti(head()[0], name="b.nii.gz"), "empty": tmp_path / "empty"}
    names["empty"].mkdir()
    argv = [a.format(**names) for a in args]
    if "-m" not in argv:
        argv += ["-m", threshold_model]
    result = run("predict", *argv)
    assert result.exit_code == (1 if "no such model" in message else 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_models_list_json():
    result = run("models", "list", "--json")
    assert result.exit_code == 0
    names = [row["name"] for row in json.loads(result.output)]
    assert "brainchop-t2-lesion" in names


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["train", "--help"]])
def test_help_does_not_import_torch(args):
    """Help is instant: torch (seconds to import) loads only when a command runs. Run in a fresh
    interpreter, as this one has torch already."""
    code = ("import sys; from meshseg.cli import main\n"
            f"main({args!r}, standalone_mode=False)\n"
            "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout


def test_the_bundled_default_finds_the_example_lesion(tmp_path):
    """README's main job, end to end: `meshseg example` then `meshseg predict` with no -m.

    The default model's mask must lie on the example's grid and overlap its true lesion
    (the ARC-trained default scores DICE 0.66 here): a wrong orientation, a wrong
    intensity scale or a dead checkpoint would all score near 0."""
    from meshseg.metrics import dice

    scan, truth = tmp_path / "example_t2.nii.gz", tmp_path / "truth.nii.gz"
    runner = CliRunner()
    made = runner.invoke(main, ["example", str(scan), "--mask", str(truth)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(main, ["predict", str(scan), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    mask, true = nib.load(tmp_path / "example_t2_lesion.nii.gz"), nib.load(truth)
    assert np.allclose(mask.affine, true.affine) and mask.shape == true.shape
    assert dice(np.asarray(mask.dataobj) > 0, np.asarray(true.dataobj) > 0) > 0.35


def test_example_never_replaces_an_existing_file(tmp_path):
    """A user's scan under the example's name (or --mask's) is kept unless --overwrite."""
    victim, truth = tmp_path / "victim.nii.gz", tmp_path / "truth.nii.gz"
    victim.write_bytes(b"a real scan")
    truth.write_bytes(b"a manual mask")
    runner = CliRunner()
    refused = runner.invoke(main, ["example", str(victim)])
    assert refused.exit_code == 2 and "victim.nii.gz: exists" in refused.output
    fresh = tmp_path / "new.nii.gz"
    refused = runner.invoke(main, ["example", str(fresh), "--mask", str(truth)])
    assert refused.exit_code == 2 and not fresh.exists()
    assert victim.read_bytes() == b"a real scan" and truth.read_bytes() == b"a manual mask"
    made = runner.invoke(main, ["example", str(victim), "--overwrite"])
    assert made.exit_code == 0 and victim.read_bytes() != b"a real scan"


def test_stage_clock_counts_a_stage_that_reports_only_its_end(monkeypatch):
    """A runner that reports once, when done (OpenVINO), still gets its time: each stage
    starts where the previous report left off."""
    from meshseg.pipeline import predict

    now = iter([0.0, 1.0, 3.0, 10.0])
    monkeypatch.setattr(predict.time, "perf_counter", lambda: next(now))
    seen = []
    clock = predict.StageClock(lambda stage, fraction: seen.append((stage, fraction)))
    clock("conform", 0.0)
    clock("conform", 1.0)
    clock("layers", 1.0)
    assert clock.seconds == {"conform": 3.0, "layers": 7.0}  # from the clock's start
    assert seen == [("conform", 0.0), ("conform", 1.0), ("layers", 1.0)]
