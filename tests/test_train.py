"""Training: config round trip, run files, resume after a kill, reproducibility, checkpointing.

Volumes stay on their own 24^3 grid (`fake_conform_pair`) and train on 12^3 crops, so no
256^3 volume ever reaches the network here.
"""

from __future__ import annotations

import csv
import logging
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from meshseg.errors import DeviceError, InputError, OutputError
from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import load_network, sha256_file
from meshseg.pipeline.conform import to_unit_range
from meshseg.pipeline.infer import lesion_probability
from meshseg.pipeline.predict import runner
from meshseg.training import data
from meshseg.training.distill import load_teacher, teacher_digest
from meshseg.training.train import (
    METRIC_COLUMNS,
    TrainConfig,
    dice,
    fit,
    forward,
    load_config,
    loss_function,
    one_cycle,
    resume,
    save_config,
)
from tests.conftest import Killed, grid_affine
from tests.test_data import fake_conform_pair, write_pair

LOSS_COLUMNS = ("restart", "epoch", "train_loss", "val_loss", "val_dice", "lr")


@pytest.fixture
def config(tmp_path, monkeypatch) -> TrainConfig:
    """Four subjects (three train, one validate), tiny MeshNet, 12^3 crops, CPU."""
    monkeypatch.setattr(data, "conform_pair", fake_conform_pair)
    rows = ["image,mask,subject"]
    for i, centre in enumerate([(6, 7, 8), (16, 12, 10), (9, 15, 17), (12, 12, 12)]):
        pair = write_pair(tmp_path / "in", f"s{i}", center=centre, radius=3, seed=i)
        rows.append(f"{pair.image.name},{pair.mask.name},s{i}")
    (tmp_path / "in" / "train.csv").write_text("\n".join(rows) + "\n")
    return TrainConfig(data=tmp_path / "in" / "train.csv", out=tmp_path / "run", channels=3,
                       epochs=1, crop=12, val_fraction=0.25, steps_per_epoch=2, device="cpu",
                       cache=tmp_path / "cache", seed=7)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def losses(run_dir: Path) -> list[tuple[str, ...]]:
    """Every metrics column except the wall time."""
    return [tuple(row[c] for c in LOSS_COLUMNS) for row in read_metrics(run_dir)]


def test_config_round_trips_through_toml(tmp_path):
    config = TrainConfig(data=Path("/d/train.csv"), out=Path("/runs/a"), crop=64, amp=True,
                         class_weights=(0.25, 2.0), val_data=None)
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
    (tmp_path / "bad.toml").write_text('data = "x"\nout = "y"\nepoch = 3\n')
    with pytest.raises(InputError, match="bad.toml: unknown training settings: epoch"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs=0: must be an integer >= 1"),
    ({"activation": "gelu"}, "activation='gelu': must be one of elu, relu"),
    ({"class_weights": (1.0,)}, "class_weights=.*two numbers, background >= 0 and lesion > 0"),
    ({"class_weights": (0.5, 0.0)}, "class_weights=\\(0.5, 0.0\\): must be two numbers"),
    ({"class_weights": (-0.1, 1.0)}, "class_weights=\\(-0.1, 1.0\\): must be two numbers"),
    ({"val_fraction": 1.0}, "val_fraction=1.0: must be between 0 and 1"),
    ({"crop": 0}, "crop=0"),
    ({"crop": 25}, "crop 25: must be between 1 and the volume side 24"),
    ({"val_whole": True, "crop": None}, "val_whole=True: needs crop and architecture meshnet"),
    ({"freeze_norms": True}, "freeze_norms=True: needs init"),
    ({"val_whole": True, "architecture": "segresnet", "crop": 16},
     "val_whole=True: needs crop and architecture meshnet"),
])
def test_bad_settings_are_refused_by_name(config, change, message):
    with pytest.raises(InputError, match=message):
        fit(replace(config, **change))
    assert not config.out.exists()


