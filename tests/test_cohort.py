"""Cohorts as labs keep them: DataLad/BIDS datasets, per-output records, resume, shards,
and the checks that keep a run from touching a user's files."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from meshseg.cli import main
from meshseg.io import LEFTOVER_AGE_S, made_by_meshseg
from meshseg.models.weights import load_network, save_checkpoint
from meshseg.pipeline.record import Result, flat_row, read_sidecar, write_report
from tests.conftest import head


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def save(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(head(seed=seed)[0], np.eye(4)), path)
    return path


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def annexed_dataset(root: Path, subjects=("01", "02")) -> Path:
    """A DataLad-style BIDS dataset: each scan is a symlink into .git/annex/objects."""
    for i, sub in enumerate(subjects):
        key = f"MD5E-s{1000 + i}--{i:032x}.nii.gz"
        obj = save(root / ".git" / "annex" / "objects" / f"x{i}" / key / key, seed=i)
        link = root / f"sub-{sub}" / "ses-1" / "anat" / f"sub-{sub}_ses-1_T2w.nii.gz"
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(obj, link.parent))
    (root / "dataset_description.json").write_text('{"Name": "ds", "BIDSVersion": "1.9.0"}')
    return root


def test_datalad_dataset_outputs_are_named_by_subject(tmp_path, threshold_model):
    ds = annexed_dataset(tmp_path / "ds")
    git_before = tree(ds / ".git")
    result = run("predict", ds, "-m", threshold_model, "-q")
    assert result.exit_code == 0, result.output
    for sub in ("01", "02"):
        anat = ds / f"sub-{sub}" / "ses-1" / "anat"
        assert (anat / f"sub-{sub}_ses-1_T2w_lesion.nii.gz").is_file()
        record = read_sidecar(anat / f"sub-{sub}_ses-1_T2w_lesion.json")
        assert record.input == str(anat / f"sub-{sub}_ses-1_T2w.nii.gz")  # the link, as given
    assert tree(ds / ".git") == git_before

    out = tmp_path / "derivatives"
    result = run("predict", ds, "-o", out, "-m", threshold_model, "--prob", "-q")
    assert result.exit_code == 0, result.output
    assert tree(out) == {"dataset_description.json", ".bidsignore"} | {
        f"sub-{s}/ses-1/anat/sub-{s}_ses-1_space-orig_desc-lesion_{kind}"
        for s in ("01", "02")
        for kind in ("mask.nii.gz", "mask.json", "probseg.nii.gz", "probseg.json",
                     "mask_qc.png")}
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "meshseg"
    assert tree(ds / ".git") == git_before

    # eval pairs the derivatives with manual masks of the same subjects by BIDS entities
    truth = tmp_path / "manual"
    truth.mkdir()
    for s in ("01", "02"):
        anat = out / f"sub-{s}" / "ses-1" / "anat"
        mask = nib.load(anat / f"sub-{s}_ses-1_space-orig_desc-lesion_mask.nii.gz")
        nib.save(mask, truth / f"sub-{s}_ses-1_T2w_desc-lesion_mask.nii.gz")
    scored = run("eval", out, truth)
    assert scored.exit_code == 0, scored.output
    assert "sub-01_ses-1" in scored.output and "sub-02_ses-1" in scored.output


def test_output_folder_keeps_subfolders(tmp_path, threshold_model):
    for name in ("s1", "s2"):
        save(tmp_path / "in" / name / "T2.nii.gz")
    result = run("predict", tmp_path / "in", "-o", tmp_path / "out", "-m", threshold_model, "-q")
    assert result.exit_code == 0, result.output
    assert tree(tmp_path / "out") == {f"{s}/T2_lesion{e}" for s in ("s1", "s2")
                                      for e in (".nii.gz", ".json", "_qc.png")}


def test_records_resume_and_another_model(tmp_path, threshold_model):
    scans = [save(tmp_path / f"{n}.nii.gz", seed=i) for i, n in enumerate("ab")]
    first = run("predict", scans[0], "-m", threshold_model, "-q")  # then "killed"
    assert first.exit_code == 0
    record = read_sidecar(tmp_path / "a_lesion.json")
    assert record.status == "ok" and record.lesion_ml > 0 and len(record.model_sha256) == 64
    assert record.threshold == 0.5 and record.meshseg_version and record.torch_version
    assert record.input_sha256 and record.date and record.seconds > 0

    report = tmp_path / "report.csv"
    again = run("predict", tmp_path, "-m", threshold_model, "--report", report)
    assert again.exit_code == 0, again.output
    rows = {Path(r["input"]).name: r for r in csv.DictReader(report.open())}
    assert rows["a.nii.gz"]["status"] == "skipped" and rows["b.nii.gz"]["status"] == "ok"
    assert float(rows["a.nii.gz"]["lesion_ml"]) == pytest.approx(record.lesion_ml)
    assert all(float(r["lesion_ml"]) > 0 and r["components"] == "1" for r in rows.values())

    other = tmp_path / "other.safetensors"  # same network, another checkpoint file
    save_checkpoint(other, load_network(Path(threshold_model)).model, {"note": "copy"})
    redo = run("predict", tmp_path, "-m", other, "-q")
    assert redo.exit_code == 0
    assert read_sidecar(tmp_path / "a_lesion.json").model == str(other)

    changed = run("predict", tmp_path, "-m", other, "--largest", "--report", report)
    assert changed.exit_code == 0 and "2 segmented, 0 skipped" in changed.output  # --largest


def test_unrecorded_or_incomplete_outputs(tmp_path, threshold_model):
    scan = save(tmp_path / "a.nii.gz")
    mine = tmp_path / "a_lesion.nii.gz"
    save(mine, seed=5)  # a user's own mask under meshseg's name
    before = mine.read_bytes()
    for overwrite in ([], ["--overwrite"]):  # issue 20 item 13: --overwrite replaced it
        refused = run("predict", scan, "-m", threshold_model, *overwrite)
        assert refused.exit_code == 1 and "is not meshseg's" in refused.stderr
        assert "move it or choose -o" in refused.stderr
        assert mine.read_bytes() == before and not (tmp_path / "a_lesion.json").exists()
    mine.rename(tmp_path / "a_manual.nii.gz")  # moved as the message says
    assert run("predict", scan, "-m", threshold_model, "-q").exit_code == 0
    assert read_sidecar(tmp_path / "a_lesion.json").status == "ok"

    whole = mine.read_bytes()
    for broken, record in ((b"", True), (whole[:200], True), (b"", False), (whole[:200], False)):
        mine.write_bytes(broken)  # 0 bytes or truncated, with or without its record: redone
        if not record:
            (tmp_path / "a_lesion.json").unlink()
        redo = run("predict", scan, "-m", threshold_model)
        assert redo.exit_code == 0 and "1 segmented" in redo.output, redo.output
        assert np.asarray(nib.load(mine).dataobj).any()


def test_mni_added_to_a_finished_cohort_is_written(tmp_path, threshold_model):
    """Issue 20 item 8: --mni (or the QC picture) asked of a finished input redoes it."""
    scan = save(tmp_path / "a.nii.gz")
    assert run("predict", scan, "-m", threshold_model, "--no-qc", "-q").exit_code == 0
    with_qc = run("predict", scan, "-m", threshold_model, "--mni")
    assert with_qc.exit_code == 0 and "1 segmented" in with_qc.output, with_qc.output
    assert (tmp_path / "a_lesion_mni.nii.gz").is_file() and (tmp_path / "a_lesion_qc.png").is_file()
    again = run("predict", scan, "-m", threshold_model, "--mni")
    assert again.exit_code == 0 and "1 skipped" in again.output, again.output


def test_users_own_qc_picture_and_mni_mask_are_kept(tmp_path, threshold_model):
    """A picture or MNI mask under meshseg's name that meshseg did not write (no signature, no
    record) is never replaced, --overwrite or not; meshseg's own files carry its signature."""
    from PIL import Image

    scan = save(tmp_path / "a.nii.gz")
    picture, mni = tmp_path / "a_lesion_qc.png", tmp_path / "a_lesion_mni.nii.gz"
    Image.new("RGB", (4, 4)).save(picture)
    save(mni, seed=3)
    before = {p: p.read_bytes() for p in (picture, mni)}
    for overwrite in ([], ["--overwrite"]):
        refused = run("predict", scan, "-m", threshold_model, "--mni", *overwrite)
        assert refused.exit_code == 1 and "will not replace this QC picture" in refused.stderr
        assert {p: p.read_bytes() for p in (picture, mni)} == before
        assert not (tmp_path / "a_lesion.nii.gz").exists()
    picture.unlink()
    refused = run("predict", scan, "-m", threshold_model, "--mni", "--overwrite")
    assert refused.exit_code == 1 and "this MNI mask" in refused.stderr
    mni.unlink()
    assert run("predict", scan, "-m", threshold_model, "--mni").exit_code == 0
    assert run("predict", scan, "-m", threshold_model, "--mni", "--overwrite").exit_code == 0
    assert made_by_meshseg(mni) and made_by_meshseg(picture)
    assert made_by_meshseg(tmp_path / "a_lesion.nii.gz")  # not the input's descrip
    (tmp_path / "a_lesion.json").unlink()  # a kill before the record: meshseg's files, redone
    again = run("predict", scan, "-m", threshold_model, "--mni")
    assert again.exit_code == 0 and "1 segmented" in again.output, again.output


