"""Train MeshNet (or a baseline of `meshseg.archs`) on conformed T2w scans and lesion masks
with the recipe of Fedorov et al. 2025.

Defaults follow the paper: whole 256^3 volumes, batch 1, AdamW (lr 1e-3, weight decay 3e-5,
eps 1e-4), a one-cycle schedule starting at lr/100 with 1% warm-up, cross-entropy with
label smoothing 0.01 and class weights 0.5/1.0, 50 epochs, half precision on CUDA, and
several restarts of which the best by validation Dice is kept. Validation Dice is the mean
over validation volumes of the argmax lesion Dice, on whole volumes (on one fixed crop per
volume, placed over lesion, when training on crops, unless `val_whole` asks for whole
volumes).

A run folder holds config.toml, split.json (the exact pairs), metrics.csv (one row per
epoch and restart), last.pt (resume state, rewritten atomically after every epoch, loadable
without running code) and best.safetensors (the best validation Dice so far); with
keep_epochs, epochs/ holds every epoch's weights too.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from meshseg import archs
from meshseg.errors import DeviceError, InputError, OutputError, WeightsError
from meshseg.io import atomic_path, write_csv
from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import load_network, save_checkpoint, save_network, sha256_file
from meshseg.pipeline.infer import resolve_device, set_threads
from meshseg.progress import track
from meshseg.training.config import MACHINE_FIELDS, TrainConfig, load_config, save_config
from meshseg.training.data import (
    ConformedCache,
    LesionDataset,
    Pair,
    check_pairs,
    default_cache_dir,
    load_dataset,
    split_by_subject,
)
from meshseg.training.distill import load_teacher, teacher_digest, teacher_entries

logger = logging.getLogger(__name__)

CONFIG_FILE, SPLIT_FILE, METRICS_FILE = "config.toml", "split.json", "metrics.csv"
STATE_FILE, BEST_FILE = "last.pt", "best.safetensors"
EPOCHS_DIR = "epochs"
METRIC_COLUMNS = ("restart", "epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds")
STATE_FORMAT = "meshseg-train-state/1"

# ---------------------------------------------------------------------------- entry points


def fit(config: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Check the data, create the run folder and train; returns the run folder.

    `on_epoch` receives each metrics row (see METRIC_COLUMNS) plus epochs, restarts and
    best_val_dice, after the epoch's state is safely on disk.

    Raises:
        InputError: bad settings or data problems (all listed); OutputError: the run
            folder already holds a run or cannot be written; DeviceError: see `resolve_device`.
    """
    config.check()
    archs.require(config.architecture)  # before any file of the run is made
    config = config.resolved()
    run_dir = config.out
    if (run_dir / CONFIG_FILE).exists():
        raise OutputError(f"{run_dir}: already holds a training run (resume it or pick "
                          "another folder)")
    setup = _prepare(config, *_select_pairs(config))
    train_pairs, val_pairs = setup.train_set.pairs, setup.val_set.pairs
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{run_dir}: cannot create run folder ({err.strerror})") from err
    # The split first: config.toml marks a run that can resume, so it comes last.
    with atomic_path(run_dir / SPLIT_FILE, suffix=".part.json") as tmp:
        tmp.write_text(json.dumps({"train": [p.to_dict() for p in train_pairs],
                                   "val": [p.to_dict() for p in val_pairs]}, indent=1))
    save_config(config, run_dir / CONFIG_FILE)
    return _train(config, run_dir, setup, None, on_epoch)


