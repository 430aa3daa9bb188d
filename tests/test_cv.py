"""meshseg cv end to end on tiny synthetic data: two architectures, the results folder,
skipping finished units, resuming interrupted ones, and --only / --list.

Scans keep their own 32^3 grid in training (`fake_conform_pair`), and the hold-out scans are
segmented by a stand-in for `predict.segment` that thresholds the scan, so the fast tests
never push a 256^3 volume through a network; the slow test runs the real pipeline.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from meshseg import archs
from meshseg.benchmark import cv, cv_units, evaluate, splits
from meshseg.benchmark.splits import FORMAT
from meshseg.cli import main
from meshseg.errors import InputError
from meshseg.io import write_csv
from meshseg.pipeline import predict
from meshseg.training import data
from meshseg.training.config import load_config, save_config
from tests.conftest import Killed
from tests.test_data import fake_conform_pair, write_pair

MODELS = ("meshnet-5", "resunet")
CENTRES = [(8, 8, 8), (16, 16, 16), (20, 12, 10), (10, 20, 16), (16, 10, 22), (12, 14, 12)]
TRAIN_FLAGS = ["--epochs", "1", "--steps-per-epoch", "1", "--crop", "32", "--device", "cpu"]


def write_cohort(folder: Path) -> Path:
    """Six subjects, two acquisitions, lesions of 2 to 7 voxels radius; their manifest."""
    rows = ["image,mask,subject,acq"]
    for i, centre in enumerate(CENTRES):
        pair = write_pair(folder, f"s{i}", shape=(32, 32, 32), center=centre, radius=2 + i,
                          seed=i)
        rows.append(f"{pair.image.name},{pair.mask.name},s{i},{'ab'[i % 2]}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def bright_voxels(volume, model, run, progress=None) -> np.ndarray:
    """Stand-in for predict.segment: lesions are the bright voxels (as write_pair paints them)."""
    return (volume.data > 150).astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The cohort, a cache and the patches every test here uses (module-wide)."""
    root = tmp_path_factory.mktemp("cv")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "conform_pair", fake_conform_pair)
        patch.setattr(predict, "segment", bright_voxels)
        yield root, write_cohort(root / "in")


def settings_for(root: Path, manifest: Path, results: str, epochs: int = 1,
                 **changes) -> cv_units.CvSettings:
    """CvSettings of 2 x 2 folds of meshnet-5 training like TRAIN_FLAGS, for `cv.run`."""
    return cv_units.CvSettings(**{
        "data": manifest, "out": root / results, "models": ("meshnet-5",), "outer": 2,
        "inner": 2, "train": {"epochs": epochs, "steps_per_epoch": 1, "crop": 32,
                              "device": "cpu", "cache": root / "cache"}, **changes})


def cv_args(root: Path, manifest: Path, results: str, *more: str) -> list[str]:
    return ["cv", "--data", str(manifest), "--out", str(root / results), "--outer", "2",
            "--inner", "2", *(a for m in MODELS for a in ("--architecture", m)), *TRAIN_FLAGS,
            "--cache", str(root / "cache"), "-q", *more]


@pytest.fixture(scope="module")
def finished(cohort) -> Path:
    """One complete cv run of both architectures."""
    root, manifest = cohort
    result = CliRunner().invoke(main, cv_args(root, manifest, "results"))
    assert result.exit_code == 0, result.output
    assert "| meshnet-5 (reference) | 5,682 |" in result.output
    return root / "results"