@pytest.mark.parametrize("case", ["same", "dot", "prob", "two", "folder", "under_file",
                                  "report_folder", "report_under_file", "json", "git",
                                  "mni", "mni_of_another", "report_is_record",
                                  "report_is_users_json"])
def test_outputs_never_replace_inputs(tmp_path, threshold_model, case):
    """Every refusal happens before inference, exits 2 with one line, and changes nothing."""
    scan = save(tmp_path / "in.nii.gz")
    os.chdir(tmp_path)
    args = {
        "same": [scan, "-o", scan, "--overwrite"],
        "dot": [scan, "-o", "./in.nii.gz", "--overwrite"],
        "prob": [save(tmp_path / "m_prob.nii.gz"), "-o", "m.nii.gz", "--prob"],
        "two": [scan, save(tmp_path / "in_lesion.nii.gz"), "--overwrite"],
        "folder": [scan, "-o", "out.nii.gz"],
        "under_file": [scan, "-o", tmp_path / "in.nii.gz" / "x"],
        "report_folder": [scan, "--report", "r.json"],
        "report_under_file": [scan, "--report", tmp_path / "in.nii.gz" / "r.csv"],
        "json": [scan, "-o", "in2.nii.gz"],
        "git": [save(tmp_path / ".git" / "annex" / "MD5E-s1--0.nii.gz")],  # an annexed file
        "mni": [save(tmp_path / "x_mni.nii.gz"), "-o", "x.nii.gz", "--mni"],
        "mni_of_another": [scan, save(tmp_path / "in_lesion_mni.nii.gz"), "--mni"],
        "report_is_record": [scan, "--report", "in_lesion.json", "--overwrite"],
        "report_is_users_json": [scan, "--report", "in2.json", "--overwrite"],
    }[case]
    (tmp_path / "out.nii.gz").mkdir()
    (tmp_path / "r.json").mkdir()
    (tmp_path / "in2.json").write_text('{"RepetitionTime": 2}')  # a BIDS sidecar
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run("predict", *args, "-m", threshold_model)
    assert result.exit_code == 2, (case, result.output)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output
    assert len(lines) == 1 or "Error: Invalid value" in lines[-1], lines  # Click's own usage
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_leftovers_are_removed_and_never_inputs(tmp_path, threshold_model):
    save(tmp_path / "a.nii.gz")
    old = tmp_path / ".a_lesion.nii.gz.k2j4x9ab.part.nii.gz"
    fresh = tmp_path / ".a_lesion.json.q1w2e3r4.part.json"
    other = tmp_path / ".notes.txt.abcdefgh.part.json"  # not a temporary file of this run's
    for path in (old, fresh, other):
        path.write_bytes(b"half a file")
    past = time.time() - LEFTOVER_AGE_S - 10
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    result = run("predict", tmp_path, "-m", threshold_model, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert not old.exists() and fresh.exists()  # a write in flight (recent) is left alone
    assert other.exists()
    assert [Path(r["input"]).name for r in json.loads((tmp_path / "r.json").read_text())] \
        == ["a.nii.gz"]


def test_shards_cover_the_cohort_once_and_report_gathers(tmp_path, threshold_model):
    names = [f"s{i}" for i in range(7)]
    for i, name in enumerate(names):
        save(tmp_path / "in" / f"{name}.nii.gz", seed=i)
    out = tmp_path / "out"
    made = []
    for k in (1, 2, 3):
        result = run("predict", tmp_path / "in", "-o", out, "--shard", f"{k}/3",
                     "-m", threshold_model)
        assert result.exit_code == 0, result.output
        made += [line.split()[1] for line in result.output.splitlines()
                 if line.startswith("ok ")]
    assert sorted(Path(p).name for p in made) == sorted(f"{n}.nii.gz" for n in names)
    report = run("report", out, "-o", tmp_path / "all.csv")
    assert report.exit_code == 0, report.output
    rows = list(csv.DictReader((tmp_path / "all.csv").open()))
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    assert run("predict", tmp_path / "in", "--shard", "4/3").exit_code == 2
    assert run("report", tmp_path / "in").exit_code == 2  # no records there


def cohort_of(folder: Path, n: int) -> Path:
    """n small scans s0..s{n-1} in `folder`."""
    for i in range(n):
        save(folder / f"s{i}.nii.gz", seed=i)
    return folder


def predict_process(folder: Path, model: str, **popen) -> subprocess.Popen:
    """`meshseg predict FOLDER` as a process of its own (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "meshseg", "predict", str(folder), "-m", model, "-q",
               "--device", "cpu"]
    return subprocess.Popen(command, env=env, **popen)


def test_two_processes_on_one_cohort_never_corrupt_outputs(tmp_path, threshold_model):
    procs = [predict_process(cohort_of(tmp_path, 4), threshold_model, stderr=subprocess.PIPE)
             for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    for i in range(4):
        assert np.asarray(nib.load(tmp_path / f"s{i}_lesion.nii.gz").dataobj).any()
        assert read_sidecar(tmp_path / f"s{i}_lesion.json").status == "ok"
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_a_killed_cohort_resumes_with_every_volume_in_the_report(tmp_path, threshold_model):
    proc = predict_process(cohort_of(tmp_path, 6), threshold_model)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*_lesion.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report = tmp_path / "report.json"
    again = run("predict", tmp_path, "-m", threshold_model, "--report", report, "-q")
    assert again.exit_code == 0, again.output
    rows = json.loads(report.read_text())
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"ok", "skipped"}
    assert all(r["lesion_ml"] > 0 and r["components"] == 1 for r in rows)


def test_csv_rule_for_nested_fields(tmp_path):
    """Dicts become dotted columns, lists one column of JSON text; JSON keeps them nested."""
    record = Result(input="a.nii.gz", output="a_lesion.nii.gz", status="ok", model="m",
                    device="cpu")
    record.extra = None  # not a field: never rendered
    row = flat_row(record)
    assert list(row)[:3] == ["input", "output", "status"] and "extra" not in row

    from dataclasses import dataclass, field

    @dataclass
    class WithQc(Result):
        flags: list = field(default_factory=list)
        location: dict = field(default_factory=dict)

    qc = WithQc(input="a", output="b", status="ok", model="m", device="cpu",
                flags=[{"name": "edge", "value": 1.0, "threshold": 0.0, "message": "x"},
                       {"name": "not_t2", "value": 0.3, "threshold": 0.75, "message": "y"}],
                location={"hemisphere": "left", "centroid": {"x": 1.0, "y": 2.0}})
    row = flat_row(qc)
    assert row["location.hemisphere"] == "left" and row["location.centroid.y"] == 2.0
    assert json.loads(row["flags"])[0]["name"] == "edge"
    assert row["flag_names"] == "edge not_t2"  # issue 20 item 10: readable without JSON
    assert list(row).index("flag_names") == list(row).index("flags") + 1
    write_report([qc], tmp_path / "r.csv")
    assert "location.centroid.x" in (tmp_path / "r.csv").read_text().splitlines()[0]
    write_report([qc], tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())[0]["location"]["centroid"]["x"] == 1.0


def test_reports_carry_the_per_lesion_table_and_the_terminal_its_flags(tmp_path):
    """A .csv/.json report gets <name>_lesions.csv (one row per lesion, largest first);
    `meshseg report`'s table shows side and flags."""
    from meshseg.pipeline.record import LESION_COLUMNS, write_sidecar

    territory = {"abbreviation": "MCAFL", "name": "x", "lesion_pct": 80.0,
                 "territory_pct": 3.0}
    lesions = [{"ml": 3.5, "side": "left", "centroid_mni": [-30.0, 10.0, 5.5],
                "territories": [territory]},
               {"ml": 0.25, "side": "right", "centroid_mni": [20.0, -4.0, 1.0],
                "territories": []}]
    record = Result(input="a.nii.gz", output=str(tmp_path / "a_lesion.nii.gz"), status="ok",
                    model="m", device="cpu", lesion_ml=3.75, components=2,
                    flags=[{"name": "not_t2", "value": 0.3, "threshold": 0.75, "message": "x"}],
                    location={"side": "bilateral", "lesions": lesions})
    empty = Result(input="b.nii.gz", output="b", status="ok", model="m", device="cpu")
    for name in ("r.csv", "r.json"):
        write_report([record, empty], tmp_path / name)
        rows = list(csv.DictReader((tmp_path / "r_lesions.csv").open()))
        assert tuple(rows[0]) == LESION_COLUMNS and len(rows) == 2
        assert rows[0]["territory"] == "MCAFL" and rows[0]["centroid_z_mni"] == "5.5"
        assert [r["lesion"] for r in rows] == ["1", "2"] and rows[1]["territory"] == ""
    assert sum(float(r["ml"]) for r in rows) == record.lesion_ml
    write_sidecar(record, tmp_path / "a_lesion.json")
    table = run("report", tmp_path)
    assert table.exit_code == 0, table.output
    assert "side" in table.output and "flags" in table.output
    assert "bilateral" in table.output and "not_t2" in table.output


def test_unreadable_inputs_leave_no_record_and_report_lists_real_inputs(tmp_path,
                                                                       threshold_model):
    """Issue 20 item 4: a non-NIfTI, missing or damaged input fails without a file beside it
    (only a --report asked for lists it), and `meshseg report` skips older versions' strays."""
    scans = tmp_path / "scans"
    save(scans / "a.nii.gz")
    (scans / "README.md").write_text("notes")
    (scans / "bad.nii.gz").write_bytes(b"not a scan")
    before = tree(scans)
    result = run("predict", scans / "README.md", scans / "missing.nii.gz", scans / "bad.nii.gz",
                 "-m", threshold_model, "--no-qc", "-q")
    assert result.exit_code == 1 and result.stderr.count("meshseg: error:") == 3
    assert tree(scans) == before
    assert run("predict", scans, "-m", threshold_model, "--no-qc", "-q").exit_code == 1
    stray = Result(input=str(scans / "README.md"), output=str(scans / "README.md_lesion.nii.gz"),
                   status="failed", model="m", device="cpu", input_sha256="0" * 64)
    write_report([stray], tmp_path / "unused.json")  # older versions wrote such records:
    (scans / "README.md_lesion.json").write_text(json.dumps(json.loads(
        (tmp_path / "unused.json").read_text())[0]))
    listed = run("report", scans, "-o", tmp_path / "r.json")
    assert listed.exit_code == 0, listed.output
    names = [Path(r["input"]).name for r in json.loads((tmp_path / "r.json").read_text())]
    assert names == ["a.nii.gz"]


def annex(root: Path, folder: Path) -> dict[Path, bytes]:
    """What `datalad save` does to the files below `folder`: each moves into
    root/.git/annex/objects (read-only) and a relative symlink takes its place; returns the
    annexed objects' bytes."""
    objects = {}
    for i, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        key = f"MD5E-s{path.stat().st_size}--{i:032x}{''.join(path.suffixes)}"
        obj = root / ".git" / "annex" / "objects" / f"y{i}" / key / key
        obj.parent.mkdir(parents=True)
        path.rename(obj)
        obj.chmod(0o444)
        path.symlink_to(os.path.relpath(obj, path.parent))
        objects[obj] = obj.read_bytes()
    return objects


def test_datalad_saved_derivatives_resume_and_overwrite(tmp_path, threshold_model):
    """Issue 20 item 2: rerunning into saved (annexed) derivatives skips them, --overwrite
    replaces the links (never the annexed objects); an unfetched input says `datalad get`;
    no dataset_description.json when nothing succeeds."""
    ds = annexed_dataset(tmp_path / "ds")
    out = ds / "derivatives" / "meshseg"
    args = ("predict", ds, "-o", out, "-m", threshold_model, "--no-qc", "--prob")
    assert run(*args, "-q").exit_code == 0
    objects = annex(ds, out)
    again = run(*args)
    assert again.exit_code == 0 and "0 segmented, 2 skipped" in again.output, again.output
    redo = run(*args, "--overwrite")
    assert redo.exit_code == 0 and "2 segmented" in redo.output, redo.output
    masks = list(out.rglob("*_mask.nii.gz"))
    assert len(masks) == 2 and not any(m.is_symlink() for m in masks)
    assert (out / "dataset_description.json").is_symlink()  # unchanged: still saved
    assert {obj: obj.read_bytes() for obj in objects} == objects

    empty = tmp_path / "empty"
    missing = empty / "sub-03" / "anat" / "sub-03_T2w.nii.gz"
    missing.parent.mkdir(parents=True)
    missing.symlink_to("../../.git/annex/objects/zz/MD5E-s1--0.nii.gz/MD5E-s1--0.nii.gz")
    failed = run("predict", empty, "-o", empty / "derivatives" / "meshseg", "-m",
                 threshold_model, "--no-qc")
    assert failed.exit_code == 1
    assert f"`datalad get {missing}`" in failed.stderr
    assert not (empty / "derivatives" / "meshseg" / "dataset_description.json").exists()


@pytest.mark.skipif(not (shutil.which("datalad") and shutil.which("git-annex")),
                    reason="needs datalad and git-annex")
def test_real_datalad_dataset_segmented_saved_and_segmented_again(tmp_path, threshold_model):
    """The same with real DataLad: create, save, predict, save, rerun (resume and
    --overwrite), save; inputs never change and the dataset ends clean."""
    def datalad(*args: str) -> str:
        done = subprocess.run(["datalad", *args], cwd=ds, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ds = tmp_path / "ds"
    subprocess.run(["datalad", "create", str(ds)], capture_output=True, check=True, timeout=300)
    for i, sub in enumerate(("01", "02")):
        save(ds / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w.nii.gz", seed=i)
    datalad("save", "-m", "scans")
    inputs = {p: p.read_bytes() for p in ds.glob("sub-*/anat/*.nii.gz")}
    args = ("predict", ds, "-o", ds / "derivatives" / "meshseg", "-m", threshold_model,
            "--no-qc")
    assert run(*args, "-q").exit_code == 0
    datalad("save", "-m", "masks")
    assert next((ds / "derivatives" / "meshseg").rglob("*_mask.nii.gz")).is_symlink()
    again = run(*args)
    assert again.exit_code == 0 and "2 skipped" in again.output, again.output
    redo = run(*args, "--overwrite")
    assert redo.exit_code == 0 and "2 segmented" in redo.output, redo.output
    datalad("save", "-m", "masks again")
    clean = subprocess.run(["git", "status", "--porcelain"], cwd=ds, capture_output=True,
                           text=True, check=True)
    assert clean.stdout == ""
    assert {p: p.read_bytes() for p in inputs} == inputs


def bids_dataset(root: Path) -> Path:
    """T2w (one with a session), FLAIR-only and T1w-only subjects."""
    for i, name in enumerate(("sub-01/anat/sub-01_T2w", "sub-02/ses-1/anat/sub-02_ses-1_T2w",
                              "sub-03/anat/sub-03_FLAIR", "sub-04/anat/sub-04_T1w")):
        save(root / f"{name}.nii.gz", seed=i)
        (root / f"{name}.json").write_text('{"RepetitionTime": 2}')
    (root / "dataset_description.json").write_text(
        '{"Name": "ds", "BIDSVersion": "1.9.0", "Authors": ["x"]}')
    (root / "README").write_text("a small dataset\n")
    return root


def bids_errors(folder: Path) -> list[str]:
    """The BIDS validator's errors on a dataset, as 'code: file' lines."""
    done = subprocess.run(["bids-validator-deno", str(folder), "--format", "json"],
                          capture_output=True, text=True, timeout=600)
    issues = json.loads(done.stdout)["issues"]["issues"]
    return [f"{i['code']}: {i.get('location', '')}" for i in issues if i["severity"] == "error"]


@pytest.mark.skipif(not shutil.which("bids-validator-deno"), reason="needs bids-validator-deno")
def test_bids_derivatives_pass_the_validator(tmp_path, threshold_model):
    """Issue 20 item 3: 0 validator errors on the derivatives (masks, probsegs, QC pictures,
    --mni masks) of a dataset with T2w, FLAIR and T1w subjects."""
    ds = bids_dataset(tmp_path / "ds")
    out = ds / "derivatives" / "meshseg"
    result = run("predict", ds, "-o", out, "-m", threshold_model, "--prob", "--mni")
    assert result.exit_code == 0, result.output
    assert bids_errors(out) == []


def test_bids_mode_lists_skipped_subjects_and_selects_participants(tmp_path, threshold_model):
    """Issue 20 item 3: FLAIR/T1w-only subjects are named as skipped; --participant-label
    (with or without sub-) selects; an unknown label is a usage error."""
    ds = bids_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    chosen = run("predict", ds, "-o", out, "-m", threshold_model, "--no-qc",
                 "--participant-label", "sub-02")
    assert chosen.exit_code == 0, chosen.output
    assert f"{ds / 'sub-03'}: skipped, no *_T2w image (has FLAIR;" in chosen.stderr
    assert f"{ds / 'sub-04'}: skipped, no *_T2w image (has T1w;" in chosen.stderr
    assert {p.name for p in out.rglob("*_mask.nii.gz")} == {
        "sub-02_ses-1_space-orig_desc-lesion_mask.nii.gz"}
    unknown = run("predict", ds, "-o", out, "-m", threshold_model, "--participant-label", "03")
    assert unknown.exit_code == 2 and "--participant-label 03: no *_T2w image" in unknown.stderr


def test_a_kept_mask_must_be_the_one_its_record_describes(tmp_path, threshold_model):
    """Issue 20 item 14: a mask replaced after its record (all ones, same grid) is redone on
    resume, not kept as done because it still loads."""
    scan = save(tmp_path / "a.nii.gz")
    assert run("predict", scan, "-m", threshold_model, "--no-qc", "-q").exit_code == 0
    mask = tmp_path / "a_lesion.nii.gz"
    assert read_sidecar(tmp_path / "a_lesion.json").output_sha256
    nib.save(nib.Nifti1Image(np.ones(head()[0].shape, np.uint8), np.eye(4)), mask)
    again = run("predict", scan, "-m", threshold_model, "--no-qc")
    assert again.exit_code == 0 and "1 segmented" in again.output, again.output
    assert not np.asarray(nib.load(mask).dataobj).all()


@pytest.mark.parametrize("damage", ["wrong_type", "string_flags", "deep", "truncated", "empty"])
def test_a_damaged_record_means_only_its_input_is_redone(tmp_path, threshold_model, damage):
    """Issue 20 item 14: a kept record with wrong types, deeply nested JSON, cut short or
    empty: that input is redone (no traceback, the cohort goes on, --overwrite or not)."""
    scans = tmp_path / "scans"
    save(scans / "a.nii.gz")
    save(scans / "b.nii.gz", seed=1)
    args = ("predict", scans, "-m", threshold_model, "--no-qc", "--report", tmp_path / "r.html")
    assert run(*args, "-q").exit_code == 0
    record = scans / "a_lesion.json"
    text = record.read_text()
    record.write_text({
        "wrong_type": text.replace('"lesion_ml": ', '"lesion_ml": "abc", "x": '),
        "string_flags": text.replace('"flags": []', '"flags": "none"'),
        "deep": text.replace('"location": {}', '"location": ' + "[" * 100000 + "]" * 100000),
        "truncated": text[:len(text) // 2],
        "empty": "",
    }[damage])
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "1 segmented, 1 skipped" in again.output, again.output
    assert read_sidecar(record).status == "ok"


def test_overwrite_never_replaces_files_meshseg_did_not_write(tmp_path, threshold_model):
    """Issue 20 item 13: --overwrite replaced a user's scan named patient_lesion.nii.gz as
    patient.nii.gz's mask, and manual masks under meshseg's BIDS names."""
    scans = tmp_path / "scans"
    save(scans / "patient.nii.gz")
    theirs = save(scans / "patient_lesion.nii.gz", seed=4)  # a real scan, no signature
    ds = bids_dataset(tmp_path / "ds")
    manual = tmp_path / "manual"  # no dataset_description.json
    masks = [save(manual / p / f"{n}_space-orig_desc-lesion_mask.nii.gz", seed=5) for p, n in
             (("sub-01/anat", "sub-01"), ("sub-02/ses-1/anat", "sub-02_ses-1"))]
    before = {p: p.read_bytes() for p in (theirs, *masks)}
    for args in ([scans], [ds, "-o", manual]):
        result = run("predict", *args, "-m", threshold_model, "--overwrite")
        assert result.exit_code == 1, result.output
        assert "is not meshseg's" in result.stderr and "move it or choose -o" in result.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert not list(manual.rglob("*.json")) and not (scans / "patient_lesion.json").exists()


@pytest.mark.parametrize("case", ["description", "no_description", "not_bids_inputs"])
def test_output_folder_is_never_a_raw_bids_dataset(tmp_path, threshold_model, case):
    """Issue 20 item 13: -o ds/ wrote derivatives into the raw dataset."""
    ds = bids_dataset(tmp_path / "ds")
    if case == "no_description":
        (ds / "dataset_description.json").unlink()
    inputs = [save(tmp_path / "scan.nii.gz")] if case == "not_bids_inputs" else [ds]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run("predict", *inputs, "-o", ds, "-m", threshold_model, "--overwrite")
    assert result.exit_code == 2, result.output
    assert f"{ds}: is a BIDS raw dataset" in result.stderr
    assert f"-o {ds / 'derivatives' / 'meshseg'}" in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert run("predict", ds, "-o", ds / "derivatives" / "meshseg", "-m", threshold_model,
               "-q").exit_code == 0


def test_records_hold_the_absolute_input_however_typed(tmp_path, threshold_model, monkeypatch):
    """Issue 20 item 10: one folder's records mixed `a.nii.gz` and `scans/a.nii.gz`; resume
    and the cohort page's relative links still work."""
    scans = tmp_path / "scans"
    save(scans / "a.nii.gz"), save(scans / "b.nii.gz", seed=1)
    monkeypatch.chdir(scans)
    assert run("predict", "a.nii.gz", "-m", threshold_model, "-q").exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert run("predict", "scans/b.nii.gz", "-m", threshold_model, "-q").exit_code == 0
    for name in ("a", "b"):
        assert read_sidecar(scans / f"{name}_lesion.json").input == str(scans / f"{name}.nii.gz")
    page = tmp_path / "pages" / "cohort.html"
    again = run("predict", "scans", "-m", threshold_model, "--report", page)
    assert again.exit_code == 0 and "2 skipped" in again.output, again.output
    html = page.read_text()
    for name in ("a_lesion.nii.gz", "a_lesion.json", "b_lesion.nii.gz", "b_lesion.json"):
        assert f'href="../scans/{name}"' in html  # relative to the page, as before
    assert f'href="{tmp_path}' not in html