def test_background_weight_zero_is_allowed_and_a_lesion_free_batch_gives_no_nan(config):
    zero = replace(config, class_weights=(0.0, 1.0))
    zero.check()  # the paper's search reaches a background weight of 0
    loss = loss_function(zero, torch.device("cpu"))
    logits = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    empty = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    free = loss(logits, empty)
    free.backward()
    assert free.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    lesion = empty.clone()
    lesion[0, 1, 2, 3] = 1
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0]),
                                         label_smoothing=zero.label_smoothing)(logits, lesion)
    assert loss(logits, lesion).item() == pytest.approx(expected.item())
    assert torch.isfinite(expected)


def test_fit_writes_the_run_files(config, caplog):
    records = []
    with caplog.at_level(logging.INFO, logger="meshseg.training.train"):
        run_dir = fit(config, on_epoch=records.append)

    assert run_dir == config.out
    assert {p.name for p in run_dir.iterdir()} == {"config.toml", "split.json", "metrics.csv",
                                                   "last.pt", "best.safetensors"}
    assert load_config(run_dir / "config.toml") == config
    rows = read_metrics(run_dir)
    assert list(rows[0]) == list(METRIC_COLUMNS) and len(rows) == 1
    assert records[0]["epoch"] == 1 and records[0]["epochs"] == 1
    assert records[0]["best_val_dice"] == records[0]["val_dice"]
    best = load_network(run_dir / "best.safetensors")
    meta = best.meta
    assert best.architecture == "meshnet" and best.model.config.channels == 3
    assert meta["val_dice"] == float(rows[0]["val_dice"]) and meta["seed"] == 7
    assert (meta["restart"], meta["epoch"]) == (1, 1) and meta["config"]["crop"] == 12
    assert "restart 1/1 epoch 1/1: train loss" in caplog.text
    with pytest.raises(OutputError, match="already holds a training run"):
        fit(config)