def test_results_folder(finished):
    splits = (finished / "splits.json").read_text()
    assert FORMAT in splits
    for model in MODELS:
        rows = list(csv.DictReader((finished / "metrics" / f"{model}.csv").open()))
        assert sorted(r["subject"] for r in rows) == [f"s{i}" for i in range(6)]
        assert all(float(r["dice"]) == 1.0 for r in rows)  # the stand-in finds the bright ball
        assert len(list((finished / "predictions" / model).glob("*_lesion.nii.gz"))) == 6
        for k in range(2):
            for j in range(2):
                run = finished / "runs" / model / f"outer{k}" / f"inner{j}" / "restart0"
                assert (run / "best.safetensors").exists()
    manifests = list(csv.DictReader((finished / "manifests/outer0/inner1/val.csv").open()))
    assert manifests and set(manifests[0]) == {"image", "mask", "subject", "acq"}
    assert len(list(csv.DictReader((finished / "selection.csv").open()))) == 4
    summary = list(csv.DictReader((finished / "summary.csv").open()))
    assert [r["model"] for r in summary] == list(MODELS)
    assert float(summary[0]["dice_mean"]) == 1.0 and summary[0]["scans"] == "6"
    assert "| model | parameters | DICE | AVD | MCC |" in (finished / "summary.md").read_text()
    for figure in (cv.BOX_FIGURE, cv.SIZE_FIGURE):
        assert (finished / "figures" / figure).read_bytes().startswith(b"\x89PNG")


def test_selection_reads_each_run_once(finished, monkeypatch):
    settings = cv_units.CvSettings(data=Path("d.csv"), out=finished, models=MODELS, outer=2,
                                   inner=2, train={"epochs": 1})
    read, reader = [], cv_units.metric_rows
    for module in (cv, cv_units):
        monkeypatch.setattr(module, "metric_rows", lambda f: read.append(f) or reader(f))
    picked = cv.select_best(settings)
    assert sorted(read) == sorted(u.folder(finished) for u in cv_units.units(settings))
    assert [(b.model, b.outer) for b in picked] == [(m, k) for m in MODELS for k in range(2)]


def test_rerun_skips_finished_units_and_predictions(cohort, finished, monkeypatch):
    def build_again(*args, **kwargs):
        raise AssertionError("the report counts parameters of the checkpoints it loaded")

    monkeypatch.setattr(archs, "count_parameters", build_again)
    root, manifest = cohort
    run = finished / "runs/resunet/outer1/inner0/restart0"
    prediction = finished / "predictions/resunet/s0_lesion.nii.gz"
    stamps = [(p, p.stat().st_mtime_ns) for p in (run / "last.pt", prediction)]
    elsewhere = ["--cache", str(root / "other-cache")]  # a machine setting: may differ
    result = CliRunner().invoke(main, cv_args(root, manifest, "results", *elsewhere))
    assert result.exit_code == 0, result.output
    assert "| meshnet-5 (reference) | 5,682 |" in result.output
    assert [p.stat().st_mtime_ns for p, _ in stamps] == [t for _, t in stamps]


def test_a_report_killed_while_predicting_keeps_what_it_made(cohort, finished, monkeypatch):
    """The selection did not change, so the rerun makes only the prediction the kill
    prevented, not every prediction of that fold again."""
    root, manifest = cohort
    folder = finished / "predictions/meshnet-5"
    kept = {p: p.stat().st_mtime_ns for p in folder.glob("*_lesion.nii.gz")}
    lost = min(kept)
    lost.unlink()
    del kept[lost]

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(predict, "segment", kill)
    with pytest.raises(Killed):  # a BaseException: CliRunner does not catch it
        CliRunner().invoke(main, cv_args(root, manifest, "results"))
    monkeypatch.setattr(predict, "segment", bright_voxels)
    result = CliRunner().invoke(main, cv_args(root, manifest, "results"))
    assert result.exit_code == 0, result.output
    assert lost.exists() and {p: p.stat().st_mtime_ns for p in kept} == kept


