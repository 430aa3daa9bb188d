"""meshseg tune: a study on tiny synthetic pairs, resumed, pruned, refused when it differs.

Scans stay on their own 24^3 grid (`fake_conform_pair`) and train on 12^3 crops for one
step per epoch, so a trial of three inner folds takes a few seconds.
"""

from __future__ import annotations

import csv
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from meshseg.benchmark.splits import make_splits, save_splits
from meshseg.cli import main
from meshseg.errors import InputError
from meshseg.training import data
from meshseg.training.config import load_config
from meshseg.training.data import read_manifest
from meshseg.training.tune import (
    TuneSettings,
    inner_folds,
    join_study,
    study_identity,
    suggest,
    tune,
    tunes_channels,
)
from tests.test_data import fake_conform_pair, write_pair

CENTRES = [(6, 7, 8), (16, 12, 10), (9, 15, 17), (12, 12, 12), (8, 16, 9), (15, 9, 14)]
FAST = ["--max-epochs", "1", "--min-epochs", "1", "--crop", "12", "--steps-per-epoch", "1",
        "--device", "cpu", "--sampler-seed", "3"]


@pytest.fixture
def manifest(tmp_path, monkeypatch) -> Path:
    """Six subjects with lesions of different sizes: enough for 3 outer x 3 inner folds."""
    monkeypatch.setattr(data, "conform_pair", fake_conform_pair)
    rows = ["image,mask,subject"]
    for i, centre in enumerate(CENTRES):
        pair = write_pair(tmp_path / "in", f"s{i}", center=centre, radius=2 + i % 3, seed=i)
        rows.append(f"{pair.image.name},{pair.mask.name},s{i}")
    (tmp_path / "in" / "all.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "in" / "all.csv"


def tune_command(manifest: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["tune", "--data", str(manifest), "--out", str(out),
                                     "--cache", str(out.parent / "cache"), "-q", *FAST, *extra])


def read_trials(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tune_runs_resumes_writes_a_usable_best_and_keeps_its_settings(manifest, tmp_path):
    out = tmp_path / "tune"
    first = tune_command(manifest, out, "--trials", "1")
    assert first.exit_code == 0, first.output
    assert "best trial" in first.output and "meshseg train --config " in first.output
    assert {"study.db", "splits.json", "trials.csv", "best.toml", "meshseg"} <= {
        p.name for p in out.iterdir()}

    second = tune_command(manifest, out, "--trials", "1")
    assert second.exit_code == 0, second.output
    trials = read_trials(out)
    assert [t["number"] for t in trials] == ["0", "1"]  # one study, two trials
    done = [t for t in trials if t["state"] == "complete"]
    assert done, trials
    for trial in done:
        folder = Path(trial["folder"])
        assert sorted(p.name for p in folder.iterdir()) == ["inner-1", "inner-2", "inner-3"]
        assert len(trial["inner_dice"].split()) == 3
        assert 5 <= int(trial["channels"]) <= 21 and 1e-4 <= float(trial["lr"]) <= 4e-2
        assert float(trial["pct_start"]) in (0.02, 0.1, 0.2)
        val = read_manifest(folder / "inner-1" / "val.csv")
        train = read_manifest(folder / "inner-1" / "train.csv")
        assert val and train and not {p.subject for p in val} & {p.subject for p in train}

    best = tomllib.loads((out / "best.toml").read_text())
    assert best["epochs"] == 1 and best["crop"] == 12 and best["class_weights"][1] == 1.0
    assert "device" not in best and "cache" not in best  # machine-specific, left out
    handed = CliRunner().invoke(main, ["train", "--config", str(out / "best.toml"), "--data",
                                       str(manifest), "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache"), "-q"])
    assert handed.exit_code == 0, handed.output
    config = load_config(tmp_path / "run" / "config.toml")
    assert {k: getattr(config, k) for k in best} == {
        **best, "class_weights": tuple(best["class_weights"])}
    assert max(float(t["value"]) for t in done) == pytest.approx(
        float((out / "best.toml").read_text().split("Dice ")[1].split()[0]), abs=1e-4)

    other = tune_command(manifest, out, "--trials", "1", "--crop-lesion-p", "0.9")
    assert other.exit_code == 1
    assert ("study meshseg was started with other settings (training.crop_lesion_p: study "
            "has 0.5, this call 0.9)") in other.output
    assert len(read_trials(out)) == 2

    splits = (out / "splits.json").read_bytes()
    reseeded = tune_command(manifest, out, "--trials", "1", "--seed", "1")
    assert reseeded.exit_code == 1 and (f"{out / 'splits.json'}: made with seed 0, not 1; "
                                        "pass --seed 0 or another --out") in reseeded.output
    given = tune_command(manifest, out, "--trials", "1", "--seed", "1", "--splits",
                         str(out / "splits.json"))
    assert given.exit_code == 1 and "seed: study has 0, this call 1" in given.output
    assert (out / "splits.json").read_bytes() == splits  # the refused calls left it alone


def test_a_pruned_trial_stops_after_the_epoch_and_keeps_its_run(manifest, tmp_path):
    out = tmp_path / "tune"
    settings = TuneSettings(data=manifest, out=out, trials=1, max_epochs=3, min_epochs=1,
                            fixed={"crop": 12, "steps_per_epoch": 1, "device": "cpu",
                                   "cache": tmp_path / "cache"})
    result = tune(settings, pruner=optuna.pruners.ThresholdPruner(lower=1.5))  # Dice < 1.5

    assert result.states == {"pruned": 1} and result.best_file is None
    trial = read_trials(out)[0]
    assert trial["state"] == "pruned" and trial["epochs_reported"] == "1"
    folder = Path(trial["folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["inner-1"]  # later folds never ran
    with open(folder / "inner-1" / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1
    assert (folder / "inner-1" / "last.pt").exists()


@pytest.mark.parametrize("change, message", [
    ({"min_epochs": 5, "max_epochs": 4}, "need 1 <= min_epochs <= max_epochs"),
    ({"fixed": {"lr": 0.1}}, "tune sets these training settings itself: lr"),
    ({"fixed": {"epoch": 3}}, "unknown training settings: epoch"),
    ({"fixed": {"crop": 0}}, "crop=0"),
    ({"storage": "nonsense://"}, "storage nonsense://"),
])
def test_bad_settings_are_refused_in_one_line(manifest, tmp_path, change, message):
    settings = TuneSettings(**{"data": manifest, "out": tmp_path / "tune", "trials": 1,
                               **change})
    with pytest.raises(InputError, match=message):
        tune(settings)


def test_the_folders_splits_are_reused_and_another_file_refused(manifest, tmp_path,
                                                                monkeypatch):
    """Like cv: OUT/splits.json is reused when continuing with the seed it was made with, and
    --splits must equal it."""
    out = tmp_path / "tune"
    out.mkdir()
    pairs = read_manifest(manifest)
    saved = make_splits(pairs, seed=7)
    save_splits(saved, out / "splits.json")
    save_splits(make_splits(pairs, seed=0), tmp_path / "other.json")

    def made_again(*args, **kwargs):
        raise AssertionError("OUT/splits.json exists: its splits are read, not made again")

    monkeypatch.setattr("meshseg.benchmark.splits.make_splits", made_again)
    assert inner_folds(TuneSettings(data=manifest, out=out, seed=7))[0] == saved
    with pytest.raises(InputError, match="splits.json: made with seed 7, not 0"):
        inner_folds(TuneSettings(data=manifest, out=out))
    with pytest.raises(InputError, match="other.json: differs from .*splits.json"):
        inner_folds(TuneSettings(data=manifest, out=out, seed=7, splits=tmp_path / "other.json"))


def test_a_setting_newer_than_the_study_counts_as_its_default(tmp_path):
    """A study begun before TrainConfig had intensity_aug and val_whole lacks them in its
    identity; its trials trained without them, so the default joins and another value not."""
    settings = TuneSettings(data=Path("d.csv"), out=tmp_path)
    identity = study_identity(settings, [], channels=True)
    older = {**identity, "training": {k: v for k, v in identity["training"].items()
                                      if k not in ("intensity_aug", "val_whole")}}
    study = optuna.create_study(direction="maximize")
    join_study(study, older)
    join_study(study, identity)
    augmented = study_identity(replace(settings, fixed={"intensity_aug": True}), [], True)
    with pytest.raises(InputError, match="training.intensity_aug: study has False, this call "
                                         "True"):
        join_study(study, augmented)


def test_missing_optuna_names_the_extra(manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(InputError, match=r"pip install 'meshseg\[benchmark\]'"):
        tune(TuneSettings(data=manifest, out=tmp_path / "tune"))


def test_channels_are_searched_for_meshnet_only():
    params = {"background_weight": 0.5, "lr": 1e-3, "weight_decay": 1e-3, "pct_start": 0.1,
              "channels": 7}
    assert suggest(optuna.trial.FixedTrial(params), channels=True)["channels"] == 7
    assert "channels" not in suggest(optuna.trial.FixedTrial(params), channels=False)
    assert tunes_channels({}) and tunes_channels({"architecture": "meshnet"})
    assert not tunes_channels({"architecture": "segresnet"})


def test_the_lowest_background_weight_of_the_search_trains():
    params = {"background_weight": 0.0, "lr": 1e-3, "weight_decay": 1e-3, "pct_start": 0.1,
              "channels": 5}
    tuned = suggest(optuna.trial.FixedTrial(params), channels=True)
    assert tuned["class_weights"] == (0.0, 1.0)
    settings = TuneSettings(data=Path("d.csv"), out=Path("o"))
    settings.train_config(Path("t.csv"), Path("v.csv"), Path("run"), tuned).check()


@pytest.mark.slow
def test_the_architecture_reaches_training(manifest, tmp_path):
    pytest.importorskip("monai")
    out = tmp_path / "tune"
    result = tune_command(manifest, out, "--trials", "1", "--architecture", "segresnet",
                          "--crop", "16")
    assert result.exit_code == 0, result.output
    trial = read_trials(out)[0]
    assert trial["channels"] == ""  # not searched
    run = Path(trial["folder"]) / "inner-1"
    assert tomllib.loads((run / "config.toml").read_text())["architecture"] == "segresnet"
    assert trial["state"] == "complete"  # a study's first trial is never pruned
    assert tomllib.loads((out / "best.toml").read_text())["architecture"] == "segresnet"