def test_keep_epochs_writes_every_epoch_and_best_is_one_of_them(config):
    run_dir = fit(replace(config, epochs=3, keep_epochs=True))

    kept = sorted(p.name for p in (run_dir / "epochs").iterdir())
    assert kept == ["r1-e1.safetensors", "r1-e2.safetensors", "r1-e3.safetensors"]
    rows = read_metrics(run_dir)
    for row, name in zip(rows, kept):
        meta = load_network(run_dir / "epochs" / name).meta
        assert (meta["epoch"], meta["val_dice"]) == (int(row["epoch"]), float(row["val_dice"]))
    best = load_network(run_dir / "best.safetensors")
    twin = load_network(run_dir / "epochs" / f"r1-e{best.meta['epoch']}.safetensors")
    for a, b in zip(best.model.state_dict().values(), twin.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("val_whole, side", [(False, 12), (True, 24)])
def test_validation_uses_one_crop_or_the_whole_volume(config, monkeypatch, val_whole, side):
    """Crop training validates on a crop, or with val_whole on the volume predict would see."""
    from meshseg.training import train

    seen = []
    real = train._validate

    def spy(model, loader, *args):
        seen.extend(tuple(image.shape[2:]) for image, _ in loader)
        return real(model, loader, *args)

    monkeypatch.setattr(train, "_validate", spy)
    fit(replace(config, val_whole=val_whole))
    assert seen == [(side,) * 3]


def test_a_run_killed_while_being_set_up_can_be_started_again(config, monkeypatch):
    """config.toml, the mark of a resumable run, is written last: a kill before it leaves a
    folder that `fit` simply starts over."""
    from meshseg.training import train

    def killed(*args):
        raise Killed

    monkeypatch.setattr(train, "save_config", killed)
    with pytest.raises(Killed):
        fit(config)
    assert (config.out / "split.json").exists() and not (config.out / "config.toml").exists()
    monkeypatch.undo()
    monkeypatch.setattr(data, "conform_pair", fake_conform_pair)
    fit(config)
    assert len(read_metrics(config.out)) == 1


def test_data_problems_stop_training_before_the_run_folder(config):
    (config.data.parent / "s2_mask.nii.gz").unlink()
    with pytest.raises(InputError, match="1 problem.*s2_mask.nii.gz: no such file"):
        fit(config)
    assert not config.out.exists()


def test_same_seed_same_metrics_other_seed_differs(config, tmp_path):
    fit(config)
    fit(replace(config, out=tmp_path / "again"))
    fit(replace(config, out=tmp_path / "other", seed=8))
    assert losses(config.out) == losses(tmp_path / "again")
    assert losses(config.out) != losses(tmp_path / "other")


def test_killed_run_resumes_to_the_same_result(config, tmp_path, caplog):
    straight = replace(config, epochs=2, restarts=2, out=tmp_path / "straight")
    fit(straight)

    killed = replace(straight, out=tmp_path / "killed")

    def die_after_first_restart(record: dict) -> None:
        if (record["restart"], record["epoch"]) == (1, 2):
            raise Killed

    def die_after_epoch_one(record: dict) -> None:
        if record["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(killed, on_epoch=die_after_epoch_one)
    assert len(read_metrics(killed.out)) == 1
    with pytest.raises(Killed):  # picks up at restart 1 epoch 2, dies at the restart boundary
        resume(killed.out, on_epoch=die_after_first_restart)
    with pytest.raises(Killed):  # resumes into restart 2, dies after its first epoch
        resume(killed.out, on_epoch=die_after_epoch_one)
    resume(killed.out)

    assert losses(killed.out) == losses(straight.out)
    assert len(losses(killed.out)) == 4
    best = load_network(killed.out / "best.safetensors").meta
    assert best["val_dice"] == max(float(r["val_dice"]) for r in read_metrics(killed.out))
    before = (killed.out / "last.pt").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="meshseg.training.train"):
        resume(killed.out)
    assert "already finished" in caplog.text
    assert (killed.out / "last.pt").stat().st_mtime_ns == before


def test_init_starts_from_a_checkpoint_and_records_its_sha256(config, tmp_path):
    """--init fine-tunes: at a vanishing learning rate the weights stay the checkpoint's."""
    start = fit(config) / "best.safetensors"
    still = replace(config, lr=1e-12, div_factor=1.0, seed=8)
    tuned = fit(replace(still, out=tmp_path / "tuned", init=start)) / "best.safetensors"
    fresh = fit(replace(still, out=tmp_path / "fresh")) / "best.safetensors"

    def conv_weights(path: Path) -> list[torch.Tensor]:
        state = load_network(path).model.state_dict()
        return [v for k, v in state.items() if k.endswith("weight") and v.dim() == 5]

    assert all(torch.allclose(a, b, atol=1e-6)
               for a, b in zip(conv_weights(start), conv_weights(tuned), strict=True))
    assert not torch.allclose(conv_weights(start)[0], conv_weights(fresh)[0])
    assert load_network(tuned).meta["init_sha256"] == sha256_file(start)
    assert load_config(tmp_path / "tuned" / "config.toml").init == start.resolve()
    assert "init_sha256" not in load_network(fresh).meta


def test_freeze_norms_keeps_the_init_statistics_and_still_learns(config, tmp_path):
    start = fit(config) / "best.safetensors"
    tuned = replace(config, out=tmp_path / "tuned", init=start, epochs=2, seed=8)
    frozen = fit(replace(tuned, freeze_norms=True)) / "best.safetensors"
    moving = fit(replace(tuned, out=tmp_path / "moving")) / "best.safetensors"

    def split(path: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        state = load_network(path).model.state_dict()
        stats = [v for k, v in state.items() if k.endswith(("running_mean", "running_var"))]
        return stats, [v for k, v in state.items() if k.endswith("weight") and v.dim() == 5]

    (start_stats, start_conv), (frozen_stats, frozen_conv) = split(start), split(frozen)
    assert start_stats and all(torch.equal(a, b) for a, b in zip(start_stats, frozen_stats))
    assert not all(torch.equal(a, b) for a, b in zip(start_conv, frozen_conv))
    assert not all(torch.equal(a, b) for a, b in zip(start_stats, split(moving)[0]))


def test_resume_refuses_an_init_checkpoint_changed_since_the_start(config, tmp_path):
    start = tmp_path / "start.safetensors"
    start.write_bytes((fit(config) / "best.safetensors").read_bytes())
    tuned = replace(config, out=tmp_path / "tuned", init=start, epochs=3)

    def die(record: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        fit(tuned, on_epoch=die)
    with pytest.raises(Killed):  # the same file: resumes
        resume(tuned.out, on_epoch=die)
    assert len(read_metrics(tuned.out)) == 2
    start.write_bytes((fit(replace(config, out=tmp_path / "b", seed=9)) / "best.safetensors")
                      .read_bytes())
    with pytest.raises(InputError, match="start.safetensors: changed since the run started"):
        resume(tuned.out)


@pytest.mark.parametrize("change, message", [
    ({"channels": 4}, "best.safetensors: a meshnet {'channels': 3, 'activation': 'relu', "
                      "'batchnorm': True} checkpoint cannot start a meshnet {'channels': 4"),
    ({"activation": "elu"}, "cannot start a meshnet {'channels': 3, 'activation': 'elu'"),
    ({"batchnorm": False}, "cannot start a meshnet {'channels': 3, 'activation': 'relu', "
                           "'batchnorm': False}"),
])
def test_init_must_fit_the_network(config, tmp_path, change, message):
    start = fit(config) / "best.safetensors"
    other = replace(config, out=tmp_path / "other", init=start, **change)
    with pytest.raises(InputError, match=re.escape(message)):
        fit(other)
    assert not other.out.exists()
    with pytest.raises(InputError, match="training setting init: .*nothing.pt: no such "):
        fit(replace(other, init=tmp_path / "nothing.pt"))


def test_norm_folded_init_fine_tunes(config, tmp_path):
    """A brainchop-style MeshNet (no batch norms, e.g. arc-t2-lesion) starts a run built
    without them, and training moves its weights."""
    from meshseg.models.weights import save_checkpoint

    start = tmp_path / "folded.safetensors"
    save_checkpoint(start, MeshNet(MeshNetConfig(channels=3, activation="elu",
                                                 batchnorm=False)))
    best = fit(replace(config, init=start, batchnorm=False, activation="elu")) / "best.safetensors"
    before = load_network(start).model.state_dict()
    after = load_network(best).model.state_dict()
    assert before.keys() == after.keys() and not any("running_mean" in k for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_init_refuses_a_meshnet_of_other_dilations(config, tmp_path):
    """Same tensor shapes, other network: refused by name, not loaded silently."""
    from meshseg.models.weights import save_checkpoint

    other = tmp_path / "other.safetensors"
    save_checkpoint(other, MeshNet(MeshNetConfig(channels=3,
                                                 dilations=(1, 2, 4, 8, 16, 8, 4, 2, 2))))
    with pytest.raises(InputError, match=re.escape("'dilations': [1, 2, 4, 8, 16, 8, 4, 2, 2]}"
                                                   " checkpoint cannot start")):
        fit(replace(config, init=other))
    assert not config.out.exists()


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(InputError, match="config.toml: cannot read"):
        resume(tmp_path)


def test_amp_on_cpu_is_refused_before_the_run_folder(config):
    with pytest.raises(DeviceError, match="needs a CUDA device"):
        fit(replace(config, amp=True))
    assert not config.out.exists()


def test_a_missing_monai_is_refused_before_the_run_folder(config, monkeypatch):
    """Issue 20 item 7: a network that needs MONAI, on an install without it, makes no run
    folder (it used to leave config, split and metrics that a later run refused)."""
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai raises ImportError
    with pytest.raises(InputError, match="needs MONAI"):
        fit(replace(config, architecture="segresnet", crop=16))
    assert not config.out.exists()


def test_checkpointing_changes_memory_not_results():
    torch.manual_seed(0)
    plain = MeshNet(MeshNetConfig(channels=3)).train()
    saved = MeshNet(MeshNetConfig(channels=3)).train()
    saved.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 10, 10, 10)
    forward(plain, x).square().mean().backward()
    forward(saved, x, checkpointing=True).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), saved.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(plain.named_buffers(), saved.buffers()):  # BN stats counted once
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("total_steps", [100, 1000])
def test_one_cycle_warms_up_from_lr_over_div_factor_then_decays(total_steps):
    # 1% of 100 steps is the exact-one-step warm-up that torch's OneCycleLR divides by zero on.
    config = TrainConfig(data=Path("d"), out=Path("o"))
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.lr)
    schedule = one_cycle(optimizer, config, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(config.lr / config.div_factor)
    peak = max(range(total_steps), key=rates.__getitem__)
    assert rates[peak] == pytest.approx(config.lr, rel=0.01) and peak <= total_steps // 100
    assert rates[-1] < rates[0]


def test_dice():
    t = torch.tensor
    assert dice(t([True, True, False]), t([True, False, False])) == pytest.approx(2 / 3)
    assert dice(t([False, False]), t([False, False])) == 1.0
    assert dice(t([True, False]), t([False, False])) == 0.0


@pytest.mark.slow
def test_fit_end_to_end_through_real_conform(tmp_path):
    """Oblique 2 mm scans go through the real 256^3 conform and cache; 32^3 crops train."""
    affine = grid_affine(zooms=(2.0, 2.0, 2.0), angles_deg=(8, 0, -5), origin=(-24, -30, -20))
    rows = ["image,mask"]
    for i, centre in enumerate([(8, 10, 12), (16, 12, 10), (12, 15, 17)]):
        pair = write_pair(tmp_path / "in", f"sub-{i}_T2w", center=centre, radius=4,
                          affine=affine, seed=i)
        rows.append(f"{pair.image.name},{pair.mask.name}")
    (tmp_path / "in" / "train.csv").write_text("\n".join(rows) + "\n")
    config = TrainConfig(data=tmp_path / "in" / "train.csv", out=tmp_path / "run", channels=2,
                         epochs=2, crop=32, downsample=2, flip_lr=True, steps_per_epoch=2,
                         val_fraction=0.3, device="cpu", cache=tmp_path / "cache")
    fit(config)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    assert [row["epoch"] for row in read_metrics(config.out)] == ["1", "2"]
    assert load_network(config.out / "best.safetensors").meta["config"]["downsample"] == 2


def test_train_command_runs_and_resumes(config, restore_threads):
    """`meshseg train` end to end, then `--resume` of the finished run is a no-op."""
    from click.testing import CliRunner

    from meshseg.cli import main

    args = ["train", "--data", str(config.data), "--out", str(config.out), "--channels", "3",
            "--epochs", "2", "--crop", "12", "--val-fraction", "0.25", "--steps-per-epoch", "2",
            "--device", "cpu", "--cache", str(config.cache), "--seed", "7",
            "--class-weights", "0.5", "1.0", "--no-amp", "--threads", "1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (config.out / "best.safetensors").exists()
    saved = load_config(config.out / "config.toml")
    assert (saved.class_weights, saved.threads) == ((0.5, 1.0), 1)
    assert len(read_metrics(config.out)) == 2
    again = CliRunner().invoke(main, ["train", "--resume", str(config.out), "--device", "cpu",
                                      "--num-workers", "0", "--threads", "2", "-q"])
    assert again.exit_code == 0, again.output  # machine settings, threads too, may change
    assert len(read_metrics(config.out)) == 2
    mixed = CliRunner().invoke(main, ["train", "--resume", str(config.out), "--epochs", "3"])
    assert mixed.exit_code == 2 and "--resume takes only --device" in mixed.output
    missing = CliRunner().invoke(main, ["train", "--data", str(config.data)])
    assert missing.exit_code == 2 and "--out" in missing.output


def test_settings_as_flags_parse_back_to_the_same_config(tmp_path):
    """as_flags spells every kind of setting so that `meshseg train` reads it back exactly."""
    from meshseg.cli import main
    from meshseg.training.config import as_flags

    settings = {"lr": 0.00123456789, "class_weights": [0.25, 1.0], "flip_lr": False,
                "amp": True, "channels": 12, "architecture": "meshnet"}
    flags = as_flags(settings)
    assert flags[:5] == ["--lr", "0.00123456789", "--class-weights", "0.25", "1.0"]
    context = main.commands["train"].make_context(
        "train", ["--data", "d.csv", "--out", "o", *flags])
    parsed = {k: v for k, v in context.params.items() if k in settings}
    assert parsed == {**settings, "class_weights": (0.25, 1.0)}


def test_train_config_file_with_flags_over_it(config, tmp_path):
    """`--config FILE` (no data or out in it, like tune's best.toml); flags win over it."""
    from click.testing import CliRunner

    from meshseg.cli import main

    settings = tmp_path / "best.toml"
    settings.write_text("# a comment\nchannels = 3\nepochs = 5\ncrop = 12\nlr = 0.002\n"
                        "class_weights = [0.0, 1.0]\nval_fraction = 0.25\nsteps_per_epoch = 1\n")
    args = ["train", "--config", str(settings), "--data", str(config.data), "--out",
            str(config.out), "--epochs", "1", "--device", "cpu", "--cache", str(config.cache),
            "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = load_config(config.out / "config.toml")
    assert (saved.channels, saved.epochs, saved.lr, saved.class_weights) == (3, 1, 0.002,
                                                                             (0.0, 1.0))
    settings.write_text("chanels = 3\n")
    typo = CliRunner().invoke(main, ["train", "--config", str(settings), "--data", "d.csv",
                                     "--out", str(tmp_path / "other")])
    assert typo.exit_code == 1
    assert f"{settings}: unknown training settings: chanels" in typo.output
    both = CliRunner().invoke(main, ["train", "--config", str(settings), "--resume",
                                     str(config.out)])
    assert both.exit_code == 2
    assert "--resume takes only --device, --num-workers, --cache, --threads" in both.output


def test_teacher_probabilities_are_cached_recorded_and_checked_on_resume(config, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((fit(config) / "best.safetensors").read_bytes())
    taught = replace(config, out=tmp_path / "taught", teacher=str(teacher), teacher_weight=0.3,
                     epochs=3)

    def die(record: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        fit(taught, on_epoch=die)
    saved = load_config(taught.out / "config.toml")
    assert (saved.teacher, saved.teacher_weight) == (str(teacher.resolve()), 0.3)
    # One cached map per training subject: the teacher's own probabilities, as predict runs it.
    cached = sorted(config.cache.glob("*.teacher-*.npy"))
    assert len(cached) == 3
    model = load_teacher(str(teacher))
    entry = cached[0].with_name(cached[0].name.split(".teacher-")[0] + ".npy")
    expected = lesion_probability(to_unit_range(np.load(entry)[0]),
                                  runner(model, torch.device("cpu")), crop=model.crop)
    np.testing.assert_allclose(np.load(cached[0]) / 255, expected, atol=0.51 / 255)
    with pytest.raises(Killed):  # the same teacher: resumes
        resume(taught.out, on_epoch=die)
    assert len(read_metrics(taught.out)) == 2
    meta = load_network(taught.out / "best.safetensors").meta
    assert meta["teacher_sha256"] == teacher_digest(model)
    teacher.write_bytes((fit(replace(config, out=tmp_path / "b", seed=9)) / "best.safetensors")
                        .read_bytes())
    with pytest.raises(InputError, match="another model than the run's teacher"):
        resume(taught.out)


def test_teacher_settings_are_checked(config):
    with pytest.raises(InputError, match="teacher_weight=1.5: must be between 0 and 1"):
        fit(replace(config, teacher="brainchop-t2-lesion", teacher_weight=1.5))
    with pytest.raises(InputError, match="teacher: nothing: no such model"):
        fit(replace(config, teacher="nothing"))
    with pytest.raises(InputError, match="not with downsample=2"):
        fit(replace(config, teacher="brainchop-t2-lesion", downsample=2, crop=None))
    assert not config.out.exists()


def test_a_run_saved_without_amp_resumes_with_amp():
    """A CPU run (no amp: an empty GradScaler state) may resume on a GPU, where amp is on
    by default: the scaler starts afresh instead of refusing the empty state."""
    from meshseg.training.train import _Parts, _restore

    model = MeshNet(MeshNetConfig(channels=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=4)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
             "rng": {"torch": torch.get_rng_state(),
                     "numpy": np.random.default_rng(0).bit_generator.state,
                     "python": list(random.getstate())}}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    _restore(_Parts(model, optimizer, scheduler, scaler, np.random.default_rng(1)), saved)
    assert scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