def resume(run_dir: Path, on_epoch: Callable[[dict], None] | None = None,
           machine: dict[str, Any] | None = None) -> Path:
    """Continue a run after its last finished epoch (a killed epoch starts over).

    A finished run is left alone (logged). Model, optimiser, schedule, GradScaler and all
    random generators continue exactly, so a CPU run resumed gives the same metrics.
    `machine` replaces settings of config.toml that belong to the machine, not the run
    (`config.MACHINE_FIELDS`): a run started on a GPU may resume on another machine.

    Raises:
        InputError: the folder holds no run, or its files are damaged; DeviceError: see
            `resolve_device`.
    """
    run_dir = Path(run_dir).resolve()
    machine = machine or {}
    other = sorted(set(machine) - set(MACHINE_FIELDS))
    if other:
        raise ValueError(f"resume may change only {', '.join(MACHINE_FIELDS)}, not "
                         f"{', '.join(other)}")
    config = replace(load_config(run_dir / CONFIG_FILE), out=run_dir, **machine)
    config.check()
    state = _load_state(run_dir / STATE_FILE) if (run_dir / STATE_FILE).exists() else None
    if state is not None and (state["restart"], state["epoch"]) == (config.restarts - 1,
                                                                      config.epochs):
        logger.info("%s: already finished (%d restart(s) of %d epochs); nothing to do",
                    run_dir, config.restarts, config.epochs)
        return run_dir
    try:
        split = json.loads((run_dir / SPLIT_FILE).read_text(encoding="utf-8"))
        train_pairs, val_pairs = ([Pair.from_dict(d) for d in split[k]] for k in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{run_dir / SPLIT_FILE}: missing or damaged ({err})") from err
    _refuse_problems(check_pairs(train_pairs + val_pairs))
    setup = _prepare(config, train_pairs, val_pairs)
    started = (state or {}).get("init_sha256", setup.init_sha256)  # older last.pt: unrecorded
    if started != setup.init_sha256:
        raise InputError(f"{config.init}: changed since the run started from it (sha256 "
                         f"{started}, now {setup.init_sha256}); put it back to resume")
    taught = (state or {}).get("teacher_sha256", setup.teacher_sha256)
    if taught != setup.teacher_sha256:
        raise InputError(f"{config.teacher}: another model than the run's teacher (weights "
                         f"sha256 {taught}, now {setup.teacher_sha256}); put it back to resume")
    return _train(config, run_dir, setup, state, on_epoch)


def _select_pairs(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and validation pairs, checked; raises with every problem found."""
    pairs = load_dataset(config.data)
    if config.val_data is None:
        train_pairs, val_pairs = split_by_subject(pairs, config.val_fraction, config.seed)
    else:
        train_pairs, val_pairs = pairs, load_dataset(config.val_data)
    _refuse_problems(check_pairs(train_pairs + val_pairs))  # also flags a scan in both sets
    logger.info("%d training and %d validation pairs", len(train_pairs), len(val_pairs))
    return train_pairs, val_pairs


def _refuse_problems(problems: list[str]) -> None:
    """Log every data problem and raise one error summarising them."""
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"{len(problems)} problem(s) in the training data: "
                         f"{'; '.join(problems[:3])}{more}")


# ---------------------------------------------------------------------------- training


@dataclass
class _Parts:
    """What one restart trains and saves: model, optimiser, schedule, scaler, sampling RNG."""

    model: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler
    rng: np.random.Generator


def _build(config: TrainConfig, restart: int, total_steps: int, setup: _Setup) -> _Parts:
    """A restart initialised randomly or from `setup.init`; every generator is seeded from
    (seed, restart)."""
    seed = int(np.random.SeedSequence([config.seed, restart]).generate_state(1)[0])
    torch.manual_seed(seed)
    random.seed(seed)
    model = archs.build(config.architecture, **config.network_options())
    if setup.init is not None:
        model.load_state_dict(setup.init.state)
    model = model.to(setup.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, eps=config.eps)
    scheduler = one_cycle(optimizer, config, total_steps)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.amp)
    return _Parts(model, optimizer, scheduler, scaler, np.random.default_rng(seed))


def one_cycle(optimizer: torch.optim.Optimizer, config: TrainConfig,
              total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule: lr/div_factor, up to lr over pct_start of the steps, cosine down.

    torch's OneCycleLR divides by zero when the warm-up ends exactly at step 0
    (pct_start * total_steps == 1, e.g. 1% of 100 steps); that case gets its intended
    one-step warm-up by moving the end of warm-up half a step later.
    """
    pct_start = config.pct_start
    if float(pct_start * total_steps) - 1 == 0:
        pct_start = 1.5 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, div_factor=config.div_factor,
        pct_start=pct_start)


@dataclass
class _Init:
    """The weights a fine-tuning run starts from, and the sha256 of their file."""

    state: dict[str, torch.Tensor]
    sha256: str


@dataclass
class _Setup:
    """Device, precision, data and starting weights of a run: all that can fail before a
    run file is written."""

    device: torch.device
    amp: bool
    train_set: LesionDataset
    val_set: LesionDataset
    init: _Init | None = None
    teacher_sha256: str | None = None  # `distill.teacher_digest` of the teacher, if any

    @property
    def init_sha256(self) -> str | None:
        """sha256 of the starting weights' file; None for a randomly initialised run."""
        return self.init.sha256 if self.init else None


def _load_init(config: TrainConfig) -> _Init | None:
    """The weights of `config.init`, refused unless they fit this run's network.

    Raises:
        InputError: unreadable checkpoint, or another architecture or build options.
    """
    if config.init is None:
        return None
    try:
        start = load_network(config.init)
    except WeightsError as err:
        raise InputError(f"training setting init: {err}") from err
    # The full build options, not only the training settings: a MeshNet of other dilations
    # has tensors of the same shapes and would load without complaint.
    brief = config.network_options()
    full = MeshNetConfig(**brief).to_dict() if config.architecture == archs.MESHNET else brief
    if start.architecture != config.architecture or start.options != full:
        shown = [*brief, *(k for k in full if k not in brief and start.options.get(k) != full[k])]
        have = {key: start.options.get(key) for key in shown}
        wanted = {key: full[key] for key in shown}
        raise InputError(f"{config.init}: a {start.architecture} {have} checkpoint cannot "
                         f"start a {config.architecture} {wanted} run")
    return _Init(start.model.state_dict(), sha256_file(config.init))


def _prepare(config: TrainConfig, train_pairs: list[Pair], val_pairs: list[Pair]) -> _Setup:
    """Pick the device and thread count, and conform (or find in the cache) every pair."""
    device = resolve_device(config.device)
    logger.info("%s, %d CPU thread(s)", device, set_threads(config.threads))
    amp = device.type == "cuda" if config.amp is None else config.amp
    if amp and device.type != "cuda":
        raise DeviceError(f"half precision (amp) needs a CUDA device, not {device}")
    cache = ConformedCache(config.cache or default_cache_dir())
    common = {"downsample": config.downsample, "seed": config.seed}
    val_crop = None if config.val_whole else config.crop
    init = _load_init(config)
    teacher, teacher_sha256 = None, None
    if config.teacher is not None:
        model = load_teacher(config.teacher)
        teacher_sha256 = teacher_digest(model)
        teacher = teacher_entries(train_pairs, cache, model, device)
    return _Setup(device, amp,
                  LesionDataset(train_pairs, cache, crop=config.crop,
                                lesion_p=config.crop_lesion_p, flip_lr=config.flip_lr,
                                intensity_aug=config.intensity_aug, teacher=teacher,
                                teacher_weight=config.teacher_weight, **common),
                  LesionDataset(val_pairs, cache, crop=val_crop, lesion_p=1.0, **common),
                  init, teacher_sha256)


def _train(config: TrainConfig, run_dir: Path, setup: _Setup, state: dict | None,
           on_epoch: Callable[[dict], None] | None) -> Path:
    """Run the remaining epochs of every restart, saving state after each epoch."""
    device, amp = setup.device, setup.amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one fixed input shape: pick the fastest kernels
    val_loader = DataLoader(setup.val_set, batch_size=1, num_workers=config.num_workers)
    steps = config.steps_per_epoch or math.ceil(len(setup.train_set) / config.batch_size)
    criterion = loss_function(config, device)
    rows = list(state["metrics"]) if state else []
    best = dict(state["best"]) if state else {"val_dice": -1.0}
    _write_metrics(run_dir / METRICS_FILE, rows)  # drops rows of an epoch killed before last.pt
    start_restart, start_epoch = (state["restart"], state["epoch"] + 1) if state else (0, 1)
    if start_epoch > config.epochs:
        start_restart, start_epoch = start_restart + 1, 1
    started_from = {key: value for key, value in (("init_sha256", setup.init_sha256),
                                                  ("teacher_sha256", setup.teacher_sha256))
                    if value is not None}
    for restart in range(start_restart, config.restarts):
        parts = _build(config, restart, steps * config.epochs, setup)
        first = start_epoch if restart == start_restart else 1
        if first > 1:
            _restore(parts, state)
        for epoch in range(first, config.epochs + 1):
            started = time.perf_counter()
            train_loss, lr = _train_epoch(config, setup, parts, criterion, steps)
            val_loss, val_dice = _validate(parts.model, val_loader, criterion, device, amp)
            row = {"restart": restart + 1, "epoch": epoch, "train_loss": train_loss,
                   "val_loss": val_loss, "val_dice": val_dice, "lr": lr,
                   "seconds": round(time.perf_counter() - started, 3)}
            rows.append(row)
            meta = {"val_dice": val_dice, "restart": restart + 1, "epoch": epoch,
                    "seed": config.seed, "config": config.to_dict(), **started_from}
            if config.keep_epochs:
                (run_dir / EPOCHS_DIR).mkdir(exist_ok=True)
                _save_weights(run_dir / EPOCHS_DIR / f"r{restart + 1}-e{epoch}.safetensors",
                           config, parts.model, meta)
            if val_dice > best["val_dice"]:
                best = {"val_dice": val_dice, "restart": restart + 1, "epoch": epoch}
                _save_weights(run_dir / BEST_FILE, config, parts.model, meta)
            _save_state(run_dir / STATE_FILE, parts, restart, epoch, best, rows, setup)
            _write_metrics(run_dir / METRICS_FILE, rows)
            logger.info("restart %d/%d epoch %d/%d: train loss %.4f, val loss %.4f, "
                        "val Dice %.4f, lr %.2e, %.1f s", restart + 1, config.restarts, epoch,
                        config.epochs, train_loss, val_loss, val_dice, lr, row["seconds"])
            if on_epoch is not None:
                on_epoch({**row, "epochs": config.epochs, "restarts": config.restarts,
                          "best_val_dice": best["val_dice"]})
    logger.info("%s: best validation Dice %.4f (restart %d, epoch %d)", run_dir,
                best["val_dice"], best["restart"], best["epoch"])
    return run_dir


def loss_function(config: TrainConfig,
                  device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with the class weights and label smoothing of `config`.

    torch divides by the summed class weights of the voxels, so with a background weight of
    0 (the paper's search space includes it) a batch without lesion voxels would be 0/0 =
    NaN and poison the weights; such a batch carries no weight to learn from and gives a
    loss of 0 instead (no gradient).
    """
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(config.class_weights, device=device),
                                    label_smoothing=config.label_smoothing)
    if config.class_weights[0] > 0:
        return criterion

    def loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Soft targets (distillation) are averaged over voxels, not over their weights.
        if mask.is_floating_point() or bool((mask == 1).any()):
            return criterion(logits, mask)
        return (logits * 0).sum()

    return loss


def _save_weights(path: Path, config: TrainConfig, model: nn.Module, meta: dict) -> None:
    """MeshNet in its own checkpoint format (foldable for layer-by-layer inference), any
    other architecture with its name and build options."""
    if isinstance(model, MeshNet):
        save_checkpoint(path, model, meta)
    else:
        save_network(path, model, config.architecture, config.network_options(),
                     config.input_side(), meta)


def _epoch_keys(rng: np.random.Generator, n: int, samples: int) -> list[tuple[int, int]]:
    """This epoch's (pair index, draw) keys: shuffled passes over the pairs, cut to `samples`."""
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(samples / n))])[:samples]
    draws = rng.integers(0, 2**62, size=samples)
    return [(int(i), int(d)) for i, d in zip(order, draws)]