def test_other_training_settings_are_refused(cohort, finished):
    """A finished unit would stay "started" forever under more epochs (and fewer would mix
    two recipes in one table): a call whose settings differ from a unit's is refused."""
    root, manifest = cohort
    for more in (["--epochs", "2"], ["--epochs", "2", "--list"]):
        result = CliRunner().invoke(main, cv_args(root, manifest, "results", *more))
        assert result.exit_code == 1
        assert result.stderr.count("\n") == 1 and (
            f"{finished / 'runs/meshnet-5/outer0/inner0/restart0'}: trained with other settings "
            "(epochs: run has 1, this call 2)") in result.stderr
    start = finished / "runs/meshnet-5/outer0/inner0/restart0/best.safetensors"
    tuned = CliRunner().invoke(main, cv_args(root, manifest, "results", "--init", str(start)))
    assert tuned.exit_code == 1 and f"(init: run has None, this call '{start}')" in tuned.stderr
    reseeded = CliRunner().invoke(main, cv_args(root, manifest, "results", "--seed", "1"))
    assert reseeded.exit_code == 1 and (f"{finished / 'splits.json'}: made with seed 0, not 1; "
                                        "pass --seed 0 or another --out") in reseeded.stderr


def test_list_only_and_resume(cohort, finished):
    root, manifest = cohort
    listed = CliRunner().invoke(main, cv_args(root, manifest, "partial", "--list"))
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 8
    assert lines[5] == "5\tmodel=resunet,outer=0,inner=1,restart=0\ttodo"
    only = CliRunner().invoke(main, cv_args(root, manifest, "partial", "--only", "index=1",
                                            "--splits", str(finished / "splits.json")))
    assert only.exit_code == 0, only.output
    assert "rerun without --only" in only.output
    listed = CliRunner().invoke(main, cv_args(root, manifest, "partial", "--list"))
    assert [line.split("\t")[2] for line in listed.output.splitlines()].count("done") == 1
    settings = settings_for(root, manifest, "resumed", epochs=2)

    def kill(unit, row):
        raise Killed

    unit = cv_units.units(settings)[0]
    with pytest.raises(Killed):
        cv.run(settings, [{"index": "0"}], on_epoch=kill)
    assert cv_units.status(unit, settings.out, 2) == "started"
    cv.run(settings, [{"index": "0"}])
    assert cv_units.status(unit, settings.out, 2) == "done"
    assert len(cv_units.metric_rows(unit.folder(settings.out))) == 2  # resumed after epoch 1
    failed = CliRunner().invoke(main, cv_args(root, manifest, "partial", "--only", "model=unet"))
    assert failed.exit_code == 1 and "--only selects no unit" in failed.stderr


def test_a_resumed_unit_runs_with_this_calls_machine_settings(cohort):
    """--device, --cache and --num-workers may differ between machines: a unit started on a
    GPU elsewhere resumes here with this call's, not those in its config.toml."""
    root, manifest = cohort
    settings = settings_for(root, manifest, "moved", epochs=2)
    unit = cv_units.units(settings)[0]

    def kill(unit, row):
        raise Killed

    with pytest.raises(Killed):
        cv.run(settings, [{"index": "0"}], on_epoch=kill)
    saved = unit.folder(settings.out) / "config.toml"
    save_config(replace(load_config(saved), device="cuda:99", cache=root / "gpu-cache",
                        num_workers=1), saved)
    cv.run(settings, [{"index": "0"}])
    assert cv_units.status(unit, settings.out, 2) == "done"
    assert not (root / "gpu-cache").exists()


def test_a_unit_cut_short_before_its_split_starts_afresh(cohort):
    """Folders left by older versions, whose `train.fit` wrote config.toml before split.json
    (it now writes split.json first): a kill between them left a unit that could neither
    resume (no split.json) nor start (config.toml exists)."""
    root, manifest = cohort
    settings = settings_for(root, manifest, "cut")
    cv_units.prepare(settings)
    unit = cv_units.units(settings)[0]
    folder = unit.folder(settings.out)
    folder.mkdir(parents=True)
    save_config(cv_units.unit_config(settings, unit, Path("train.csv"), Path("val.csv")),
                folder / "config.toml")
    assert cv_units.status(unit, settings.out, 1) == "todo"
    cv.run(settings, [{"index": "0"}])
    assert cv_units.status(unit, settings.out, 1) == "done"