def _train_epoch(config: TrainConfig, setup: _Setup, parts: _Parts, criterion: Callable,
                 steps: int) -> tuple[float, float]:
    """`steps` optimiser steps on freshly drawn samples; returns (mean loss, last step's lr)."""
    device = setup.device
    keys = _epoch_keys(parts.rng, len(setup.train_set), steps * config.batch_size)
    loader = DataLoader(setup.train_set, batch_size=config.batch_size, sampler=keys,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    parts.model.train()
    if config.freeze_norms:
        for norm in _norms(parts.model):
            norm.eval()  # normalise by the kept running statistics; scale/shift still learn
    total, lr = 0.0, 0.0
    for image, mask in track(loader, len(loader), "batches"):
        image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        parts.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=setup.amp):
            loss = criterion(forward(parts.model, image, config.checkpointing), mask)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        total += loss.item()
    return total / len(loader), lr


def forward(model: nn.Module, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """Logits (N, 2, D, H, W). With `checkpointing` (MeshNet only) only each block's input is
    kept and the block's inner activations (convolution, norm) are recomputed during backward."""
    if not checkpointing:
        return model(x)
    for block in model.blocks:
        x = checkpoint(block, x, use_reentrant=False,
                       context_fn=lambda b=block: (nullcontext(), _running_stats_frozen(b)))
    return model.classifier(x)


def _norms(module: nn.Module) -> list[nn.Module]:
    """The batch-norm layers of `module` (any dimension)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Keep batch-norm running statistics unchanged while a checkpointed block is recomputed,
    so each batch counts once, exactly as without checkpointing (momentum 0 = no update)."""
    norms = _norms(module)
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, criterion: Callable, device: torch.device,
              amp: bool) -> tuple[float, float]:
    """(mean loss, mean Dice of argmax lesion vs mask) over the validation volumes."""
    model.eval()
    losses, dices = [], []
    for image, mask in loader:
        image, mask = image.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(image)
            losses.append(criterion(logits, mask).item())
        dices.append(dice(logits.argmax(1) == 1, mask == 1))
    return float(np.mean(losses)), float(np.mean(dices))


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """2|P&T| / (|P|+|T|) of two boolean volumes; 1.0 when both are empty (nothing missed)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


# ---------------------------------------------------------------------------- run files


def _save_state(path: Path, parts: _Parts, restart: int, epoch: int, best: dict,
                rows: list[dict], setup: _Setup) -> None:
    """Write last.pt atomically: only tensors, numbers, strings, lists and dicts (and None
    for the sha256 of a run without init or teacher)."""
    version, internal, gauss = random.getstate()
    state = {
        "format": STATE_FORMAT, "restart": restart, "epoch": epoch, "best": best,
        "metrics": rows, "init_sha256": setup.init_sha256,
        "teacher_sha256": setup.teacher_sha256,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": parts.rng.bit_generator.state,
                "python": [version, list(internal), gauss]},
    }
    with atomic_path(path, suffix=".part.pt") as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict:
    """Read last.pt without running code (weights_only).

    Raises:
        InputError: unreadable or not a meshseg training state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(f"{path}: unreadable resume state ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a meshseg training state")
    return state


def _restore(parts: _Parts, state: dict) -> None:
    """Put a restart back where last.pt left it.

    A run saved without amp (on the CPU) has an empty scaler state; resumed with amp (on a
    GPU) its scaler starts afresh, as GradScaler refuses to load an empty state.
    """
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    parts.rng.bit_generator.state = state["rng"]["numpy"]
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv atomically from the rows that last.pt vouches for."""
    write_csv(path, METRIC_COLUMNS, rows)