def test_fewer_restarts_redo_the_predictions_of_the_runs_selected_now(cohort):
    root, manifest = cohort
    two = settings_for(root, manifest, "restarts", restarts=2)
    cv.run(two, [{"model": "meshnet-5"}])  # train every unit, no report yet
    favoured = two.out / "runs/meshnet-5/outer0/inner0/restart1"
    rows = cv_units.metric_rows(favoured)
    rows[0]["val_dice"] = "2.0"  # restart 1 wins outer fold 0 while there are two restarts
    write_csv(favoured / "metrics.csv", list(rows[0]), rows)
    cv.run(two)
    source = two.out / "predictions/meshnet-5/outer0_checkpoint.txt"
    assert source.read_text().strip() == "runs/meshnet-5/outer0/inner0/restart1/best.safetensors"
    pairs, chosen = cv_units.prepare(two)
    ids = cv_units.scan_ids(pairs)
    held = [two.out / f"predictions/meshnet-5/{ids[p.image]}_lesion.nii.gz"
            for p in splits.test_pairs(chosen, pairs, 0)]
    stamps = [p.stat().st_mtime_ns for p in held]

    one = replace(two, restarts=1)
    cv.run(one)
    selected = list(csv.DictReader((one.out / "selection.csv").open()))[0]
    assert (selected["outer"], selected["restart"]) == ("0", "0")
    assert source.read_text().strip().endswith("/restart0/best.safetensors")
    assert all(p.stat().st_mtime_ns > t for p, t in zip(held, stamps))  # made by restart 0


def test_selectors():
    settings = cv_units.CvSettings(data=Path("d.csv"), out=Path("r"), models=MODELS, restarts=2)
    units = cv_units.units(settings)
    assert len(units) == 2 * 3 * 3 * 2 and [u.index for u in units] == list(range(36))
    assert cv_units.select(units, []) == units
    picked = cv_units.select(units, [cv_units.parse_selector("model=resunet,outer=2,inner=0"),
                               cv_units.parse_selector("index=3")])
    assert [u.label() for u in picked] == [
        "model=meshnet-5,outer=0,inner=1,restart=1",
        "model=resunet,outer=2,inner=0,restart=0", "model=resunet,outer=2,inner=0,restart=1"]
    for bad in ("outer=x", "fold=1", "model"):
        with pytest.raises(InputError, match="--only"):
            cv_units.parse_selector(bad)


def test_unknown_reference_or_architecture(tmp_path):
    settings = cv_units.CvSettings(data=tmp_path / "d.csv", out=tmp_path, models=("meshnet-5",),
                             reference="resunet")
    with pytest.raises(InputError, match="reference model resunet is not among"):
        cv.run(settings)
    with pytest.raises(InputError, match="unknown architecture 'unet'"):
        cv_units.prepare(cv_units.CvSettings(data=tmp_path / "d.csv", out=tmp_path,
                                             models=("unet",)))


@pytest.mark.slow
def test_real_pipeline_three_by_three(tmp_path, monkeypatch):
    """The paper's 3 x 3 folds, the real predict pipeline (256^3 conform) for both models."""
    monkeypatch.setattr(data, "conform_pair", fake_conform_pair)
    manifest = write_cohort(tmp_path / "in")
    args = ["cv", "--data", str(manifest), "--out", str(tmp_path / "results"),
            "--architecture", "meshnet-5", "--architecture", "resunet", *TRAIN_FLAGS,
            "--cache", str(tmp_path / "cache"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "results/runs").rglob("best.safetensors"))) == 18
    summary = list(csv.DictReader((tmp_path / "results/summary.csv").open()))
    assert [r["model"] for r in summary] == list(MODELS)


def test_models_are_paired_by_subject_once_each():
    """Two sessions of one subject are one pair in the test, with their mean score."""
    def row(scan: str, dice: float):
        return evaluate.Score(scan, dice, *[0.0] * 8, 0, "", "")

    subject_of = {"a1": "a", "a2": "a", "b1": "b"}
    rows = [row("a1", 0.2), row("a2", 0.6), row("b1", 0.9)]
    assert cv.subject_means(rows, "dice", subject_of) == pytest.approx({"a": 0.4, "b": 0.9})
